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


@pytest.mark.parametrize("argv, deprecated", [
    (["plan", "--profile", "smoke"], None),
    (["plan", "smoke"], "the positional profile 'smoke' is deprecated; write --profile smoke"),
    (["train", "--params", "smoke"], "--params smoke is deprecated; write --profile smoke"),
    (["predict", "--params", "smoke", "--model", "m.pt", "--input", "x", "--out", "o"], "--params smoke"),
    (["serve", "--params", "smoke", "--model", "models:/m@a"], "--params smoke"),
])
def test_every_subcommand_takes_the_profile_one_way(argv, deprecated, capsys):
    args = cli.build_parser().parse_args(argv)
    assert cli.profile(args) == "smoke"
    err = capsys.readouterr().err
    assert (deprecated in err) if deprecated else err == ""
    assert cli.profile(cli.build_parser().parse_args([argv[0]] + argv[3:])) == "demo"  # none given


def test_two_different_profiles_are_an_error(capsys):
    assert cli.main(["plan", "demo", "--profile", "smoke"]) == 2
    assert "two profiles given: --profile smoke and the positional profile 'demo'" in capsys.readouterr().err


def test_plan_runs_with_the_new_spelling(capsys):
    assert cli.main(["plan", "--profile", "smoke", "--only", "02"]) == 0
    assert "Plan for profile smoke" in capsys.readouterr().out
