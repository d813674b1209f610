"""Where and in what precision the engine runs: the device, the process group under torchrun,
and the autocast dtype."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from segstudy.engine import cuda_builds
from segstudy.engine.measure import cpu_info
from segstudy.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device = '{name}' but torch can use no CUDA GPU: {why_no_cuda()}")
    return torch.device(name)


def why_no_cuda() -> str:
    """Why torch.cuda.is_available() is False, and the fix: no driver, a CPU build of torch, a CUDA
    build newer than the driver runs, or GPUs hidden from the process."""
    driver = cuda_builds.driver_version()
    if driver is None:
        return ("nvidia-smi reports no NVIDIA driver or GPU here (in Docker: docker run --gpus all); "
                "run on a GPU machine, or set device: cpu or auto")
    built = cuda_builds.build_for_cuda(torch.version.cuda) if torch.version.cuda else None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU build, and this machine has NVIDIA driver {driver}"
    elif built and cuda_builds.driver_tuple(driver) < cuda_builds.driver_tuple(built.min_driver):
        problem = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs NVIDIA driver "
                   f">= {built.min_driver}, and this one is {driver}")
    else:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"NVIDIA driver {driver} runs this torch's CUDA {torch.version.cuda}, yet torch finds no GPU"
                + (f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None else "")
                + "; check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or set device: cpu or auto")
    fitting = cuda_builds.build_for_driver(driver)
    if fitting is None:
        oldest = cuda_builds.BUILDS[-1]
        return (f"{problem}; update the driver to >= {oldest.min_driver}, then reinstall from the repository root: "
                f"SEGSTUDY_TORCH={oldest.variant} ./scripts/setup_env.sh")
    return (f"{problem}; reinstall torch's build for this driver from the repository root: "
            f"SEGSTUDY_TORCH={fitting.variant} ./scripts/setup_env.sh (a Docker image: build it with "
            f"--build-arg SEGSTUDY_TORCH={fitting.variant})")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def cpu_trains_bf16_faster(info: dict | None = None) -> bool:
    """The CPU kinds where bf16 autocast trains faster than fp32, as measured side by side
    (`benchmarks/bench_models.py --precisions none bf16`, docs/results.md "Which precision trains
    fastest on a CPU?"): those with AMX, and AMD's with AVX-512 BF16 (Zen 4, Zen 5). An Intel Xeon
    with AVX-512 BF16 but no AMX trained slower in bf16; a CPU without AVX-512 BF16 emulates it."""
    info = info or cpu_info()
    return info["amx_bf16"] or (info["avx512_bf16"] and info.get("vendor") == "AuthenticAMD")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that run it natively (Ampere and newer), fp16 on older ones (V100, T4:
    torch emulates bf16 there, slowly; the training scales fp16 losses with GradScaler); on CPUs,
    `cpu_trains_bf16_faster`."""
    if amp == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
        return torch.bfloat16 if cpu_trains_bf16_faster() else None
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("train.amp = fp16 needs a CUDA GPU; use bf16 on CPU or none")
        return torch.float16
    raise UserError(f"train.amp = '{amp}'; choose auto, none, bf16 or fp16")
