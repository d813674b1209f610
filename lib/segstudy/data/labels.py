"""The 19 Cityscapes training classes, taken from cityscapesscripts' official label table.

Nothing here is typed by hand: ids, train ids, names, colours and categories all come from
`cityscapesscripts.helpers.labels`, so the mapping is the one the benchmark uses.
"""

from __future__ import annotations

import numpy as np
import torch
from cityscapesscripts.helpers.labels import id2label, labels

IGNORE_INDEX = 255

# Evaluated classes in train-id order (0..18).
_TRAIN_LABELS = sorted((lb for lb in labels if 0 <= lb.trainId < IGNORE_INDEX), key=lambda lb: lb.trainId)
NUM_CLASSES = len(_TRAIN_LABELS)
CLASS_NAMES: list[str] = [lb.name for lb in _TRAIN_LABELS]
CLASS_CATEGORIES: list[str] = [lb.category for lb in _TRAIN_LABELS]
PALETTE = np.array([lb.color for lb in _TRAIN_LABELS], dtype=np.uint8)  # (19, 3)
TRAIN_ID_TO_LABEL_ID = np.array([lb.id for lb in _TRAIN_LABELS], dtype=np.uint8)
# The same as a 256-entry table: anything outside 0..18 (255 = ignored) -> 0 "unlabeled"
_TRAIN_ID_LUT = np.zeros(256, dtype=np.uint8)
_TRAIN_ID_LUT[:NUM_CLASSES] = TRAIN_ID_TO_LABEL_ID
LABEL_ID_TO_COLOR = {lb.id: lb.color for lb in labels if lb.id >= 0}
HAS_INSTANCES: list[bool] = [lb.hasInstances for lb in _TRAIN_LABELS]

# Label ids that may appear in a gtFine *_labelIds.png (0..33; -1 "license plate" only exists
# in the instance annotations and cannot be stored in a uint8 PNG).
MAX_LABEL_ID = max(lb.id for lb in labels)

# Lookup table labelId -> trainId; every id that is not one of the 19 classes maps to 255.
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lb in labels:
    if _lb.id >= 0:
        ID_TO_TRAIN_ID[_lb.id] = _lb.trainId if _lb.trainId >= 0 else IGNORE_INDEX

# Classes the study watches closely: thin or rare objects that a loss can easily sacrifice.
SMALL_CLASSES = ["pole", "traffic light", "traffic sign", "person", "rider", "bicycle", "motorcycle"]


def name_to_train_id(name: str) -> int:
    return CLASS_NAMES.index(name)


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a labelIds array (uint8) to train ids, unknown ids to 255."""
    return ID_TO_TRAIN_ID[label_ids]


def to_label_ids(train_ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """Map predicted train ids back to Cityscapes label ids (what official evaluation reads)."""
    arr = train_ids.cpu().numpy() if isinstance(train_ids, torch.Tensor) else np.asarray(train_ids)
    if arr.dtype == np.uint8:
        return np.take(_TRAIN_ID_LUT, arr)  # one table lookup per pixel (the served path)
    out = np.zeros(arr.shape, dtype=np.uint8)  # 0 = "unlabeled" for anything outside 0..18
    valid = (arr >= 0) & (arr < NUM_CLASSES)
    out[valid] = TRAIN_ID_TO_LABEL_ID[arr[valid]]
    return out


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (H, W) -> RGB (H, W, 3) with the official palette; ignored pixels black."""
    rgb = np.zeros((*train_ids.shape, 3), dtype=np.uint8)
    valid = train_ids < NUM_CLASSES
    rgb[valid] = PALETTE[train_ids[valid]]
    return rgb


def colorize_label_ids(label_ids: np.ndarray) -> np.ndarray:
    """Label ids (H, W) -> RGB like gtFine *_color.png (every id has its official colour)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    for lid, color in LABEL_ID_TO_COLOR.items():
        lut[lid] = color
    return lut[label_ids]


def label_name(label_id: int) -> str:
    return id2label[label_id].name
