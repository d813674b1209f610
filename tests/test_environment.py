"""The locked environment: requirements.lock agrees with pyproject.toml, and every way of installing
(setup_env.sh, environment.yml, CI, the Docker images) goes through it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        if match:
            pins[canonicalize_name(match[1].split("[")[0])] = match[2]
    return pins


def test_lock_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    pins = _lock()
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: regenerate the lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's '{req.specifier}': regenerate it")
    header = (ROOT / "requirements.lock").read_text().splitlines()[1]
    assert "uv pip compile pyproject.toml" in header and all(f"--extra {e}" in header
                                                              for e in project["optional-dependencies"])


def test_every_install_path_uses_the_lock():
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert '-c "$LOCK"' in setup and "SEGSTUDY_TORCH" in setup and "download.pytorch.org/whl/" in setup
    assert "VIRTUAL_ENV" in setup and "CONDA_PREFIX" in setup  # an active environment is used as it is
    assert "scripts/setup_env.sh" in (ROOT / "environment.yml").read_text()
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    test = wf["jobs"]["test"]
    run = next(s for s in test["steps"] if s.get("run", "").strip() == "./run_tests.sh")
    assert run["env"]["SEGSTUDY_TORCH"] == "cpu"
    assert wf["concurrency"]["cancel-in-progress"] is True
    node20 = {"actions/checkout": 5, "actions/setup-python": 6, "docker/setup-buildx-action": 4,
              "docker/build-push-action": 7}  # the first majors that run on Node 24
    for job in wf["jobs"].values():
        for step in job["steps"]:
            action, _, major = step.get("uses", "@").partition("@")
            if action in node20:
                assert int(major.lstrip("v")) >= node20[action], step["uses"]
    assert "requirements.lock" in (ROOT / "Dockerfile").read_text()


def test_pytest_has_a_per_test_timeout():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert int(options["timeout"]) > 0
