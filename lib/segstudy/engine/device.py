"""Where and in what precision the engine runs: the device, the process group under torchrun,
and the autocast dtype."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from segstudy.engine.measure import cpu_info
from segstudy.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device = '{name}' but no CUDA GPU is visible; set device: cpu or auto")
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that have it (fp16 on older ones) and on CPUs with AMX; full precision on
    other CPUs. AVX-512 BF16 alone is not enough: without AMX, bf16 autocast trained at 0.78-0.84x
    the img/s of fp32 (bench_models.py --precisions, docs/results.md)."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_info()["amx_bf16"] else None
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("train.amp = fp16 needs a CUDA GPU; use bf16 on CPU or none")
        return torch.float16
    raise UserError(f"train.amp = '{amp}'; choose auto, none, bf16 or fp16")
