"""Training and evaluation presets (torchvision.transforms.v2), as in torchvision's references.

Images and masks travel together as tv_tensors; v2 resizes a `tv_tensors.Mask` with nearest
neighbour only, so labels are never blended. Crops pad masks with 255 (ignored). Images come in
as uint8 (as decoded): ToDtype makes a new float tensor, which Normalize then updates in place.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensors() -> list:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                   scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD, inplace=True),  # on ToDtype's new tensor: no extra copy
    ]


def train_preset(base_size: int, crop_size: list[int], scale_range: list[float], hflip: float,
                 color_jitter: float) -> v2.Compose:
    """Random scale of the shorter side around `base_size`, crop, flip, colour jitter."""
    steps = [
        v2.RandomResize(int(scale_range[0] * base_size), int(scale_range[1] * base_size) + 1),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    return v2.Compose(steps + _to_tensors())


def eval_preset(base_size: int) -> v2.Compose:
    """Resize the shorter side to `base_size` (labels: nearest), normalise."""
    return v2.Compose([v2.Resize(base_size)] + _to_tensors())


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised CHW float -> CHW float in [0, 1], for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)
