"""Each loss against a value computed by hand on a tiny tensor; ignored pixels count for nothing."""

from __future__ import annotations

import math

import pytest
import torch

from segstudy.config import LossConfig
from segstudy.models.losses import LOSSES, build_loss, class_weights

# one image, 2 classes, 1x3 pixels; the third pixel is ignored
LOGITS = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -3.0]]]])
TARGET = torch.tensor([[[0, 1, 255]]])
P = torch.softmax(LOGITS, 1)[0, :, 0, :2]  # probabilities of the two labelled pixels, (class, pixel)
W = torch.tensor([0.25, 4.0])


def _ce(weights=None):
    w = weights if weights is not None else torch.ones(2)
    nll = [-math.log(P[0, 0]), -math.log(P[1, 1])]
    return float((w[0] * nll[0] + w[1] * nll[1]) / (w[0] + w[1]))


def _dice(smooth=1.0):
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # smp's Dice is Tversky with alpha = beta = 0.5: (I + s) / (I + fp/2 + fn/2 + s)
    per_class = [1 - (2 * (P[c] * t[c]).sum() + 2 * smooth) / (P[c].sum() + t[c].sum() + 2 * smooth)
                 for c in range(2)]
    return float(sum(per_class) / 2)


def _focal(gamma=2.0):
    total = 0.0
    for c in range(2):
        for x, t in zip(LOGITS[0, c, 0, :2].tolist(), [int(c == 0), int(c == 1)]):
            p = 1 / (1 + math.exp(-x))
            pt = p if t else 1 - p
            total += (1 - pt) ** gamma * -math.log(pt) / 2  # mean over the 2 labelled pixels
    return total / 2  # mean over classes


def _lovasz_single_pixel():
    # one labelled pixel of class 0: Lovasz-Softmax reduces to 1 - p_0 (classes present: only 0)
    logits = torch.tensor([[[[1.0, 9.0]], [[0.0, -9.0]]]])
    target = torch.tensor([[[0, 255]]])
    return logits, target, 1 - torch.softmax(logits, 1)[0, 0, 0, 0].item()


def test_hand_computed_values():
    assert build_loss(LossConfig("ce"))(LOGITS, TARGET).item() == pytest.approx(_ce(), rel=1e-5)
    assert build_loss(LossConfig("wce"), W)(LOGITS, TARGET).item() == pytest.approx(_ce(W), rel=1e-5)
    assert build_loss(LossConfig("dice", dice_smooth=1.0))(LOGITS, TARGET).item() == pytest.approx(_dice(), rel=1e-5)
    ce_dice = build_loss(LossConfig("ce_dice", ce_weight=1.0, dice_weight=0.5))(LOGITS, TARGET).item()
    assert ce_dice == pytest.approx(_ce() + 0.5 * _dice(), rel=1e-5)
    assert build_loss(LossConfig("focal", focal_gamma=2.0))(LOGITS, TARGET).item() == pytest.approx(_focal(), rel=1e-5)
    logits, target, expected = _lovasz_single_pixel()
    assert build_loss(LossConfig("lovasz"))(logits, target).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_pixels_contribute_nothing(name):
    loss = build_loss(LossConfig(name), W if name == "wce" else None)
    with_ignored = loss(LOGITS, TARGET)
    cropped = loss(LOGITS[..., :2], TARGET[..., :2])
    assert with_ignored.item() == pytest.approx(cropped.item(), rel=1e-6)
    changed = LOGITS.clone()
    changed[..., 2] = torch.tensor([-7.0, 8.0]).view(1, 2, 1)  # whatever is predicted there
    assert loss(changed, TARGET).item() == pytest.approx(with_ignored.item(), rel=1e-6)


def test_class_weights_by_hand():
    counts = {"pixels": [900, 100, 0], "image_pixels": [1000, 500, 0]}
    inv = class_weights(counts, "inverse").tolist()
    assert inv == pytest.approx([1000 / (2 * 900), 1000 / (2 * 100), 0.0])
    med = class_weights(counts, "median").tolist()  # f = [0.9, 0.2], median 0.55
    assert med == pytest.approx([0.55 / 0.9, 0.55 / 0.2, 0.0])
    enet = class_weights(counts, "enet").tolist()
    assert enet == pytest.approx([1 / math.log(1.02 + 0.9), 1 / math.log(1.02 + 0.1), 0.0])


def test_unknown_loss_and_weighting():
    from segstudy.errors import UserError

    with pytest.raises(UserError, match="loss.name = 'bce' is unknown; choose one of ce, wce"):
        build_loss(LossConfig("bce"))
    with pytest.raises(UserError, match="loss.weighting = 'sqrt'"):
        class_weights({"pixels": [1], "image_pixels": [1]}, "sqrt")
