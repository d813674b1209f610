"""Confusion-matrix metrics with the exact definitions of cityscapesscripts' evaluation.

Rows are ground-truth train ids (ignored pixels are dropped), columns are predicted train ids
plus one extra "void" column for predictions outside the 19 classes. That void column is what
makes the numbers match the official script: a pixel of class c predicted as, say, "unlabeled"
is a false negative of c, but a false positive of nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from segstudy.data.labels import CLASS_CATEGORIES, CLASS_NAMES, NUM_CLASSES

CATEGORIES = list(dict.fromkeys(CLASS_CATEGORIES))  # flat, construction, object, nature, ...


def nanmean(values) -> float:
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else float("nan")


def scored_on(confusions: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Confusions ([..., C, C + 1]) as scored on a dataset that labels only `classes` (nuImages: 7 of
    the 19): a prediction of a class it does not label is moved to the void column, a false negative
    of the pixel's class and a false positive of nothing, so that class's IoU is absent (NaN), not 0;
    a pixel of such a class is ignored, as that dataset would leave it unlabelled."""
    out = np.array(confusions, copy=True)
    others = [c for c in range(out.shape[-2]) if c not in classes]
    if others:
        out[..., others, :] = 0
        out[..., -1] += out[..., others].sum(-1)
        out[..., others] = 0
    return out


def class_iou(confusions: np.ndarray) -> np.ndarray:
    """IoU (0-1) of each class of a confusion matrix or a stack of them ([..., C, C + 1] or
    [..., C, C]: rows ground truth, the void column a false negative of the row's class and a false
    positive of nothing); NaN for a class absent from both truth and prediction (not scored)."""
    m = np.asarray(confusions, dtype=float)
    c = m.shape[-2]
    tp = np.diagonal(m[..., :c], axis1=-2, axis2=-1)
    union = m.sum(-1) + m[..., :c].sum(-2) - tp  # tp + fn + fp
    return np.divide(tp, union, out=np.full(union.shape, np.nan), where=union > 0)


def miou(confusions: np.ndarray) -> np.ndarray:
    """mIoU (0-1) of each matrix of a stack (class_iou's shapes; a 0-d array for one matrix): the
    mean IoU of the classes scored, NaN where none is. The one definition of mIoU (the training
    logs, the results files and the verdicts' bootstrap all read it)."""
    iou = class_iou(confusions)
    scored = ~np.isnan(iou)
    count = scored.sum(-1)
    # a running sum (cumsum adds in order, as Python's sum() of the scored classes would): the
    # training metrics stay equal to every digit; np.sum adds pairwise, another last bit
    total = np.cumsum(np.where(scored, iou, 0.0), axis=-1)[..., -1]
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


class ConfusionMatrix:
    """Accumulates (target, prediction) train-id pairs with bincount, on CPU or GPU."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: torch.device | str = "cpu",
                 per_image: bool = False):
        self.n = num_classes
        self.mat = torch.zeros((num_classes, num_classes + 1), dtype=torch.int64, device=device)
        # with per_image, each image's own matrix too: what the verdicts bootstrap over images
        self._images: list[np.ndarray] | None = [] if per_image else None

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """target, pred: integer tensors of the same shape, [H, W] (one image) or [B, H, W] (a
        batch: with per_image, one matrix per image); target 255 is ignored."""
        if target.shape != pred.shape:
            raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(pred.shape)} differ")
        images = target.shape[0] if target.dim() > 2 and self._images is not None else 1
        target, pred = target.flatten().long(), pred.flatten().long().to(target.device)
        keep = (target >= 0) & (target < self.n)
        cells = self.n * (self.n + 1)
        index = target[keep] * (self.n + 1) + pred[keep].clamp(0, self.n)  # non-class predictions: void
        if images > 1:  # one bincount for the batch: each image's cells offset by its position
            image = torch.arange(images, device=target.device).repeat_interleave(target.numel() // images)
            index = index + image[keep] * cells
        counts = torch.bincount(index, minlength=images * cells).view(images, self.n, self.n + 1)
        self.mat += counts.sum(0).to(self.mat.device)
        if self._images is not None:
            self._images.append(counts.cpu().numpy())

    @classmethod
    def from_per_image(cls, per_image: np.ndarray) -> ConfusionMatrix:
        """The matrix of a set of images from their own matrices ([N, C, C + 1], as per_image gives)."""
        cm = cls(per_image.shape[1], per_image=True)
        cm.mat += torch.from_numpy(per_image.sum(0).astype(np.int64))
        cm._images = [per_image]
        return cm

    @property
    def per_image(self) -> np.ndarray | None:
        """[N, C, C + 1] int64, one matrix per image in update order; None unless constructed with
        per_image=True, and None under DDP after a reduction without the ranks' indices."""
        if self._images is None:
            return None
        return np.concatenate(self._images) if self._images else np.zeros((0, self.n, self.n + 1), np.int64)

    def reset(self) -> None:
        self.mat.zero_()
        if self._images is not None:
            self._images = []

    def reduce_from_all_processes(self, indices: list[int] | None = None) -> None:
        """Sum the matrices of all DDP ranks (every rank then holds the global matrix). With per_image,
        `indices` are the dataset positions of this rank's images, in update order: every rank then
        holds all images' matrices in dataset order, as one process would; without them, none."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        dist.all_reduce(self.mat)
        if self._images is None:
            return
        if indices is None:
            self._images = None  # this rank's images only: not the validation set
            return
        shares: list = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (list(indices), self.per_image))
        positions = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in shares])
        matrices = np.concatenate([m for _, m in shares])
        self._images = [matrices[np.argsort(positions, kind="stable")]]

    def compute(self) -> dict:
        m = self.mat.double().cpu().numpy()
        tp = np.diag(m[:, : self.n])
        iou = class_iou(m).tolist()
        valid = m.sum()
        cats = {}
        for cat in CATEGORIES:
            ids = [i for i, c in enumerate(CLASS_CATEGORIES[: self.n]) if c == cat]
            others = [i for i in range(self.n) if i not in ids]
            ctp = m[np.ix_(ids, ids)].sum()
            cfn = m[ids, :].sum() - ctp
            cfp = m[np.ix_(others, ids)].sum()
            cats[cat] = float(ctp / (ctp + cfp + cfn)) if ctp + cfp + cfn > 0 else float("nan")
        return {
            "iou": dict(zip(CLASS_NAMES[: self.n], iou)),
            "miou": float(miou(m)),
            "pixel_acc": float(tp.sum() / valid) if valid > 0 else float("nan"),
            "category_iou": cats,
            "category_miou": nanmean(cats.values()),
        }

    def __str__(self) -> str:
        r = self.compute()
        lines = [f"{name:>14s}  {iou * 100:6.2f}" for name, iou in r["iou"].items()]
        lines.append(f"{'mIoU':>14s}  {r['miou'] * 100:6.2f}   pixel acc {r['pixel_acc'] * 100:.2f}")
        return "\n".join(lines)
