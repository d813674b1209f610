"""Datasets by name (the profile's: data.dataset and cross.*), a training set mixing several, and
deterministic DataLoaders."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from tqdm import tqdm

from segstudy.config import Config, DataConfig, SynthConfig
from segstudy.config_paths import unset_variable
from segstudy.data.bdd100k import BDD100KSegmentation
from segstudy.data.cityscapes import CityscapesSegmentation, SegmentationFolder, check_label_size
from segstudy.data.nuimages import NuImagesSegmentation
from segstudy.data.shared_memory import PREFETCH_FACTOR
from segstudy.data.synthetic.dataset import ensure_dataset
from segstudy.data.transforms import eval_preset, train_preset
from segstudy.errors import UserError
from segstudy.files import write_text

DATASETS = {"cityscapes": CityscapesSegmentation, "bdd100k": BDD100KSegmentation, "nuimages": NuImagesSegmentation}


def dataset_names(cfg: Config) -> list[str]:
    """The profile's datasets: data.dataset first, then each cross.<name> with a root."""
    return [cfg.data.dataset] + [n for n in DATASETS if n != cfg.data.dataset and getattr(cfg.cross, n).root]


def training_datasets(cfg: Config) -> list[str]:
    """The datasets a training of cfg reads: data.dataset, then those of data.mix_with."""
    return [cfg.data.dataset] + [n for n in cfg.data.mix_with if n != cfg.data.dataset]


def leaving_out(cfg: Config, names: list[str]) -> dict[str, Any]:
    """The overrides that leave datasets `names` out of the profile: their cross roots emptied, and
    cross.mix without them (a mixed training of a dataset that is not there cannot run)."""
    overrides: dict[str, Any] = {f"cross.{n}.root": "" for n in names}
    if any(n in cfg.cross.mix for n in names):
        overrides["cross.mix"] = [m for m in cfg.cross.mix if m not in names]
    return overrides


def as_set_arguments(overrides: dict[str, Any]) -> str:
    """`--set k=v ...` as a shell takes it (quoted where the shell would read a character itself)."""
    values = (yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
              if not isinstance(v, str) else v for v in overrides.values())
    return "--set " + " ".join(shlex.quote(f"{k}={v}") for k, v in zip(overrides, values))


def unset_datasets(cfg: Config) -> tuple[dict[str, Any], str]:
    """The profile's other datasets whose root names an environment variable that is not set (a GPU
    box with only CITYSCAPES_ROOT exported): the overrides that leave them out of a run, and the one
    line that says so and how to include them; ({}, "") when every root resolves."""
    unset = {n: v for n in DATASETS if n != cfg.data.dataset and (v := unset_variable(getattr(cfg.cross, n).root))}
    if not unset:
        return {}, ""
    overrides = leaving_out(cfg, list(unset))
    exports = "; ".join(f"export {v}=/data/{n}" for n, v in unset.items())
    line = (f"[segstudy] {' and '.join(unset.values())} not set: {', '.join(unset)} left out of this run, as with "
            f"{as_set_arguments(overrides)} (to include {'them' if len(unset) > 1 else 'it'}: {exports})")
    return overrides, line


def data_config(cfg: Config, name: str) -> DataConfig:
    """cfg.data for dataset `name`: its reader and root, the profile's transforms and loader settings."""
    if name == cfg.data.dataset:
        return cfg.data
    other = getattr(cfg.cross, name, None)
    if other is None or not other.root:
        named = " (cross.mix names it: remove it there too to leave it out)" if name in cfg.cross.mix else ""
        raise UserError(f"dataset '{name}' is not part of profile {cfg.profile}: set cross.{name}.root to its "
                        f"folder (or data.dataset: {name}){named}")
    if variable := unset_variable(other.root):
        raise UserError(f"cross.{name}.root = {other.root!r} uses the environment variable {variable}, which is "
                        f"not set; export it (export {variable}=/data/{name}), or leave {name} out of the study "
                        f"with {as_set_arguments(leaving_out(cfg, [name]))}")
    return dataclasses.replace(cfg.data, dataset=name, root=other.root, generate=other.generate, mix_with=[])


