"""Which torch build scripts/setup_env.sh installs when SEGSTUDY_TORCH is not set.

Prints the variant on stdout (``default``: PyPI's wheel, CUDA 13 libraries included; ``cu126``: the
CUDA 12.6 build from PyTorch's wheel index; ``cpu``: the CPU build from that index) and at most one
``[setup]`` line on stderr saying why:

- an NVIDIA GPU is present (``nvidia-smi -L`` succeeds, or /proc/driver/nvidia exists): the newest
  CUDA build its driver runs (``nvidia-smi --query-gpu=driver_version``; the table is
  lib/segstudy/engine/cuda_builds.py), ``default`` when the driver's version cannot be read, and a
  line naming the driver and what to do when it is older than every build needs;
- no GPU, and PyTorch's CPU index answers within 5 s: ``cpu`` (several GB less to download);
- no GPU, and the index does not answer: ``default``, with one line saying so.

Standard library only (it runs before the environment exists). Overridable, for tests and mirrors:
SEGSTUDY_TORCH_INDEX_URL (the base of PyTorch's wheel indexes, default
https://download.pytorch.org/whl; the CPU index is <base>/cpu), SEGSTUDY_NVIDIA_SMI (the nvidia-smi
command) and SEGSTUDY_NVIDIA_PROC (the driver's /proc folder).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

DEFAULT_INDEX = "https://download.pytorch.org/whl"
PROBE_TIMEOUT_S = 5.0


def _cuda_builds():
    """lib/segstudy/engine/cuda_builds.py, loaded by its path: segstudy is not installed yet."""
    path = Path(__file__).resolve().parents[1] / "lib" / "segstudy" / "engine" / "cuda_builds.py"
    spec = importlib.util.spec_from_file_location("cuda_builds", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up while building CudaBuild
    spec.loader.exec_module(module)
    return module


cuda_builds = _cuda_builds()


def nvidia_gpu_present() -> bool:
    if os.path.isdir(os.environ.get("SEGSTUDY_NVIDIA_PROC", "/proc/driver/nvidia")):
        return True
    try:
        result = subprocess.run([os.environ.get("SEGSTUDY_NVIDIA_SMI", "nvidia-smi"), "-L"],
                                capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and b"GPU" in result.stdout


def index_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the PEP 503 page of torch in the index at `url` answers 200 within `timeout`."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as response:
            response.read(1024)
            return response.status == 200
    except Exception:  # DNS failure, refused, timeout, HTTP error, proxy: all mean "not reachable"
        return False


def for_gpu(driver: str | None) -> tuple[str, str]:
    """(variant, [setup] line) for a machine with an NVIDIA GPU whose driver is `driver`."""
    newest, oldest = cuda_builds.BUILDS[0], cuda_builds.BUILDS[-1]
    if driver is None:
        return "default", (f"[setup] NVIDIA GPU found, its driver's version unreadable (nvidia-smi): PyPI's default "
                           f"torch build (CUDA {newest.cuda}, needs driver >= {newest.min_driver}; for a driver from "
                           f"{oldest.min_driver}: SEGSTUDY_TORCH={oldest.variant})")
    build = cuda_builds.build_for_driver(driver)
    if build is None:
        return "default", (f"[setup] NVIDIA driver {driver} is older than every CUDA build of torch needs (CUDA "
                           f"{oldest.cuda}: >= {oldest.min_driver}, CUDA {newest.cuda}: >= {newest.min_driver}): "
                           f"installing PyPI's default build (CUDA {newest.cuda}), which runs once the driver is "
                           f"updated to >= {newest.min_driver}; to use the CPU instead: SEGSTUDY_TORCH=cpu")
    if build == newest:
        return "default", f"[setup] NVIDIA GPU found, driver {driver}: PyPI's default torch build (CUDA {build.cuda})"
    return build.variant, (f"[setup] NVIDIA GPU found, driver {driver} (CUDA {newest.cuda} needs >= "
                           f"{newest.min_driver}): torch's CUDA {build.cuda} build ({build.variant}) from PyTorch's "
                           f"wheel index (it has no kernels for Blackwell GPUs, which need the driver updated)")


def choose() -> tuple[str, str]:
    """(variant, the [setup] line saying why)."""
    if nvidia_gpu_present():
        return for_gpu(cuda_builds.driver_version())
    base = os.environ.get("SEGSTUDY_TORCH_INDEX_URL", DEFAULT_INDEX).rstrip("/")
    host = urllib.request.urlparse(base).netloc or base
    if index_answers(f"{base}/cpu"):
        return "cpu", f"[setup] no NVIDIA GPU: torch's CPU build from PyTorch's wheel index ({base}/cpu)"
    return "default", (f"[setup] no NVIDIA GPU, but PyTorch's CPU wheel index ({host}) did not answer: installing "
                       "PyPI's default torch build (CUDA libraries included, several GB)")


def main() -> int:
    variant, line = choose()
    print(line, file=sys.stderr)
    print(variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
