"""The segstudy command: one way to give a profile (--profile), the old spellings read with a
deprecation line, and --version."""

from __future__ import annotations

import pytest

from segstudy import cli


def test_version_names_the_package_commit_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("segstudy 0.1.0") and "torch 2.14.1" in out


@pytest.mark.parametrize("argv", [
    ["plan", "--profile", "smoke"], ["train", "--profile", "smoke"], ["run", "--profile", "smoke"],
    ["predict", "--profile", "smoke", "--model", "m.pt", "--input", "x", "--out", "o"],
    ["serve", "--profile", "smoke", "--model", "models:/m@a"],
])
def test_every_subcommand_takes_the_profile_one_way(argv):
    assert cli.profile(cli.build_parser().parse_args(argv)) == "smoke"
    assert cli.profile(cli.build_parser().parse_args([argv[0]] + argv[3:])) == "demo"  # none given


@pytest.mark.parametrize("argv", [["plan", "smoke"], ["train", "--params", "smoke"]])
def test_the_removed_spellings_are_refused(argv, capsys):
    """A positional profile for run / plan and --params went (docs/changes.md): argparse names them."""
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(argv)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_plan_runs_with_the_new_spelling(capsys):
    assert cli.main(["plan", "--profile", "smoke", "--only", "02"]) == 0
    assert "Plan for profile smoke" in capsys.readouterr().out