def synth_config(cfg: Config, name: str) -> SynthConfig:
    """The generated set of dataset `name`: synth's settings, with the dataset's own size and counts."""
    if name == cfg.data.dataset:
        return cfg.synth
    other = getattr(cfg.cross, name)
    return dataclasses.replace(cfg.synth, **{k: getattr(other, k) for k in ("height", "width", "train", "val")
                                            if getattr(other, k)})


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


# The generated datasets prepare_data found ready in this process: (layout, root, generation settings).
# A set rather than functools.cache because one whose folder was emptied or removed since (by a test, by
# the user) is prepared again.
_READY: set[tuple] = set()


def prepare_data(cfg: Config, names: list[str] | None = None) -> list[str]:
    """Generate each of datasets `names` (default: all the profile's) whose `generate` is set and which
    is missing; only these datasets' roots are resolved (a training needs no other dataset's). Returns
    the datasets it checked: one this process found ready before (the same layout, root and settings,
    its folder not empty) is not checked again, so a notebook's call and each of its trainings' do the
    work once."""
    checked = []
    for name in dataset_names(cfg) if names is None else names:
        data = data_config(cfg, name)
        if not data.generate:
            continue
        synth = synth_config(cfg, name)
        ready = (name, str(Path(data.root).resolve()), dataclasses.astuple(synth))
        if ready in _READY and _has_files(Path(data.root)):
            continue
        _check_generation_root(cfg, name)
        ensure_dataset(data.root, synth, layout=name)
        _READY.add(ready)
        checked.append(name)
    return checked


def _has_files(root: Path) -> bool:
    return root.is_dir() and any(root.iterdir())


def _root_key(cfg: Config, name: str) -> str:
    return "data.root" if name == cfg.data.dataset else f"cross.{name}.root"


def _check_generation_root(cfg: Config, name: str) -> None:
    """Generate only at the profile's own root (Config.profile_roots, recorded at load) or into a folder
    that exists (made on purpose): a mistyped root must not quietly become a new synthetic dataset that
    the study then trains on."""
    root = Path(data_config(cfg, name).root)
    key = _root_key(cfg, name)
    own = cfg.profile_roots.get(key)
    if root.exists() or own is None:  # None: the profile file names no root there, nothing to compare with
        return
    if root.resolve() != Path(own).resolve():
        raise UserError(f"{key} = {root} does not exist, and {key.removesuffix('root')}generate would create a new "
                        f"synthetic dataset there (the profile's own root is {own}); fix the path, or create the "
                        f"empty folder first (mkdir -p {root}) to generate there on purpose")


