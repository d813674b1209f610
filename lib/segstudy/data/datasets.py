"""Datasets by name and deterministic DataLoaders."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from segstudy.data.bdd100k import BDD100KSegmentation
from segstudy.data.cityscapes import CityscapesSegmentation, SegmentationFolder
from segstudy.config import Config, DataConfig
from segstudy.errors import UserError
from segstudy.data.synthetic_dataset import ensure_dataset
from segstudy.data.transforms import eval_preset, train_preset

DATASETS = {"cityscapes": CityscapesSegmentation, "bdd100k": BDD100KSegmentation}


def build_dataset(data: DataConfig, split: str, train: bool = False,
                  raw: bool = False) -> SegmentationFolder:
    """The dataset `data.dataset` at `data.root`.

    `train` picks the augmenting preset; `raw` applies no transform (uint8 images, train ids).
    """
    if data.dataset not in DATASETS:
        raise UserError(f"data.dataset = '{data.dataset}' is unknown; choose one of "
                        f"{', '.join(DATASETS)}")
    transforms = None
    if not raw:
        transforms = (train_preset(data.base_size, data.crop_size, data.scale_range, data.hflip,
                                   data.color_jitter) if train else eval_preset(data.base_size))
    return DATASETS[data.dataset](data.root, split, transforms=transforms, max_images=data.max_images)


def prepare_data(cfg: Config) -> None:
    """Generate the synthetic dataset at data.root if the profile asks for it and it is missing."""
    if cfg.data.generate and cfg.data.dataset == "cityscapes":
        ensure_dataset(cfg.data.root, cfg.synth)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # Each worker's torch seed is derived from the loader's generator; numpy/random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset: Dataset, batch_size: int, train: bool, seed: int, num_workers: int = 0,
                 device: str = "cpu", sampler=None) -> DataLoader:
    """Shuffled (train) or ordered loader; the same seed gives the same batches and crops."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        pin_memory=str(device).startswith("cuda"),
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
