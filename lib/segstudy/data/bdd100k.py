"""BDD100K semantic segmentation: the same 19 classes, already stored as train ids.

Layout: ROOT/images/10k/{train,val}/NAME.jpg with ROOT/labels/sem_seg/masks/{train,val}/NAME.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segstudy.data.cityscapes import Sample, SegmentationFolder, read_label_array
from segstudy.data.labels import IGNORE_INDEX, MAX_LABEL_ID, NUM_CLASSES
from segstudy.errors import UserError


def bdd100k_samples(root: str | Path, split: str) -> list[Sample]:
    root = Path(root)
    img_dir, mask_dir = root / "images" / "10k" / split, root / "labels" / "sem_seg" / "masks" / split
    for needed in (img_dir, mask_dir):
        if not needed.is_dir():
            raise UserError(f"{root} is not in BDD100K layout: expected the folder {needed} "
                            f"(images/10k/{split}/*.jpg and labels/sem_seg/masks/{split}/*.png)")
    images = sorted(img_dir.glob("*.jpg"))
    if not images:
        raise UserError(f"{img_dir} holds no .jpg images")
    samples = []
    for image in images:
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise UserError(f"image {image} has no label file: expected {mask}")
        samples.append(Sample(image, mask, image.stem))
    return samples


class BDD100KSegmentation(SegmentationFolder):
    def __init__(self, root: str | Path, split: str, transforms=None, max_images: int = 0, cache_mb: int = 0):
        samples = bdd100k_samples(root, split)
        super().__init__(samples[:max_images] if max_images else samples, transforms, cache_mb)

    def load_train_ids(self, sample: Sample) -> np.ndarray:
        arr = read_label_array(sample.label)
        expected = (f"{sample.label} is not a BDD100K sem_seg mask: expected one channel of train ids "
                    f"0..{NUM_CLASSES - 1} or {IGNORE_INDEX}")
        if arr.ndim != 2:
            raise UserError(f"{expected}, found {arr.shape[2]} channels (a colour PNG?); use the masks of "
                            f"BDD100K's labels/sem_seg/masks/")
        values = np.unique(arr)
        if bad := [int(v) for v in values if v >= NUM_CLASSES and v != IGNORE_INDEX]:
            raise UserError(f"{expected}, found {_listed(bad)}; {_what_it_looks_like(values)}")
        return arr.astype(np.uint8)


def _listed(values: list[int], most: int = 8) -> str:
    return ", ".join(map(str, values[:most])) + (f" and {len(values) - most} more" if len(values) > most else "")


def _what_it_looks_like(values: np.ndarray) -> str:
    """The advice for a mask of other ids (255 aside): Cityscapes label ids (0..33) are the usual mix-up."""
    ids = [int(v) for v in values if v != IGNORE_INDEX]
    if max(ids) <= MAX_LABEL_ID:
        return (f"its values {_listed(ids)} look like Cityscapes label ids (0..{MAX_LABEL_ID}): map them to "
                f"train ids (segstudy.data.labels.to_train_ids) or use BDD100K's own sem_seg masks")
    return "use the masks of BDD100K's labels/sem_seg/masks/ (not its colour maps or instance masks)"