class MixedDatasets(ConcatDataset):
    """The training sets of several datasets in one training (data.mix_with). The sampling rule: an
    epoch draws as many images as the first dataset's (data.dataset's) training set holds, so a mixed
    training takes as many iterations as the same training on that dataset alone. With `equal`, each
    dataset gives the same share of them (the remainder to the first ones), whatever its size; with
    `proportional`, shares follow the datasets' sizes. A share is drawn without replacement from a
    permutation seeded by (seed, epoch) (a new permutation when a smaller dataset runs out), and the
    draws of all datasets are then shuffled together, so each batch mixes datasets."""

    def __init__(self, parts: list[SegmentationFolder], sampling: str):
        super().__init__(parts)
        self.parts, self.sampling = parts, sampling

    @property
    def epoch_size(self) -> int:
        return len(self.parts[0])

    def shares(self) -> list[int]:
        n, sizes = self.epoch_size, [len(p) for p in self.parts]
        weights = [1.0] * len(sizes) if self.sampling == "equal" else [float(s) for s in sizes]
        exact = [n * w / sum(weights) for w in weights]
        shares = [int(e) for e in exact]
        for i in sorted(range(len(sizes)), key=lambda i: (shares[i] - exact[i], i))[: n - sum(shares)]:
            shares[i] += 1  # largest remainders first, ties to the first datasets
        return shares

    def order(self, seed: int, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        picks: list[int] = []
        for offset, size, share in zip(self.cumulative_sizes, map(len, self.parts), self.shares()):
            drawn: list[int] = []
            while len(drawn) < share:
                drawn += torch.randperm(size, generator=generator).tolist()
            picks += [offset - size + j for j in drawn[:share]]
        return [picks[j] for j in torch.randperm(len(picks), generator=generator).tolist()]


def training_set(cfg: Config) -> SegmentationFolder | MixedDatasets:
    """data.dataset's training split, mixed with those of data.mix_with (MixedDatasets) when it names any."""
    datas = [data_config(cfg, name) for name in training_datasets(cfg)]
    parts = [build_dataset(data, data.train_split, train=True) for data in datas]
    return parts[0] if len(parts) == 1 else MixedDatasets(parts, cfg.data.sampling)


def parts(dataset: Dataset) -> list[SegmentationFolder]:
    return dataset.parts if isinstance(dataset, MixedDatasets) else [dataset]


def epoch_size(dataset: Dataset) -> int:
    """Images per training epoch (MixedDatasets: its first dataset's)."""
    return dataset.epoch_size if isinstance(dataset, MixedDatasets) else len(dataset)


def check_files(dataset: SegmentationFolder, split: str) -> None:
    """Read the header of every image and label (no pixels are decoded) and compare their sizes,
    so that a corrupt or mismatched file stops a run before it trains, not an epoch in."""
    for sample in dataset.samples:
        sizes = {}
        for kind, path in (("image", sample.image), ("label", sample.label)):
            try:
                if kind == "label":
                    sizes[kind] = dataset.label_size(sample)
                    continue
                with Image.open(path) as im:
                    sizes[kind] = im.size
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(f"{path} ({split} {kind}) is not a readable image ({exc}); replace the file, "
                                f"or regenerate the dataset if it was generated") from None
        check_label_size(sample, sizes["label"][::-1], sizes["image"], split)


def check_labels(dataset: SegmentationFolder, split: str, cache_dir: str | Path) -> None:
    """Decode every label of the split once, so that ids outside the dataset's set (or a broken
    annotation) stop a training before it starts rather than an epoch in; a split found clean is
    remembered by its files' names and modification times (`cache_dir`/labels_<hash>.ok)."""
    digest = hashlib.sha1(type(dataset).__name__.encode())
    for sample in dataset.samples:
        digest.update(f"{sample.image}|{sample.stem}|{sample.label.stat().st_mtime_ns}\n".encode())
    stamp = Path(cache_dir) / f"labels_{digest.hexdigest()[:16]}.ok"
    if stamp.is_file():
        return
    for sample in tqdm(dataset.samples, desc=f"check {split} labels", unit="img", mininterval=2.0,
                       disable=len(dataset.samples) < 500):
        dataset.check_label(sample)  # raises the reader's one-line error naming the file
    write_text(stamp, f"{len(dataset.samples)} labels of {split} checked\n")


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


class EpochOrder(Sampler[tuple[int, int]]):
    """A training set's order for one epoch at a time (set_epoch): a permutation seeded by (seed, epoch)
    (MixedDatasets.order for a mixed set), this process's share of it (items rank, rank + world, ...:
    together, the ranks' batches make the one-process batch), from position `start` on. It yields
    (epoch key, index) pairs, the key telling SeededSamples which epoch's augmentation to draw, so one
    DataLoader and its persistent workers serve every epoch. Written here because DistributedSampler
    cannot start mid-epoch: a training resumed there would replay the epoch's first batches."""

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world: int = 1):
        self.dataset, self.seed, self.rank, self.world = dataset, seed, rank, world
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if isinstance(self.dataset, MixedDatasets):
            order = self.dataset.order(self.seed, epoch)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        n = len(order)
        self.key = self.seed * 1000 + epoch
        self.indices = order[self.rank:n - n % self.world:self.world][start:]

    def __iter__(self):
        return ((self.key, index) for index in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """Item (key, i) is sample i augmented under its own seed (key, i), so its crop, scale and flip do
    not depend on the number of loader workers or processes, nor on where a resumed epoch started."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        key, index = item
        with torch.random.fork_rng(devices=[]):
            # the CPU generator, which the transforms draw from, alone: torch.manual_seed also queues a
            # seed for each accelerator API with a formatted stack, a third of a sample's cost
            torch.default_generator.manual_seed(key * 1_000_003 + index)
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
        prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,  # what check_shared_memory counts
    )
