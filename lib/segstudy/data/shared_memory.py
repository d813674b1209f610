"""Whether /dev/shm holds the batches that the loader workers pass to the training processes.

A DataLoader worker hands each batch to its process in shared memory (files under /dev/shm on
Linux). Docker gives a container 64 MB of it unless it runs with --ipc=host or --shm-size, and a
worker that runs out stops the training mid-epoch ("insufficient shared memory", or a bus error);
check_shared_memory says so before the training starts."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from segstudy.config import Config
from segstudy.errors import UserError

PREFETCH_FACTOR = 2  # batches each worker keeps ready (torch's DataLoader default): build_loader passes it
BYTES_PER_PIXEL = 3 * 4 + 8  # one sample's pixel: a float32 RGB image and its int64 label map
WIDEST_ASPECT = 2.0  # width / height of Cityscapes (2048x1024), the widest dataset (BDD100K, nuImages: 16:9)
GIB = 2**30


def batch_pixels(cfg: Config, ranks: int) -> int:
    """Pixels of the largest batch one process's loader passes: a training batch (its share of
    data.batch_size, crops of data.crop_size) or a validation batch (its share of data.batch_size in
    whole images, the shorter side resized to data.base_size: engine/evaluation.py's eval_loader)."""
    height, width = cfg.data.crop_size
    share = max(cfg.data.batch_size // ranks, 1)
    train = share * height * width
    val = share * cfg.data.base_size * math.ceil(cfg.data.base_size * WIDEST_ASPECT)
    return max(train, val)


def loader_shm_bytes(cfg: Config, num_workers: int | None = None, ranks: int | None = None) -> int:
    """Bytes of /dev/shm the loaders of one machine's `ranks` processes (train.gpus) may hold at once,
    with `num_workers` workers each (data.num_workers)."""
    ranks = cfg.train.gpus if ranks is None else ranks
    workers = cfg.data.num_workers if num_workers is None else num_workers
    if workers == 0:
        return 0  # the process reads its own batches: no shared memory
    # processes x (workers x PREFETCH_FACTOR batches ready + the one the process reads) x the largest
    # batch's pixels x 20 bytes; full on 4 GPUs: 4 x (8 x 2 + 1) x (2 x 1024 x 2048 validation pixels)
    # x 20 B = 5.3 GiB, as on one GPU with 8 images a batch (training batches, 512x1024 crops, need 1/4). Seen so
    # on CPU: 2 workers of batches of 8 at 1024x2048 held (2 x 2 + 1) x 320 MiB = 1600 MiB of /dev/shm
    return ranks * (workers * PREFETCH_FACTOR + 1) * batch_pixels(cfg, ranks) * BYTES_PER_PIXEL


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def check_shared_memory(cfg: Config, folder: str | Path = "/dev/shm", size: int | None = None) -> None:
    """UserError, before any worker starts, when `folder` (the shared memory the workers write to)
    has less room than the loaders of this machine's train.gpus processes need; nothing to check
    without workers (data.num_workers = 0) or without such a folder (macOS). `size`: the folder's
    bytes when the caller knows them, all free (default: what shutil.disk_usage finds)."""
    if cfg.data.num_workers == 0 or not Path(folder).is_dir():
        return
    usage = shutil.disk_usage(folder)
    total, free = (usage.total, usage.free) if size is None else (size, size)
    need = loader_shm_bytes(cfg)
    if need <= free:
        return
    fitting = max(w for w in range(cfg.data.num_workers) if loader_shm_bytes(cfg, num_workers=w) <= free)
    processes = f"{cfg.train.gpus} training process" + ("es" if cfg.train.gpus > 1 else "")
    raise UserError(
        f"{folder} has {_size(free)} free ({_size(total)} in all), but data.num_workers = {cfg.data.num_workers} "
        f"loader workers x {processes} may hold {_size(need)} of batches there; run the container with "
        f"docker run --ipc=host (or --shm-size={math.ceil(need / GIB) + 1}g: 1 GiB spare for NCCL), or lower the "
        f"workers: --set data.num_workers={fitting}")
