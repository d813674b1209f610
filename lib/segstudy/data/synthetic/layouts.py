"""One generated image written in the exact layout of Cityscapes, BDD100K or nuImages: its file
names, its label files, and nuImages' JSON tables (WRITERS, one per layout; dataset.py writes the set).

The BDD100K and nuImages layouts are also other domains (scene.DOMAINS): each writer receives the
image rendered in its layout's domain (write_one).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from segstudy.data import nuimages
from segstudy.data.labels import TRAIN_ID_TO_LABEL_ID, colorize_label_ids, name_to_train_id, to_train_ids
from segstudy.data.synthetic.scene import DOMAINS, render

JPEG_QUALITY = 90
CITIES = {"train": ["synthburg", "pixelton", "rendermund"], "val": ["valdorf", "testhausen"]}
FRAMES_PER_SEQ = 10

def file_stem(split: str, index: int) -> tuple[str, str]:
    """(city, '{city}_{seq:06d}_{frame:06d}') for image `index` of a split."""
    cities = CITIES[split]
    city = cities[index % len(cities)]
    k = index // len(cities)
    return city, f"{city}_{k // FRAMES_PER_SEQ:06d}_{19 + k % FRAMES_PER_SEQ:06d}"


def write_one(task: tuple[str, int, int, int, int, str, str]) -> list[dict]:
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


def write_nuimages_tables(root: Path, split: str, records: list[dict]) -> None:
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
