"""A generated street-scene dataset written in the exact layout of Cityscapes, BDD100K or nuImages.

Cityscapes cannot be downloaded here, so every notebook runs on procedurally drawn scenes
(synthetic_scene.py): a road in perspective with lane markings, sidewalks, facades with windows, walls, fences,
trees, terrain, sky, poles with signs and traffic lights, people, riders and vehicles.
Image, labelIds and instanceIds are drawn with the same polygons, so labels are exact.
Object sizes follow the perspective, which gives Cityscapes-like class imbalance: road,
building, sky and vegetation are large; poles, signs, people and bicycles are small.

Each image depends only on (seed, split, index, layout), so the set is identical for a given seed
whatever the number of worker processes. The BDD100K and nuImages layouts are also other domains
(synthetic_scene.DOMAINS: camera height and field of view, illumination, palette, JPEG): what the
cross-dataset study measures a model's drop on.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from segstudy.config import SynthConfig
from segstudy.data import nuimages
from segstudy.data.labels import TRAIN_ID_TO_LABEL_ID, colorize_label_ids, name_to_train_id, to_train_ids
from segstudy.data.synthetic_scene import DOMAINS, render
from segstudy.errors import UserError
from segstudy.files import exclusive_lock

MARKER = "SYNTH.json"  # written at the dataset root; says "this folder was generated"
LAYOUTS = tuple(DOMAINS)  # cityscapes, bdd100k, nuimages
JPEG_QUALITY = 90
CITIES = {"train": ["synthburg", "pixelton", "rendermund"], "val": ["valdorf", "testhausen"]}
FRAMES_PER_SEQ = 10

def file_stem(split: str, index: int) -> tuple[str, str]:
    """(city, '{city}_{seq:06d}_{frame:06d}') for image `index` of a split."""
    cities = CITIES[split]
    city = cities[index % len(cities)]
    k = index // len(cities)
    return city, f"{city}_{k // FRAMES_PER_SEQ:06d}_{19 + k % FRAMES_PER_SEQ:06d}"


def _write_one(task: tuple[str, int, int, int, int, str, str]) -> list[dict]:
    split, index, h, w, seed, root, layout = task
    rgb, lab, inst = render(h, w, seed, split, index, DOMAINS[layout])
    return WRITERS[layout](Path(root), split, index, seed, rgb, lab, inst)


def _write_cityscapes(root: Path, split: str, index: int, seed: int, rgb, lab, inst) -> list[dict]:
    city, stem = file_stem(split, index)
    img_dir = Path(root, "leftImg8bit", split, city)
    gt_dir = Path(root, "gtFine", split, city)
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(img_dir / f"{stem}_leftImg8bit.png", compress_level=1)
    Image.fromarray(lab).save(gt_dir / f"{stem}_gtFine_labelIds.png")
    Image.fromarray(inst).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    Image.fromarray(colorize_label_ids(lab)).save(gt_dir / f"{stem}_gtFine_color.png")
    return []


def _write_bdd100k(root: Path, split: str, index: int, seed: int, rgb, lab, inst) -> list[dict]:
    """images/10k/<split>/<name>.jpg and labels/sem_seg/masks/<split>/<name>.png (train ids, 255)."""
    name = _token(seed, split, index)[:17].replace("-", "")
    name = f"{name[:8]}-{name[8:16]}"  # BDD100K's names: two groups of 8 hex digits
    img_dir, mask_dir = root / "images" / "10k" / split, root / "labels" / "sem_seg" / "masks" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(img_dir / f"{name}.jpg", quality=JPEG_QUALITY)
    Image.fromarray(to_train_ids(lab)).save(mask_dir / f"{name}.png")
    return []


def _token(*parts) -> str:
    """A stable 32-hex-digit token, as nuImages' records have."""
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


NUIMAGES_CATEGORY = {  # the category each generated class is annotated as (one per class)
    "road": "flat.driveable_surface", "person": "human.pedestrian.adult", "car": "vehicle.car",
    "truck": "vehicle.truck", "bus": "vehicle.bus.rigid", "motorcycle": "vehicle.motorcycle",
    "bicycle": "vehicle.bicycle",
}


def _write_nuimages(root: Path, split: str, index: int, seed: int, rgb, lab, inst) -> list[dict]:
    """samples/CAM_FRONT/<name>.jpg, and the image's sample_data and annotation records (returned: the
    parent writes the tables). Each object is one instance mask, the road one surface mask."""
    sd_token = _token(seed, split, index, "sample_data")
    filename = f"samples/CAM_FRONT/n000-synth-{split}__CAM_FRONT__{1_500_000_000_000_000 + index}.jpg"
    (root / filename).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    (root / filename).write_bytes(buffer.getvalue())
    h, w = lab.shape
    records = [{"table": "sample_data", "token": sd_token, "sample_token": _token(seed, split, index, "sample"),
                "filename": filename, "fileformat": "jpg", "width": w, "height": h,
                "timestamp": 1_500_000_000_000_000 + index, "is_key_frame": True}]
    train = to_train_ids(lab)
    for name, category in NUIMAGES_CATEGORY.items():
        label_id = int(TRAIN_ID_TO_LABEL_ID[name_to_train_id(name)])
        if category.startswith("flat."):
            masks = [train == name_to_train_id(name)]
            table = "surface_ann"
        else:
            masks = [inst == i for i in np.unique(inst[lab == label_id]) if i >= 1000]
            table = "object_ann"
        for k, mask in enumerate(m for m in masks if m.any()):
            ys, xs = np.nonzero(mask)
            records.append({"table": table, "token": _token(sd_token, category, k), "sample_data_token": sd_token,
                            "category_token": _token("category", category), "attribute_tokens": [],
                            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                            "mask": nuimages.mask_encode(mask)})
    return records


def _write_nuimages_tables(root: Path, split: str, records: list[dict]) -> None:
    folder = nuimages.split_folder(root, split)
    folder.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[dict]] = {name: [] for name in nuimages.TABLES}
    tables["category"] = [{"token": _token("category", c), "name": c, "description": ""}
                          for c in (*nuimages.NUIMAGES_TO_TRAIN, *nuimages.UNMAPPED)]
    for record in records:
        table = record.pop("table")
        tables[table].append(record)
    for name, rows in tables.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))


WRITERS = {"cityscapes": _write_cityscapes, "bdd100k": _write_bdd100k, "nuimages": _write_nuimages}


def generate(out: str | Path, cfg: SynthConfig, workers: int = 2, progress: bool = True,
             layout: str = "cityscapes") -> float:
    """Write the dataset to `out` (which must not exist yet) in `layout`; return the seconds it took.

    Writes into a temporary sibling folder and renames it at the end, so an interrupted run
    never leaves a half-written dataset that looks complete.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out or delete it")
    if layout not in WRITERS:
        raise UserError(f"--layout {layout} is unknown; choose one of {', '.join(WRITERS)}")
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
        for task, written in zip(tasks, pool.imap(_write_one, tasks, chunksize=8)):
            records[task[0]] += written
            bar.update()
    bar.close()
    if layout == "nuimages":
        for split, rows in records.items():
            _write_nuimages_tables(tmp, split, rows)
    (tmp / MARKER).write_text(json.dumps({"generator": "segstudy.data.synthetic_dataset", **asdict(cfg)}
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
