"""Which torch build scripts/setup_env.sh installs when SEGSTUDY_TORCH is not set.

Prints the variant on stdout (``default``: PyPI's wheel, CUDA libraries included; ``cpu``: the CPU
build from PyTorch's wheel index) and at most one ``[setup]`` line on stderr saying why:

- an NVIDIA GPU is present (``nvidia-smi -L`` succeeds, or /proc/driver/nvidia exists): ``default``;
- no GPU, and PyTorch's CPU index answers within 5 s: ``cpu`` (several GB less to download);
- no GPU, and the index does not answer: ``default``, with one line saying so.

Standard library only (it runs before the environment exists). Overridable, for tests and mirrors:
SEGSTUDY_TORCH_INDEX_URL (the base of PyTorch's wheel indexes, default
https://download.pytorch.org/whl; the CPU index is <base>/cpu), SEGSTUDY_NVIDIA_SMI (the nvidia-smi
command) and SEGSTUDY_NVIDIA_PROC (the driver's /proc folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

DEFAULT_INDEX = "https://download.pytorch.org/whl"
PROBE_TIMEOUT_S = 5.0


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


def choose() -> tuple[str, str]:
    """(variant, the [setup] line saying why)."""
    if nvidia_gpu_present():
        return "default", "[setup] NVIDIA GPU found: PyPI's default torch build (with CUDA)"
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
