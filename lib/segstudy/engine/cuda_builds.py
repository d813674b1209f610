"""The CUDA builds of the locked torch and the NVIDIA driver each one needs, and the driver this
machine has. Standard library only: scripts/torch_variant.py loads this file by its path before the
environment (and torch) exists, to choose the build; engine/device.py uses it to explain a GPU that
torch cannot use."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

# PyTorch publishes torch 2.14 for CUDA 12.6, 13.0 and 13.2 (the 2.14 support matrix,
# github.com/pytorch/pytorch/pull/194367; 12.8 was dropped in 2.12, issue 178665); PyPI's wheel, the
# lock's `default`, is the CUDA 13.0 one (nvidia-cuda-runtime 13.0 in requirements.lock), so
# `default` stands for 13.x and cu126 for 12.x. Minimum Linux drivers from NVIDIA's CUDA
# Compatibility guide ("Minor Version Compatibility") and the CUDA Toolkit release notes' driver
# table: a CUDA 13.x build runs on >= 580, a 12.x build on >= 525.60.13 (natively from 560.28.03,
# the 12.6 toolkit's driver).


@dataclass(frozen=True)
class CudaBuild:
    variant: str     # the SEGSTUDY_TORCH value that installs it (scripts/setup_env.sh)
    cuda: str        # its torch.version.cuda
    min_driver: str  # the oldest NVIDIA Linux driver it runs on


BUILDS = (CudaBuild("default", "13.0", "580"), CudaBuild("cu126", "12.6", "525.60.13"))  # newest first


def driver_tuple(version: str) -> tuple[int, ...]:
    """'570.86.15' -> (570, 86, 15); ValueError for anything else."""
    return tuple(int(part) for part in version.strip().split("."))


def driver_version() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (SEGSTUDY_NVIDIA_SMI names another
    command), or None without a driver, a GPU or nvidia-smi."""
    command = [os.environ.get("SEGSTUDY_NVIDIA_SMI", "nvidia-smi"), "--query-gpu=driver_version",
               "--format=csv,noheader"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()  # one line per GPU, all the same driver
    if result.returncode != 0 or not lines:
        return None
    try:
        driver_tuple(lines[0])
    except ValueError:
        return None
    return lines[0]


def build_for_driver(driver: str) -> CudaBuild | None:
    """The newest build that `driver` runs, or None when it is older than every build needs."""
    return next((b for b in BUILDS if driver_tuple(driver) >= driver_tuple(b.min_driver)), None)


def build_for_cuda(cuda: str) -> CudaBuild | None:
    """The build family of a torch.version.cuda ('13.0' -> the 13.x one), or None for another major."""
    return next((b for b in BUILDS if b.cuda.split(".")[0] == cuda.split(".")[0]), None)
