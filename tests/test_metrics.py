"""Our confusion-matrix metrics against cityscapesscripts' official pixel-level evaluation."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
from PIL import Image

from segstudy.data import labels
from segstudy.data.cityscapes import cityscapes_samples
from segstudy.engine.cityscapes_eval import evaluate_folder
from segstudy.engine.metrics import ConfusionMatrix
from segstudy.errors import UserError


def _imperfect_predictions(root, out):
    """Ground truth corrupted in the ways real models fail: noise, confusions, void, shifts."""
    rng = np.random.default_rng(0)
    out.mkdir()
    never_predicted = labels.TRAIN_ID_TO_LABEL_ID[labels.name_to_train_id("wall")]
    samples = cityscapes_samples(root, "val")
    in_gt = set(np.unique(np.concatenate([np.array(Image.open(s.label)).ravel() for s in samples])))
    # ids the noise may produce: never a class that is absent from the ground truth, so that
    # such a class is absent from both (the official script scores it NaN and skips it)
    noise_ids = np.array([i for i in range(34) if i in in_gt or labels.ID_TO_TRAIN_ID[i] == 255])
    preds, gts = [], []
    for k, s in enumerate(samples):
        gt = np.array(Image.open(s.label))
        pred = np.roll(gt, shift=k, axis=1).copy()
        noise = rng.random(gt.shape) < 0.1
        pred[noise] = rng.choice(noise_ids, noise.sum())
        pred[pred == 27] = 26  # every truck called a car
        pred[pred == never_predicted] = 11  # walls called buildings: wall has no prediction at all
        if k == 1:
            pred[: gt.shape[0] // 4] = 0  # a band predicted as "unlabeled" (void)
        path = out / f"{s.stem}_pred_labelIds.png"
        Image.fromarray(pred.astype(np.uint8)).save(path)
        preds.append(str(path))
        gts.append(str(s.label))
    return preds, gts


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


def test_evaluate_folder_equals_official(tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    for s in cityscapes_samples(root, "val"):  # make "train" absent from the ground truth
        gt = np.array(Image.open(s.label))
        Image.fromarray(np.where(gt == 31, 0, gt).astype(np.uint8)).save(s.label)
    preds, gts = _imperfect_predictions(root, tmp_path / "pred")
    official.args.quiet = True
    official.args.JSONOutput = False
    official.args.evalInstLevelScore = True
    ref = official.evaluateImgLists(preds, gts, official.args)
    ours = evaluate_folder(root, "val", tmp_path / "pred", progress=False)

    for name, v in ours["iou"].items():
        assert _same(v, ref["classScores"][name]), name
        assert _same(ours["iiou"][name], ref["classInstScores"][name]), name
    assert _same(ours["miou"], ref["averageScoreClasses"])
    assert _same(ours["miiou"], ref["averageScoreInstClasses"])
    for cat, v in ours["category_iou"].items():
        assert _same(v, ref["categoryScores"][cat]), cat
    assert _same(ours["category_miou"], ref["averageScoreCategories"])
    assert _same(ours["category_miiou"], ref["averageScoreInstCategories"])
    # the cases that need care really occur in this data:
    assert ours["iou"]["truck"] == 0.0 or math.isnan(ours["iou"]["truck"])
    assert math.isnan(ours["iou"]["train"])  # absent from ground truth and prediction


def test_confusion_matrix_hand_computed():
    cm = ConfusionMatrix(num_classes=3)
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 255, 0, 2])  # 255 prediction = void: a false negative only
    cm.update(target, pred)
    r = cm.compute()
    # class 0: tp 1, fn 1, fp 1 (the class-2 pixel) -> 1/3; class 1: tp 1, fn 1, fp 1 -> 1/3
    # class 2: tp 0, fn 1, fp 0 -> 0; the ignored target pixel counts nowhere
    assert r["iou"] == pytest.approx({"road": 1 / 3, "sidewalk": 1 / 3, "building": 0.0})
    assert r["pixel_acc"] == pytest.approx(2 / 5)


def test_per_image_matrices_sum_to_the_total():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 5, 6), generator=g)
    target[0, 0] = 255  # ignored pixels count in no image
    pred = torch.randint(0, 5, (3, 5, 6), generator=g)  # 4: outside the 4 classes, the void column
    cm = ConfusionMatrix(num_classes=4, per_image=True)
    cm.update(target, pred)  # a batch of 3 images
    cm.update(target[1], pred[1])  # and one more on its own
    per_image = cm.per_image
    assert per_image.shape == (4, 4, 5) and per_image.dtype == np.int64
    assert (per_image.sum(0) == cm.mat.numpy()).all()
    alone = ConfusionMatrix(num_classes=4)
    alone.update(target[1], pred[1])
    assert (per_image[1] == alone.mat.numpy()).all() and (per_image[3] == per_image[1]).all()
    assert per_image[0].sum() == 30 - 6  # the ignored row of image 0
    assert ConfusionMatrix(num_classes=4).per_image is None  # only when asked
    cm.reset()
    assert cm.per_image.shape == (0, 4, 5)


def test_evaluate_missing_prediction_and_size(tiny_root, tmp_path):
    preds, _ = _imperfect_predictions(tiny_root, tmp_path / "pred")
    (tmp_path / "pred" / preds[0].split("/")[-1]).unlink()
    with pytest.raises(UserError, match="no prediction for 1 of"):
        evaluate_folder(tiny_root, "val", tmp_path / "pred", progress=False)
    shutil.rmtree(tmp_path / "pred")
    preds, _ = _imperfect_predictions(tiny_root, tmp_path / "pred")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(preds[0])
    with pytest.raises(UserError, match="predict at full size"):
        evaluate_folder(tiny_root, "val", tmp_path / "pred", progress=False)


def test_a_trainings_validation_is_read_only_where_it_is_the_same_evaluation(smoke_model):
    """evaluation.from_training gives validate()'s numbers for the run's best weights, to every
    digit, and nothing when the evaluation would differ (memory format, precision, data)."""
    import dataclasses
    from pathlib import Path

    from segstudy.engine.evaluation import from_training, validate
    from segstudy.models.checkpoint import load_trained

    cfg, run_dir = smoke_model["cfg"], Path(smoke_model["run_dir"])
    args = {"amp": cfg.train.amp, "channels_last": cfg.train.channels_last}
    read = from_training(run_dir, cfg, **args)
    computed = validate(load_trained(run_dir / "checkpoint_best.pt"), cfg, **args, per_image=True)
    assert read["miou"] == computed["miou"] == smoke_model["best_miou"]
    assert read["iou"] == computed["iou"] and np.array_equal(read["per_image"], computed["per_image"])
    assert from_training(run_dir, cfg, amp=cfg.train.amp, channels_last=not cfg.train.channels_last) is None
    assert from_training(run_dir, cfg, amp="bf16", channels_last=cfg.train.channels_last) is None
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, base_size=cfg.data.base_size * 2))
    assert from_training(run_dir, other, **args) is None


def test_the_prediction_figure_shows_the_best_validations_own_predictions(smoke_model, tmp_path):
    """Training keeps its best validation's predictions of the first images; the notebooks' figure
    reads them (no pass over the images again) and they are what the weights predict."""
    import shutil
    from pathlib import Path

    from segstudy.data.datasets import build_dataset
    from segstudy.engine import run_folder
    from segstudy.studies import model_comparison

    cfg, run_dir = smoke_model["cfg"], Path(smoke_model["run_dir"])
    assert (run_dir / run_folder.PREVIEWS).is_file()
    val = build_dataset(cfg.data, cfg.data.val_split)
    kept = model_comparison.predictions(cfg, {"custom": smoke_model}, val, 2)["custom"]
    bare = tmp_path / "run"  # the same weights without the kept predictions: computed
    bare.mkdir()
    shutil.copy(run_dir / "checkpoint_best.pt", bare)
    computed = model_comparison.predictions(cfg, {"custom": {"checkpoint_best": str(bare / "checkpoint_best.pt")}},
                                            val, 2)["custom"]
    assert len(kept) == 2 and all(np.array_equal(a, b) for a, b in zip(kept, computed))
