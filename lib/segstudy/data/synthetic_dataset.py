"""A generated street-scene dataset written in the exact Cityscapes layout.

Cityscapes cannot be downloaded here, so every notebook runs on procedurally drawn scenes
(synthetic_scene.py): a road in perspective with lane markings, sidewalks, facades with windows, walls, fences,
trees, terrain, sky, poles with signs and traffic lights, people, riders and vehicles.
Image, labelIds and instanceIds are drawn with the same polygons, so labels are exact.
Object sizes follow the perspective, which gives Cityscapes-like class imbalance: road,
building, sky and vegetation are large; poles, signs, people and bicycles are small.

Each image depends only on (seed, split, index), so the set is identical for a given seed
whatever the number of worker processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from segstudy.config import SynthConfig
from segstudy.data.labels import colorize_label_ids
from segstudy.data.synthetic_scene import render
from segstudy.errors import UserError
from segstudy.files import exclusive_lock

MARKER = "SYNTH.json"  # written at the dataset root; says "this folder was generated"
CITIES = {"train": ["synthburg", "pixelton", "rendermund"], "val": ["valdorf", "testhausen"]}
FRAMES_PER_SEQ = 10

def file_stem(split: str, index: int) -> tuple[str, str]:
    """(city, '{city}_{seq:06d}_{frame:06d}') for image `index` of a split."""
    cities = CITIES[split]
    city = cities[index % len(cities)]
    k = index // len(cities)
    return city, f"{city}_{k // FRAMES_PER_SEQ:06d}_{19 + k % FRAMES_PER_SEQ:06d}"


def _write_one(task: tuple[str, int, int, int, int, str]) -> None:
    split, index, h, w, seed, root = task
    rgb, lab, inst = render(h, w, seed, split, index)
    city, stem = file_stem(split, index)
    img_dir = Path(root, "leftImg8bit", split, city)
    gt_dir = Path(root, "gtFine", split, city)
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(img_dir / f"{stem}_leftImg8bit.png", compress_level=1)
    Image.fromarray(lab).save(gt_dir / f"{stem}_gtFine_labelIds.png")
    Image.fromarray(inst).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    Image.fromarray(colorize_label_ids(lab)).save(gt_dir / f"{stem}_gtFine_color.png")


def generate(out: str | Path, cfg: SynthConfig, workers: int = 2, progress: bool = True) -> float:
    """Write the dataset to `out` (which must not exist yet); return the seconds it took.

    Writes into a temporary sibling folder and renames it at the end, so an interrupted run
    never leaves a half-written dataset that looks complete.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out or delete it")
    for key in ("train", "val", "height", "width"):
        if getattr(cfg, key) < (1 if key in ("train", "val") else 32):
            raise UserError(f"synth.{key} = {getattr(cfg, key)} is too small")
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tasks = [(split, i, cfg.height, cfg.width, cfg.seed, str(tmp))
             for split, n in (("train", cfg.train), ("val", cfg.val)) for i in range(n)]
    bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress, mininterval=1.0)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, tasks, chunksize=8):
                bar.update()
    else:
        for task in tasks:
            _write_one(task)
            bar.update()
    bar.close()
    (tmp / MARKER).write_text(json.dumps({"generator": "segstudy.data.synthetic_dataset", **asdict(cfg)}, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return time.perf_counter() - start


def ensure_dataset(root: str | Path, cfg: SynthConfig, workers: int = 2) -> bool:
    """Generate the synthetic dataset at `root` when it is missing; True if it was generated.

    An existing generated dataset made with other settings is an error rather than being
    silently reused, so a profile's numbers always come from the data it describes.
    """
    root = Path(root)
    with generation_lock(root):  # a second first run waits here, then finds the dataset made
        return _ensure(root, cfg, workers)


def generation_lock(root: Path) -> AbstractContextManager[None]:
    """`<root>.lock` beside the dataset, held while it is generated (files.exclusive_lock)."""
    return exclusive_lock(root.with_name(root.name + ".lock"),
                          waiting=f"[segstudy] another process is generating {root}: waiting for it")


def _ensure(root: Path, cfg: SynthConfig, workers: int) -> bool:
    marker = root / MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        made.pop("generator", None)
        if made != asdict(cfg):
            raise UserError(f"{root} was generated with {made}, but the params ask for "
                            f"{asdict(cfg)}; delete {root} to regenerate it, or point "
                            f"data.root elsewhere")
        return False
    if root.exists() and any(root.iterdir()):
        return False  # a real dataset: the reader validates its layout
    seconds = generate(root, cfg, workers=workers)
    print(f"generated the synthetic Cityscapes-layout dataset at {root} in {seconds:.1f} s")
    return True
