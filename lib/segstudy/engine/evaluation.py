"""Scoring a model on labelled data: the confusion matrix over a loader (torchvision's
`evaluate`), and `validate`, which scores a model on a profile's validation split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler
from tqdm import tqdm

from segstudy import interrupts
from segstudy.config import Config
from segstudy.data.datasets import build_dataset, build_loader
from segstudy.data.labels import NUM_CLASSES
from segstudy.engine import run_folder
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.engine.metrics import ConfusionMatrix

PREVIEW_IMAGES = 4  # predictions kept for the notebooks' figure (confusion_over's `previews`)


class Shard(Sampler[int]):
    """Items rank, rank + world, ... of `n`: one rank's share of an evaluation, every item exactly once
    over the ranks. Written here because DistributedSampler pads the set to a multiple of the world
    size (3 ranks over 500 images score 2 of them twice) or, with drop_last, leaves its tail out."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset, cfg: Config, device: torch.device, rank: int = 0, world: int = 1):
    """The loader that scores `dataset` in order: with several DDP ranks, this rank's Shard of it, in
    batches of its share of data.batch_size (the global batch, as in training)."""
    sampler = Shard(len(dataset), rank, world) if world > 1 else None
    return build_loader(dataset, max(cfg.data.batch_size // world, 1), train=False, seed=cfg.seed,
                        num_workers=cfg.data.num_workers, device=device.type, sampler=sampler)


@torch.inference_mode()
def confusion_over(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False, progress: bool = False, per_image: bool = False,
                   previews: list[np.ndarray] | None = None) -> ConfusionMatrix:
    """The confusion matrix of `model` over `loader` (reduced over DDP ranks); with per_image, each
    image's matrix too (cm.per_image; under DDP gathered from a Shard loader, in dataset order). `previews`: a list
    that receives the predicted train ids (uint8) of the loader's first PREVIEW_IMAGES images."""
    model.eval()
    cm = ConfusionMatrix(NUM_CLASSES, device=device, per_image=per_image)
    for image, target in tqdm(loader, desc="val", leave=False, disable=not progress, mininterval=2.0):
        interrupts.check()
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = model(image)["out"].argmax(1)
        cm.update(target, pred)
        if previews is not None and len(previews) < PREVIEW_IMAGES:
            previews += list(pred[:PREVIEW_IMAGES - len(previews)].to(torch.uint8).cpu().numpy())
    shard = loader.sampler.indices if isinstance(loader.sampler, Shard) else None
    cm.reduce_from_all_processes(shard)
    return cm


def validate(model: nn.Module, cfg: Config, *, amp: str = "none", channels_last: bool = False,
             per_image: bool = False) -> dict:
    """Score a model on cfg's validation split (CPU or cfg.device): ConfusionMatrix.compute(), plus
    "per_image" (np.ndarray [N, C, C + 1], one matrix per validation image) when asked."""
    device = resolve_device(cfg.device)
    val_ds = build_dataset(cfg.data, cfg.data.val_split)
    loader = eval_loader(val_ds, cfg, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cm = confusion_over(model, loader, device, autocast_dtype(amp, device), channels_last, per_image=per_image)
    return cm.compute() | ({"per_image": cm.per_image} if per_image else {})


def from_training(run_dir: Path, cfg: Config, *, amp: str = "none", channels_last: bool = False) -> dict | None:
    """validate(per_image=True) of the run's checkpoint_best.pt, read instead of computed: its training
    validated those weights (the best epoch) and kept each image's confusions. Only when that
    validation was the same: the run's settings are cfg's (data, precision), cfg.train's amp and
    channels_last are these, no torch.compile. Saves a pass over the validation set (12-20 s per
    image at 2048x1024 on 2 cores); None when it would not be the same."""
    result = run_folder.finished_result(Path(run_dir))
    path = Path(run_dir) / run_folder.CONFUSIONS
    if not result or not path.is_file() or cfg.train.compile:
        return None
    device = resolve_device(cfg.device)
    model_cfg = dataclasses.replace(cfg.model, name=result["model"])
    same = (not run_folder.changed_settings(result["settings"], run_folder.settings(cfg, model_cfg))
            and autocast_dtype(amp, device) == autocast_dtype(cfg.train.amp, device)
            and channels_last == cfg.train.channels_last)
    if not same:
        return None
    cm = ConfusionMatrix.from_per_image(np.load(path))
    return cm.compute() | {"per_image": cm.per_image}
