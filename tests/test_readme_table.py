"""`segstudy headline`: the README's verdict table is written from a run's verdicts.json, between
its markers, and nothing outside them changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segstudy.cli import main
from segstudy.config_paths import PROJECT_ROOT
from segstudy.config_profiles import load_config
from segstudy.errors import UserError
from segstudy.studies import readme_table, results_files
from segstudy.studies.verdicts import Verdict

VERDICTS = [Verdict("Does int8 keep accuracy at its speed-up?", "yes", "int8 OpenVINO (deployed) − fp32: -0.33 | x"),
            Verdict("Which model to deploy?", "custom · pruned + int8 OpenVINO", "9.08 [1.72, 16.4] at 35.3 ms")]


@pytest.fixture
def cfg(tmp_path):
    return load_config("smoke", {"output_root": str(tmp_path / "out")})


def _readme(tmp_path: Path, middle: str) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore the table\n\n{middle}\n\nafter the table\n")
    return readme


def test_the_table_is_the_runs_verdicts_between_the_markers(cfg, tmp_path):
    results_files.write_verdicts(cfg, VERDICTS, [])
    readme = _readme(tmp_path, f"{readme_table.BEGIN}\n| stale | hand | edit |\n{readme_table.END}")
    assert main(["headline", "--profile", "smoke", "--set", f"output_root={cfg.output_root}",
                 "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore the table\n\n") and text.endswith("\n\nafter the table\n")
    assert "stale" not in text
    assert "| Does int8 keep accuracy at its speed-up? | yes | int8 OpenVINO (deployed) − fp32: -0.33 \\| x |" in text
    assert "| Which model to deploy? | custom · pruned + int8 OpenVINO | 9.08 [1.72, 16.4] at 35.3 ms |" in text
    commit = results_files.read(cfg, "verdicts")[0]["provenance"]["commit"]
    assert f"From `./run_all.sh smoke --set output_root={cfg.output_root}` at {(commit or 'unknown')[:7]}" in text
    assert readme_table.headline(cfg, readme) is False  # written once: the same text again


def test_a_readme_without_markers_is_one_error_whose_advice_works(cfg, tmp_path):
    results_files.write_verdicts(cfg, VERDICTS, [])
    readme = _readme(tmp_path, "| a hand-made table |")
    with pytest.raises(UserError, match="has no verdict table markers") as err:
        readme_table.headline(cfg, readme)
    assert readme.read_text().count("hand-made") == 1  # nothing written
    lines = str(err.value).splitlines()  # as the message says: the two marker lines where the table belongs
    readme.write_text(readme.read_text().replace("| a hand-made table |", "\n".join(lines[1:3])))
    assert readme_table.headline(cfg, readme) is True and "| Which model to deploy? |" in readme.read_text()


def test_without_a_run_it_names_the_command_that_writes_the_verdicts(cfg, tmp_path):
    readme = _readme(tmp_path, f"{readme_table.BEGIN}\n{readme_table.END}")
    with pytest.raises(UserError, match=r"verdicts\.json does not exist.*Run `\./run_all\.sh smoke`"):
        readme_table.headline(cfg, readme)


def test_the_project_readme_holds_one_table_block(cfg, tmp_path):
    results_files.write_verdicts(cfg, VERDICTS, [])
    copy = tmp_path / "README.md"
    shutil.copy(PROJECT_ROOT / "README.md", copy)
    text = copy.read_text()
    assert text.count(readme_table.BEGIN) == 1 and text.count(readme_table.END) == 1
    readme_table.headline(cfg, copy)
    after = copy.read_text()
    assert after.split(readme_table.BEGIN)[0] == text.split(readme_table.BEGIN)[0]
    assert after.split(readme_table.END)[1] == text.split(readme_table.END)[1]
