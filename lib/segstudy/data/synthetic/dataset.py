"""A generated street-scene dataset written in the exact layout of Cityscapes, BDD100K or nuImages.

Cityscapes cannot be downloaded here, so every notebook runs on procedurally drawn scenes
(scene.py): a road in perspective with lane markings, sidewalks, facades with windows, walls, fences,
trees, terrain, sky, poles with signs and traffic lights, people, riders and vehicles.
Image, labelIds and instanceIds are drawn with the same polygons, so labels are exact.
Object sizes follow the perspective, which gives Cityscapes-like class imbalance: road,
building, sky and vegetation are large; poles, signs, people and bicycles are small.

Each image depends only on (seed, split, index, layout), so the set is identical for a given seed
whatever the number of worker processes. The BDD100K and nuImages layouts are also other domains
(scene.DOMAINS: camera height and field of view, illumination, palette, JPEG): what the
cross-dataset study measures a model's drop on. layouts.py writes each image, this module the set.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from segstudy.config import SynthConfig
from segstudy.data.synthetic import layouts
from segstudy.errors import UserError
from segstudy.files import exclusive_lock

MARKER = "SYNTH.json"  # written at the dataset root; says "this folder was generated"
# the generator's name in SYNTH.json, as every marker so far records it (the module's name before
# data/synthetic/): generated data stays byte-identical, and _ensure ignores it
GENERATOR = "segstudy.data.synthetic_dataset"


def generate(out: str | Path, cfg: SynthConfig, workers: int = 2, progress: bool = True,
             layout: str = "cityscapes") -> float:
    """Write the dataset to `out` (which must not exist yet) in `layout`; return the seconds it took.

    Writes into a temporary sibling folder and renames it at the end, so an interrupted run
    never leaves a half-written dataset that looks complete.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out or delete it")
    if layout not in layouts.WRITERS:
        raise UserError(f"--layout {layout} is unknown; choose one of {', '.join(layouts.WRITERS)}")
    for key in ("train", "val", "height", "width"):
        if getattr(cfg, key) < (1 if key in ("train", "val") else 32):
            raise UserError(f"synth.{key} = {getattr(cfg, key)} is too small")
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tasks = [(split, i, cfg.height, cfg.width, cfg.seed, str(tmp), layout)
             for split, n in (("train", cfg.train), ("val", cfg.val)) for i in range(n)]
    records: dict[str, list[dict]] = {"train": [], "val": []}
    workers = workers if len(tasks) >= 64 else 1  # starting spawned workers costs more than a few images
    bar = tqdm(total=len(tasks), desc=f"synth {layout}", unit="img", disable=not progress, mininterval=1.0)
    with mp.get_context("spawn").Pool(workers) if workers > 1 else _InProcess() as pool:
        for task, written in zip(tasks, pool.imap(layouts.write_one, tasks, chunksize=8)):
            records[task[0]] += written
            bar.update()
    bar.close()
    if layout == "nuimages":
        for split, rows in records.items():
            layouts.write_nuimages_tables(tmp, split, rows)
    (tmp / MARKER).write_text(json.dumps({"generator": GENERATOR, **asdict(cfg)}
                                         | marker_layout(layout), indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return time.perf_counter() - start


class _InProcess:
    """multiprocessing.Pool's imap, in this process (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def imap(func, tasks, chunksize: int = 1):
        return map(func, tasks)


def marker_layout(layout: str) -> dict:
    """The layout as SYNTH.json records it (absent for Cityscapes: markers written before layouts existed)."""
    return {} if layout == "cityscapes" else {"layout": layout}


def ensure_dataset(root: str | Path, cfg: SynthConfig, workers: int = 2, layout: str = "cityscapes") -> bool:
    """Generate the synthetic dataset at `root` when it is missing; True if it was generated.

    An existing generated dataset made with other settings is an error rather than being
    silently reused, so a profile's numbers always come from the data it describes.
    """
    root = Path(root)
    with generation_lock(root):  # a second first run waits here, then finds the dataset made
        return _ensure(root, cfg, workers, layout)


def generation_lock(root: Path) -> AbstractContextManager[None]:
    """`<root>.lock` beside the dataset, held while it is generated (files.exclusive_lock)."""
    return exclusive_lock(root.with_name(root.name + ".lock"),
                          waiting=f"[segstudy] another process is generating {root}: waiting for it")


def _ensure(root: Path, cfg: SynthConfig, workers: int, layout: str) -> bool:
    marker = root / MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        made.pop("generator", None)
        wanted = asdict(cfg) | marker_layout(layout)
        if made != wanted:
            raise UserError(f"{root} was generated with {made}, but the params ask for "
                            f"{wanted}; delete {root} to regenerate it, or point the root elsewhere")
        return False
    if root.exists() and any(root.iterdir()):
        return False  # a real dataset: the reader validates its layout
    seconds = generate(root, cfg, workers=workers, layout=layout)
    print(f"generated the synthetic {layout}-layout dataset at {root} in {seconds:.1f} s")
    return True
