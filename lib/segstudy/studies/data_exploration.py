"""Dataset statistics for notebook 00: class frequencies, presence, small-object sizes."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from segstudy.data.cityscapes import SegmentationFolder
from segstudy.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, SMALL_CLASSES

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # a wheel touching its frame diagonally is one object


def dataset_stats(dataset: SegmentationFolder, max_images: int = 0, progress: bool = True) -> dict:
    """Scan every image of a split (also validates each file: corrupt, ids, sizes)."""
    n = min(len(dataset), max_images) if max_images else len(dataset)
    pixels = np.zeros(NUM_CLASSES + 1, dtype=np.int64)  # last bin: ignored pixels
    presence = np.zeros(NUM_CLASSES, dtype=np.int64)
    sizes: dict[str, list[int]] = {name: [] for name in SMALL_CLASSES}
    shapes = set()
    for i in tqdm(range(n), desc="scan", unit="img", disable=not progress, mininterval=1.0):
        image, target = dataset.load(i)
        shapes.add((image.height, image.width))
        counts = np.bincount(np.where(target == IGNORE_INDEX, NUM_CLASSES, target).ravel(),
                             minlength=NUM_CLASSES + 1)
        pixels += counts
        presence += counts[:NUM_CLASSES] > 0
        for name in SMALL_CLASSES:
            blobs, k = ndimage.label(target == CLASS_NAMES.index(name), structure=EIGHT_CONNECTED)
            if k:
                sizes[name].extend(np.bincount(blobs.ravel())[1:].tolist())
    labelled = pixels[:NUM_CLASSES].sum()
    return {
        "images": n,
        "image_sizes": sorted(f"{w}x{h}" for h, w in shapes),
        "pixels": dict(zip(CLASS_NAMES, pixels[:NUM_CLASSES].tolist())),
        "ignored_pixels": int(pixels[NUM_CLASSES]),
        "frequency": dict(zip(CLASS_NAMES, (pixels[:NUM_CLASSES] / max(labelled, 1)).tolist())),
        "presence": dict(zip(CLASS_NAMES, (presence / max(n, 1)).tolist())),
        "object_sizes": sizes,
    }


def summary(stats: dict[str, dict]) -> dict:
    """Per split: sizes, the rarest classes and small-object medians (what the JSON keeps)."""
    out = {}
    for split, s in stats.items():
        freq = s["frequency"]
        out[split] = {
            "images": s["images"],
            "image_sizes": s["image_sizes"],
            "ignored_fraction": s["ignored_pixels"] / max(s["ignored_pixels"] + sum(s["pixels"].values()), 1),
            "frequency": freq,
            "presence": s["presence"],
            "classes_present": sum(v > 0 for v in freq.values()),
            "rarest": sorted(freq, key=freq.get)[:5],
            "small_object_median_px": {k: float(np.median(v)) if v else None
                                       for k, v in s["object_sizes"].items()},
            "small_object_count": {k: len(v) for k, v in s["object_sizes"].items()},
        }
    return out


def val_splits(cfg) -> dict[str, SegmentationFolder]:
    """Each dataset of the profile (data.dataset, then cross.*): its val split, untransformed."""
    from segstudy.data.datasets import build_dataset, data_config, dataset_names

    datas = {name: data_config(cfg, name) for name in dataset_names(cfg)}
    return {name: build_dataset(data, data.val_split, raw=True) for name, data in datas.items()}


def side_by_side(datasets: dict[str, SegmentationFolder], summaries: dict[str, dict]) -> pd.DataFrame:
    """One column per dataset: images, sizes, the classes it labels and finds, ignored pixels, rarest."""
    return pd.DataFrame({name: {
        "images (val)": s["images"], "image size": ", ".join(s["image_sizes"]),
        "classes labelled": len(datasets[name].classes), "classes present": s["classes_present"],
        "ignored pixels": f"{s['ignored_fraction']:.1%}",
        "rarest labelled": ", ".join([c for c in sorted(s["frequency"], key=s["frequency"].get)
                                      if CLASS_NAMES.index(c) in datasets[name].classes][:5])}
        for name, s in summaries.items()})
