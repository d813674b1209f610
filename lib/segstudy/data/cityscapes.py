"""The Cityscapes reader: `leftImg8bit/` images with `gtFine/*_labelIds.png`, 34 ids -> 19.

Layout (the official one; the generated dataset is written the same way):
    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segstudy.data import labels
from segstudy.errors import UserError

STEM = re.compile(r"([a-z_]+_\d{6}_\d{6})")
GENERATE_HINT = "generate the default dataset with: segstudy synth --out ROOT (or ./run_all.sh)"


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path
    stem: str  # {city}_{seq}_{frame}: how predictions are matched to ground truth


def cityscapes_samples(root: str | Path, split: str) -> list[Sample]:
    """List image/label pairs of a split, with one clear error for each way the layout is off."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist; point data.root at a Cityscapes "
                        f"folder (with leftImg8bit/ and gtFine/) or {GENERATE_HINT}")
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for needed in (img_dir, gt_dir):
        if not needed.is_dir():
            raise UserError(f"{root} is not in Cityscapes layout: expected the folder {needed} "
                            f"(ROOT/leftImg8bit/{split}/<city>/*_leftImg8bit.png and "
                            f"ROOT/gtFine/{split}/<city>/*_gtFine_labelIds.png); {GENERATE_HINT}")
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise UserError(f"{img_dir} holds no <city>/*_leftImg8bit.png images; {GENERATE_HINT}")
    samples = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        label = gt_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label.is_file():
            raise UserError(f"image {image} has no label file: expected {label} "
                            f"(Cityscapes gtFine '*_gtFine_labelIds.png'; for the official "
                            f"data run cityscapesscripts' createTrainIdLabelImgs is not needed, "
                            f"only the labelIds files)")
        samples.append(Sample(image, label, stem))
    return samples


def read_image(path: Path, header_only: bool = False) -> Image.Image:
    """The image as RGB; with `header_only`, opened and closed without decoding its pixels (its .size)."""
    try:
        with Image.open(path) as im:
            return im if header_only else im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path} is not a readable image (corrupt or truncated: {exc}); "
                        f"replace the file or regenerate the dataset") from exc


def check_label_size(sample: Sample, label_shape: tuple[int, ...], image_size: tuple[int, int],
                     split: str | None = None) -> None:
    """A label (H, W) must have its image's (width, height): the rule of every reader, for a split's check
    before a training (datasets.check_files: `split` named) and for each label read (the label named as
    the odd one: segstudy evaluate blames it, not the prediction)."""
    if tuple(label_shape) == tuple(image_size[::-1]):
        return
    (label_h, label_w), (image_w, image_h) = label_shape[:2], image_size
    fix = "labels must have their image's size: replace the label file, or regenerate the dataset if it was generated"
    if split is not None:
        raise UserError(f"size mismatch in the {split} split: image {sample.image} is {image_w}x{image_h} but its "
                        f"label {sample.label} is {label_w}x{label_h}; {fix}")
    raise UserError(f"size mismatch: ground truth {sample.label} is {label_w}x{label_h} but its image {sample.image} "
                    f"is {image_w}x{image_h}; {fix}")


def read_label_array(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path} is not a readable label PNG (corrupt or truncated: {exc}); "
                        f"replace the file or regenerate the dataset") from exc


def label_ids_to_train_ids(arr: np.ndarray, path: Path) -> np.ndarray:
    """Validate a labelIds array (0..33, or -1 for the license plate) and map it to train ids."""
    if arr.ndim != 2:
        raise UserError(f"{path} has {arr.ndim} dimensions; a *_labelIds.png is a single-channel "
                        f"image of label ids (did you pass the *_color.png?)")
    low, high = int(arr.min()), int(arr.max())
    if low < -1 or high > labels.MAX_LABEL_ID:
        raise UserError(f"{path} holds label ids {low}..{high}, outside 0..{labels.MAX_LABEL_ID} "
                        f"(-1 allowed for license plates); this is not a Cityscapes labelIds file "
                        f"(train-id files '*_labelTrainIds.png' are not read, use the labelIds)")
    arr = np.where(arr < 0, 0, arr).astype(np.uint8)  # license plate (-1) -> ignored, like 0
    return labels.to_train_ids(arr)


class DecodedCache:
    """Decoded (image, train ids) pairs this process keeps, up to a byte budget (`data.cache_mb`);
    once full, further samples are decoded each time. Written here because PNG decoding was 6 of the
    10.5 ms per demo sample (a quarter of a U-Net training step on 2 cores) and every epoch and every
    evaluation decoded the same files again; functools.lru_cache bounds entries, not bytes."""

    def __init__(self):
        self.pairs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.bytes = 0

    def get(self, key: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        return self.pairs.get(key)

    def keep(self, key: tuple, pair: tuple[np.ndarray, np.ndarray], budget: int) -> None:
        size = sum(a.nbytes for a in pair)
        if self.bytes + size <= budget:
            self.pairs[key] = pair
            self.bytes += size


DECODED = DecodedCache()


class SegmentationFolder(Dataset):
    """Image/label pairs -> (tv_tensors.Image uint8, tv_tensors.Mask int64 train ids).
    `cache_mb`: keep up to that many MB of decoded pairs in this process (DECODED), for every
    dataset of the same files."""

    classes: tuple[int, ...] = tuple(range(labels.NUM_CLASSES))  # the train ids it labels: its mIoU's classes

    def __init__(self, samples: list[Sample], transforms=None, cache_mb: int = 0):
        self.samples = samples
        self.transforms = transforms
        self.cache_bytes = cache_mb * 2**20

    def __len__(self) -> int:
        return len(self.samples)

    def load_train_ids(self, sample: Sample) -> np.ndarray:
        return label_ids_to_train_ids(read_label_array(sample.label), sample.label)

    def check_label(self, sample: Sample) -> np.ndarray:
        """The sample's train ids, with every check of its label, those too slow for each load included
        (datasets.check_labels and segstudy evaluate read each label once through it)."""
        return self.load_train_ids(sample)

    def label_size(self, sample: Sample) -> tuple[int, int]:
        """(width, height) of the sample's label, read from its header only."""
        with Image.open(sample.label) as im:
            return im.size

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        sample = self.samples[index]
        image = read_image(sample.image)
        target = self.load_train_ids(sample)
        check_label_size(sample, target.shape, image.size)
        return image, target

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8 image, HxW train ids), from DECODED when it holds them (keyed by the files'
        paths and modification times, so a regenerated file is read again)."""
        sample = self.samples[index]
        key = tuple((p, p.stat().st_mtime_ns) for p in (sample.image, sample.label)) if self.cache_bytes else ()
        if key and (pair := DECODED.get(key)) is not None:
            return pair
        image, target = self.load(index)
        pair = (np.array(image), target)
        if key:
            DECODED.keep(key, pair, self.cache_bytes)
        return pair

    def __getitem__(self, index: int):
        image, target = self.decoded(index)
        # copies: the transforms must never write into a cached array
        img = tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(target.copy()))
        if self.transforms is not None:
            img, mask = self.transforms(img, mask)
        return img, mask


class CityscapesSegmentation(SegmentationFolder):
    def __init__(self, root: str | Path, split: str, transforms=None, max_images: int = 0, cache_mb: int = 0):
        samples = cityscapes_samples(root, split)
        super().__init__(samples[:max_images] if max_images else samples, transforms, cache_mb)
