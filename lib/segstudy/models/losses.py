"""Losses compared in notebook 03. All ignore label 255 and work on the {"out", "aux"} dict.

- ce: cross-entropy (torch).
- wce: cross-entropy with class weights from the training set's pixel frequencies
  (`loss.weighting`: inverse | median | enet), counted once per dataset and cached.
- dice: soft multi-class Dice, segmentation_models_pytorch's DiceLoss: per class
  1 - (2 sum(p t) + 2s) / (sum p + sum t + 2s) over the batch (smp computes it as a Tversky
  score with alpha = beta = 0.5, so its smoothing s = `loss.dice_smooth` enters twice); classes
  absent from the batch contribute 0, the mean is over all 19 classes.
- ce_dice: `loss.ce_weight` x CE + `loss.dice_weight` x Dice.
- focal: smp's FocalLoss (per-class sigmoid focal, gamma = `loss.focal_gamma`).
- lovasz: smp's Lovász-Softmax (a convex surrogate of the per-class IoU).

Knowledge distillation (notebook 04's recovery after pruning): `kd_loss`, `Distiller`, `with_kd`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from segstudy.config import LOSSES, WEIGHTINGS, LossConfig
from segstudy.data.cityscapes import SegmentationFolder
from segstudy.data.labels import IGNORE_INDEX, NUM_CLASSES
from segstudy.errors import UserError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def count_pixels(dataset: SegmentationFolder, cache: str | Path | None = None) -> dict:
    """Per-class labelled pixels over the split, and per class the pixels of the images that
    contain it (median-frequency balancing needs both). Cached as JSON keyed by the file list."""
    key = f"{len(dataset.samples)}:{dataset.samples[0].label}:{dataset.samples[-1].label}"
    if cache and Path(cache).is_file():
        stored = json.loads(Path(cache).read_text())
        if stored.get("key") == key:
            return stored
    pixels = np.zeros(NUM_CLASSES, dtype=np.int64)
    image_pixels = np.zeros(NUM_CLASSES, dtype=np.int64)
    for sample in tqdm(dataset.samples, desc="count pixels", unit="img", mininterval=2.0):
        target = dataset.load_train_ids(sample)
        counts = np.bincount(target[target != IGNORE_INDEX].ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        pixels += counts
        image_pixels += (counts > 0) * int((target != IGNORE_INDEX).sum())
    result = {"key": key, "pixels": pixels.tolist(), "image_pixels": image_pixels.tolist()}
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps(result))
    return result


def class_weights(counts: dict, scheme: str) -> torch.Tensor:
    """inverse: total / (C n_c); median: median(f) / f_c with f_c = n_c / pixels of images holding c
    (Eigen & Fergus); enet: 1 / ln(1.02 + p_c) (Paszke et al.). Absent classes get weight 0."""
    n = np.asarray(counts["pixels"], dtype=np.float64)
    present = n > 0
    w = np.zeros_like(n)
    if scheme == "inverse":
        w[present] = n.sum() / (present.sum() * n[present])
    elif scheme == "median":
        f = n[present] / np.asarray(counts["image_pixels"], dtype=np.float64)[present]
        w[present] = np.median(f) / f
    elif scheme == "enet":
        w[present] = 1.0 / np.log(1.02 + n[present] / n.sum())
    else:
        raise UserError(f"loss.weighting = '{scheme}'; choose one of {', '.join(WEIGHTINGS)}")
    return torch.tensor(w, dtype=torch.float32)


def build_loss(cfg: LossConfig, weights: torch.Tensor | None = None) -> Loss:
    """(logits N,C,H,W; target N,H,W) -> scalar."""
    if cfg.name not in LOSSES:
        raise UserError(f"loss.name = '{cfg.name}' is unknown; choose one of {', '.join(LOSSES)}")
    if cfg.name == "wce" and weights is None:
        raise UserError("loss.name = wce needs class weights (computed by segstudy.models.losses.class_weights)")
    if cfg.name in ("ce", "wce"):
        return _ce(cfg, weights)
    # here, not at the top: smp imports timm, 1 s of every notebook kernel's start, and CE needs neither
    from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, LovaszLoss

    ce = _ce(cfg, weights)
    dice = DiceLoss("multiclass", smooth=cfg.dice_smooth, ignore_index=IGNORE_INDEX)

    def ce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cfg.ce_weight * ce(logits, target) + cfg.dice_weight * dice(logits.float(), target)

    if cfg.name == "dice":
        return lambda logits, target: dice(logits.float(), target)
    if cfg.name == "ce_dice":
        return ce_dice
    if cfg.name == "focal":
        focal = FocalLoss("multiclass", gamma=cfg.focal_gamma, ignore_index=IGNORE_INDEX)
        return lambda logits, target: focal(logits.float(), target)
    lovasz = LovaszLoss("multiclass", ignore_index=IGNORE_INDEX)
    return lambda logits, target: lovasz(logits.float(), target)


def _ce(cfg: LossConfig, weights: torch.Tensor | None) -> Loss:
    def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = weights.to(logits.device, logits.dtype) if cfg.name == "wce" else None
        return F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE_INDEX)

    return ce


def with_aux(loss: Loss, aux_weight: float = 0.5) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """The torchvision-references criterion: loss(out) + aux_weight * loss(aux)."""
    def criterion(outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        value = loss(outputs["out"], target)
        if "aux" in outputs:
            value = value + aux_weight * loss(outputs["aux"], target)
        return value
    return criterion


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al.'s distillation term, per pixel: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged
    over pixels. Every pixel counts, ignored ones too: the teacher has an opinion about them."""
    if temperature <= 0:
        raise UserError(f"prune.kd_temperature = {temperature}; it must be > 0")
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)
    return kl.mean() * t * t


class Distiller(nn.Module):
    """The student, plus the frozen teacher's logits for the same batch under "teacher", so the
    ordinary training loop can distil: the criterion from `with_kd` reads both."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Distiller:
        self.student.train(mode)  # the teacher stays in eval mode (BN statistics frozen)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher = self.teacher(x)["out"]
        return self.student(x) | {"teacher": teacher}


def with_kd(criterion: Callable[[dict, torch.Tensor], torch.Tensor], temperature: float,
            weight: float) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """(1 - weight) x the task loss + weight x the distillation term on a Distiller's outputs."""
    def kd_criterion(outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        task = criterion({k: v for k, v in outputs.items() if k != "teacher"}, target)
        return (1 - weight) * task + weight * kd_loss(outputs["out"], outputs["teacher"], temperature)
    return kd_criterion
