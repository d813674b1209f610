"""Datasets by name and deterministic DataLoaders."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from segstudy.config import Config, DataConfig, load_config
from segstudy.data.bdd100k import BDD100KSegmentation
from segstudy.data.cityscapes import CityscapesSegmentation, SegmentationFolder
from segstudy.data.synthetic_dataset import ensure_dataset
from segstudy.data.transforms import eval_preset, train_preset
from segstudy.errors import UserError

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
    return DATASETS[data.dataset](data.root, split, transforms=transforms, max_images=data.max_images,
                                  cache_mb=data.cache_mb)


def prepare_data(cfg: Config) -> None:
    """Generate the synthetic dataset at data.root if the profile asks for it and it is missing."""
    if cfg.data.generate and cfg.data.dataset == "cityscapes":
        _check_generation_root(cfg)
        ensure_dataset(cfg.data.root, cfg.synth)


def _check_generation_root(cfg: Config) -> None:
    """Generate only at the profile's own data.root or into a folder that exists (made on purpose):
    a mistyped root must not quietly become a new synthetic dataset that the study then trains on."""
    root = Path(cfg.data.root)
    if root.exists():
        return
    try:
        default = Path(load_config(cfg.profile).data.root)
    except UserError:
        return  # a profile file outside params/: nothing to compare with
    if root.resolve() != default.resolve():
        raise UserError(f"data.root = {root} does not exist, and data.generate would create a new synthetic "
                        f"dataset there (the profile's own root is {default}); fix the path, or create the empty "
                        f"folder first (mkdir -p {root}) to generate there on purpose")


def check_files(dataset: SegmentationFolder, split: str) -> None:
    """Read the header of every image and label (no pixels are decoded) and compare their sizes,
    so that a corrupt or mismatched file stops a run before it trains, not an epoch in."""
    for sample in dataset.samples:
        sizes = {}
        for kind, path in (("image", sample.image), ("label", sample.label)):
            try:
                with Image.open(path) as im:
                    sizes[kind] = im.size
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(f"{path} ({split} {kind}) is not a readable image ({exc}); replace the file, "
                                f"or regenerate the dataset if it was generated") from None
        if sizes["image"] != sizes["label"]:
            raise UserError(f"size mismatch in the {split} split: image {sample.image} is "
                            f"{sizes['image'][0]}x{sizes['image'][1]} but its label {sample.label} is "
                            f"{sizes['label'][0]}x{sizes['label'][1]}")


class _OneLineErrors(DataLoader):
    """A UserError raised in a worker process reaches the main process wrapped by torch ("Caught
    UserError in DataLoader worker process 0" and the worker's traceback); re-raise its one line."""

    def __iter__(self):
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except UserError as exc:
                text = str(exc)
                if "DataLoader worker" not in text:
                    raise
                raise UserError(text.strip().rsplit("UserError: ", 1)[-1]) from None
            yield batch


class EpochOrder(Sampler[int]):
    """Epoch `epoch`'s shuffled order of `n` samples (a permutation seeded by seed and epoch), this
    process's share of it (items rank, rank + world, ...: together, the ranks' batches make the
    one-process batch), from position `start` on. Written here because DistributedSampler cannot
    start mid-epoch: a training resumed there would replay the epoch's first batches."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        self.indices = order[rank:n - n % world:world][start:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """Sample i is augmented under its own seed (key, i), so its crop, scale and flip do not depend
    on the number of loader workers or processes, nor on where a resumed epoch started."""

    def __init__(self, dataset: Dataset, key: int):
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.key * 1_000_003 + index)
            return self.dataset[index]


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
    return _OneLineErrors(
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
