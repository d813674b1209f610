"""The repository itself: notebooks committed without outputs, a license, citation metadata and
pyproject.toml's [project] metadata that agree with each other."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
HOLDER = "The segstudy authors"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_committed_without_outputs(path):
    """Outputs belong in outputs/ (papermill writes the executed copies there), not in git."""
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
    assert "papermill" not in nb["metadata"], f"{path.name} is an executed copy (papermill metadata)"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7


def test_license_is_mit_held_by_the_authors():
    text = (ROOT / "LICENSE").read_text()
    assert text.splitlines()[0] == "MIT License"
    assert f"Copyright (c) 2026 {HOLDER}" in text
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    project = _project()
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]


def test_citation_cff_matches_pyproject():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    project = _project()
    # the keys CFF 1.2.0 requires, with the types its schema wants (validated with cffconvert --validate)
    assert cff["cff-version"] == "1.2.0" and isinstance(cff["message"], str) and cff["message"]
    assert isinstance(cff["title"], str) and cff["title"].startswith(project["name"])
    assert cff["authors"] == [{"name": HOLDER}]
    assert str(cff["version"]) == project["version"]
    assert cff["license"] == project["license"]
    assert isinstance(cff["date-released"], str) and cff["date-released"] == "2026-12-04"  # quoted: a string
    assert cff.get("type", "software") == "software"
    assert "repository-code" not in cff or cff["repository-code"].startswith("https://")


def test_pyproject_metadata():
    project = _project()
    assert project["authors"] == [{"name": HOLDER}]
    assert len(project["keywords"]) >= 5 and "semantic segmentation" in project["keywords"]
    classifiers = project["classifiers"]
    assert all(not c.startswith("License ::") for c in classifiers)  # PEP 639: the SPDX `license` says it
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    allowed = SpecifierSet(project["requires-python"])
    assert versions and all(f"{v}.0" in allowed for v in versions)
    for name, url in project["urls"].items():  # the documentation in the repository (no public URL yet)
        assert url.startswith("https://") or (ROOT / url).is_file(), (name, url)
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in build)  # PEP 639
