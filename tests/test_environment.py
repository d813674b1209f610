"""The locked environment: requirements.lock agrees with pyproject.toml, and every way of installing
(setup_env.sh, environment.yml, CI, the Docker images) goes through it."""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
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
    assert "--generate-hashes" in header
    # the lock is resolved for one Python: pyproject allows that one and no other minor version
    locked = re.search(r"--python-version (3\.\d+)", header)[1]
    allowed = SpecifierSet(project["requires-python"])
    assert [v for v in ("3.10", "3.11", "3.12", "3.13") if f"{v}.0" in allowed] == [locked]


def test_every_locked_package_has_hashes():
    text = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert len(entries) == len(_lock()) > 100
    for entry in entries:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), entry.splitlines()[0]


def test_every_install_path_uses_the_lock():
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert '--require-hashes --no-deps -r "$reqs/hashed.txt"' in setup and "scripts/lock_select.py" in setup
    assert "--no-deps -e" in setup and "SEGSTUDY_TORCH" in setup and "download.pytorch.org/whl" in setup
    assert "VIRTUAL_ENV" in setup and "CONDA_PREFIX" in setup  # an active environment is used as it is
    assert "scripts/setup_env.sh" in (ROOT / "environment.yml").read_text()
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    test = wf["jobs"]["test"]
    run = next(s for s in test["steps"] if s.get("run", "").strip() == "./run_tests.sh")
    assert run["env"]["SEGSTUDY_TORCH"] == "cpu"
    assert wf["concurrency"]["cancel-in-progress"] is True
    node20 = {"actions/checkout": 5, "actions/setup-python": 6, "docker/setup-buildx-action": 4,
              "docker/build-push-action": 7}  # the first majors that run on Node 24
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    pinned = re.findall(r"uses: ([\w.-]+/[\w.-]+)@[0-9a-f]{40} # v(\d+)\.", text)  # the release in the comment
    assert {action for action, _ in pinned} == set(node20)
    for action, major in pinned:
        assert int(major) >= node20[action], action
    assert "requirements.lock" in (ROOT / "Dockerfile").read_text()


def test_pytest_has_a_per_test_timeout():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert int(options["timeout"]) > 0


def _lock_select(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock_select.py"), "--constraints", *args],
                         capture_output=True, text=True, check=True).stdout
    return [canonicalize_name(line.split("==")[0]) for line in out.splitlines()]


def test_lock_selection_follows_the_extras_and_the_torch_build():
    everything, bare = _lock_select("--extras", "dev,lab,wandb"), _lock_select("--extras", "")
    assert set(everything) == set(_lock())  # the lock holds the project and its three extras, nothing more
    assert {"pytest", "ruff", "jupyterlab", "zizmor", "kubernetes-validate", "wandb"} <= set(everything) - set(bare)
    assert {"torch", "torchvision", "mlflow", "numpy", "ipykernel", "jinja2"} <= set(bare)  # needed without extras
    no_torch = set(_lock_select("--extras", "", "--without-torch"))
    assert not {"torch", "torchvision", "triton"} & no_torch and not any(n.startswith("nvidia-") for n in no_torch)
    assert {"sympy", "filelock", "networkx"} <= no_torch  # torch's own dependencies stay hash-checked


def fake_nvidia_smi(folder: Path, driver: str | None) -> Path:
    """An `nvidia-smi` in `folder`/bin for one H100 with `driver`, or for a machine without a GPU
    (None: it fails, as nvidia-smi does without a driver); returns the folder to put first on PATH."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    answers = (f"case \"$*\" in\n  -L) echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)';;\n"
               f"  '--query-gpu=driver_version --format=csv,noheader') echo '{driver}';;\n  *) exit 2;;\nesac\n")
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + (answers if driver else "exit 9\n"))
    (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


def _torch_variant(index_url: str, tmp_path: Path, driver: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SEGSTUDY_NVIDIA_SMI"}  # the nvidia-smi on PATH
    env |= {"SEGSTUDY_TORCH_INDEX_URL": index_url, "SEGSTUDY_NVIDIA_PROC": str(tmp_path / "no-driver"),
            "PATH": f"{fake_nvidia_smi(tmp_path, driver)}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "torch_variant.py")], env=env,
                          capture_output=True, text=True, timeout=30, check=True)


@pytest.fixture
def local_torch_index(tmp_path):
    """A PEP 503 index on loopback with a page for torch under cpu/: what PyTorch's CPU index answers."""
    (tmp_path / "index" / "cpu" / "torch").mkdir(parents=True)
    (tmp_path / "index" / "cpu" / "torch" / "index.html").write_text("<html><body></body></html>")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(tmp_path / "index")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_no_gpu_and_the_cpu_index_answers_takes_the_cpu_build(tmp_path, local_torch_index):
    result = _torch_variant(local_torch_index, tmp_path)
    assert result.stdout.strip() == "cpu"
    assert result.stderr.strip() == ("[setup] no NVIDIA GPU: torch's CPU build from PyTorch's wheel index "
                                     f"({local_torch_index}/cpu)")


def test_no_gpu_and_no_cpu_index_falls_back_to_pypi_in_one_line(tmp_path):
    result = _torch_variant("http://127.0.0.1:9/whl", tmp_path)  # the discard port: refused at once
    assert result.stdout.strip() == "default"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[setup] no NVIDIA GPU, but PyTorch's CPU wheel index (127.0.0.1:9)")
    assert "PyPI's default torch build" in lines[0]


@pytest.mark.parametrize("driver, variant", [("580.95.05", "default"), ("595.71.05", "default"),
                                             ("570.86.15", "cu126"), ("535.104.05", "cu126")])
def test_a_gpu_gets_the_newest_build_its_driver_runs_without_asking_the_index(tmp_path, driver, variant):
    result = _torch_variant("http://127.0.0.1:9/whl", tmp_path, driver)
    assert result.stdout.strip() == variant
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[setup] NVIDIA GPU found, driver {driver}")
    assert ("CUDA 13.0" if variant == "default" else "torch's CUDA 12.6 build (cu126)") in lines[0]


def test_a_driver_too_old_for_every_build_is_named_with_what_to_do(tmp_path):
    result = _torch_variant("http://127.0.0.1:9/whl", tmp_path, "470.82.01")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[setup] NVIDIA driver 470.82.01 is older than every CUDA build")
    assert ">= 525.60.13" in lines[0] and "updated to >= 580" in lines[0] and "SEGSTUDY_TORCH=cpu" in lines[0]
    assert result.stdout.strip() == "default"


def fake_venv(tmp_path: Path, build: str) -> tuple[Path, Path]:
    """An environment whose python only logs its arguments (no pip runs), installed with `build`."""
    venv, log = tmp_path / "venv", tmp_path / "python.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\necho \"$*\" >> '{log}'\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".segstudy-installed").write_text(f"{build}\n")
    return venv, log


def test_asking_for_another_build_replaces_torch_as_the_advice_types_it(tmp_path):
    """`SEGSTUDY_TORCH=cu126 ./scripts/setup_env.sh` (resolve_device's advice) on an environment with the
    default build: torch and torchvision are removed first (pip would keep them: 2.14.1 matches either
    build), then come from the cu126 index."""
    venv, log = fake_venv(tmp_path, "default")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env |= {"SEGSTUDY_VENV": str(venv), "SEGSTUDY_TORCH_INDEX_URL": "http://127.0.0.1:9/whl"}
    result = subprocess.run(["bash", "-c", "SEGSTUDY_TORCH=cu126 ./scripts/setup_env.sh"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    removed = calls.index("-m pip uninstall -y -q torch torchvision")
    added = next(i for i, c in enumerate(calls) if "--index-url http://127.0.0.1:9/whl/cu126 torch==2.14.1" in c)
    assert removed < added and (venv / ".segstudy-installed").read_text().strip() == "cu126"


def test_an_installed_environment_is_reused_without_asking_again(tmp_path):
    """SEGSTUDY_TORCH unset: the build chosen at install time (cpu here) stays; no probe, no reinstall."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".segstudy-installed").write_text("cpu\n")  # written after the lock and pyproject: newer
    env = {k: v for k, v in os.environ.items() if k not in ("SEGSTUDY_TORCH", "VIRTUAL_ENV", "CONDA_PREFIX")}
    env |= {"SEGSTUDY_VENV": str(venv), "SEGSTUDY_TORCH_INDEX_URL": "http://127.0.0.1:9/whl"}
    for torch in (None, "cpu"):
        if torch:
            env["SEGSTUDY_TORCH"] = torch
        result = subprocess.run(["bash", "-c", f"source '{ROOT}/scripts/setup_env.sh'"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == (f"[setup] reusing {venv}, torch: cpu "
                                         "(delete it, or touch pyproject.toml, to reinstall)")


def test_a_test_worker_and_what_it_starts_take_the_same_thread_share():
    """./run_tests.sh's workers (pytest-xdist): the worker's own torch, imported before conftest sets
    OMP_NUM_THREADS, runs on the share its subprocesses inherit, not on every core."""
    import torch

    if not os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        pytest.skip("the tests run in turn (-n 0 or plain pytest): there is no share to take")
    share = int(os.environ["OMP_NUM_THREADS"])
    started = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True, timeout=120)
    assert torch.get_num_threads() == share == int(started.stdout)
