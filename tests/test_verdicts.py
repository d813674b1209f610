"""The verdict statistics: a difference inside the noise reads "not distinguishable", one well
outside reads as a ranking; the intervals equal their hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segstudy.engine.metrics import ConfusionMatrix
from segstudy.studies.verdicts import (
    NOT_DISTINGUISHABLE,
    Interval,
    add_noise,
    compare,
    miou,
    miou_bootstrap,
    over_seeds,
    paired_difference,
    pooled_sd,
    rank,
    recommend_deployment,
    speedup,
    table,
    threshold,
)


def _seeds(mean: float, sd: float, n: int = 3, seed: int = 0) -> list[float]:
    """n scores with exactly this mean and sample standard deviation (rng only shapes them)."""
    z = np.random.default_rng(seed).standard_normal(n)
    z = (z - z.mean()) / z.std(ddof=1)
    return list(mean + sd * z)


def _per_image(n_images: int, n_classes: int, accuracy: float, seed: int) -> np.ndarray:
    """Per-image confusions [N, C, C]: each image has 1000 pixels of 3 random classes, a fraction
    `accuracy` (varying a little per image) predicted right, the rest spread over other classes."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n_images, n_classes, n_classes))
    for i in range(n_images):
        acc = np.clip(accuracy + rng.normal(0, 0.05), 0, 1)
        for c in rng.choice(n_classes, 3, replace=False):
            pixels = rng.integers(100, 500)
            right = rng.binomial(pixels, acc)
            out[i, c, c] += right
            out[i, c] += np.bincount(rng.integers(0, n_classes, pixels - right), minlength=n_classes)
    return out


# ---------------------------------------------------------------- estimates


def test_t_interval_of_1_2_3_is_the_hand_value():
    e = over_seeds([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert e.mean == pytest.approx(2.0)
    assert (e.low, e.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert e.n == 3 and e.how == "3 seeds, 95% t-interval"
    assert str(e) == "2.00 [-0.48, 4.48]"


def test_one_seed_has_no_spread_and_decides_nothing():
    e = over_seeds([24.4])
    assert e.how == "1 seed: no spread" and not e.has_spread and str(e) == "24.4 [no spread]"
    # a single seed against a clearly different 3-seed mean is still undecided
    v = compare("q", "one seed", e, "three", over_seeds([10.0, 10.1, 9.9]))
    assert v.answer == f"{NOT_DISTINGUISHABLE}: one seed, three"


def test_miou_ignores_classes_absent_from_truth_and_prediction():
    m = np.array([[8, 2, 0],
                  [0, 0, 0],  # class 1: never in the truth but predicted twice -> IoU 0, scored
                  [0, 0, 0]], float)  # class 2: absent from both -> not scored
    assert miou(m) == pytest.approx(100 * (8 / 10 + 0) / 2)
    # the engine's extra void column: a false negative of its row, a false positive of nothing
    void = np.array([[8, 0, 0, 2], [0, 0, 0, 0], [0, 0, 5, 0]], float)
    assert miou(void) == pytest.approx(100 * (8 / 10 + 1) / 2)
    with pytest.raises(ValueError):
        miou(np.zeros((3, 5)))


def test_miou_in_points_is_the_engines_to_the_last_bit():
    # one definition (engine.metrics.miou): a model's mIoU in the verdicts is exactly 100 x the one its
    # training logged and saved, not a second formula a last bit off (np.sum adds 19 IoUs pairwise)
    per_image = _per_image(40, 19, 0.6, seed=3).astype(np.int64)
    per_image = np.concatenate([per_image, np.zeros((40, 19, 1), np.int64)], axis=2)  # the void column
    per_image[:, :, -1] = np.random.default_rng(4).integers(0, 30, (40, 19))
    for m in per_image:
        assert miou(m) == 100 * ConfusionMatrix.from_per_image(m[None]).compute()["miou"]
    assert miou_bootstrap(per_image).mean == 100 * ConfusionMatrix.from_per_image(per_image).compute()["miou"]


def test_miou_bootstrap_interval_contains_the_full_set_value():
    conf = _per_image(60, 6, 0.7, seed=1)
    e = miou_bootstrap(conf, n_boot=500, seed=0)
    assert e.mean == pytest.approx(miou(conf.sum(0)))
    assert e.low < e.mean < e.high and 0 < e.high - e.low < 15
    assert e.n == 60 and e.how == "bootstrap over 60 images, 95%"
    assert miou_bootstrap(conf, n_boot=500, seed=0) == e  # fixed seed: reproducible


def test_paired_difference_of_identical_models_is_exactly_zero_width():
    conf = _per_image(40, 5, 0.6, seed=2)
    d = paired_difference(conf, conf.copy(), n_boot=300)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.how == "paired bootstrap over 40 images, 95%"


def test_paired_bootstrap_names_a_clearly_better_model():
    a = _per_image(50, 5, 0.6, seed=3)
    b = a.copy()
    for img in b:  # b: the same images with 3% of each class's errors turned right
        for c in range(5):
            fixed = 0.03 * np.delete(img[c], c)
            img[c, np.arange(5) != c] -= fixed
            img[c, c] += fixed.sum()
    d = paired_difference(b, a, n_boot=500)
    assert d.mean == pytest.approx(miou(b.sum(0)) - miou(a.sum(0)))
    assert d.low > 0  # the paired interval excludes 0 ...
    assert threshold("is b better?", d, 0.0).answer == "yes"
    # ... although the two marginal intervals over the same images overlap
    assert miou_bootstrap(a, n_boot=500).overlaps(miou_bootstrap(b, n_boot=500))


def test_pooled_sd_and_add_noise_widen_by_seed_noise():
    groups = {"ce": [1.0, 2.0, 3.0], "dice": [10.0, 12.0], "one": [5.0]}  # "one" has no df
    assert pooled_sd(groups) == pytest.approx(math.sqrt((2.0 + 2.0) / 3))
    diff = Interval(-0.5, -0.8, -0.1, 60, "paired bootstrap over 60 images, 95%")
    wide = add_noise(diff, seed_sd=1.0)
    extra = 1.959963984540054 * math.sqrt(2) * 1.0
    assert (wide.low, wide.high) == pytest.approx((-0.5 - math.hypot(0.3, extra), -0.5 + math.hypot(0.4, extra)))
    assert wide.mean == diff.mean and "sd 1.00" in wide.how
    same_weights = add_noise(diff, 1.0, trainings=0)  # int8 of the same weights: no seed noise to add
    assert (same_weights.low, same_weights.high) == pytest.approx((diff.low, diff.high))
    assert add_noise(diff, 1.0, df=3).high > wide.high  # Student's quantile with few seeds: wider


def test_speedup_from_repeated_timings():
    fast = [10.0, 10.5, 9.8, 10.2, 10.1, 9.9, 10.3, 10.4, 9.7, 30.0]  # one slow outlier: medians ignore it
    slow = [20.0, 21.0, 19.5, 20.4, 20.2, 20.1, 19.9, 20.3, 20.6, 19.8]
    s = speedup(fast, slow, n_boot=500)
    assert s.mean == pytest.approx(20.15 / 10.15)
    assert 1.0 < s.low < s.mean < s.high
    assert threshold("buys speed?", s, 1.0).answer == "yes"
    # 5 timings with the same outlier: it can be a resample's median, so nothing is decided
    few = speedup(fast[-5:], slow[:5], n_boot=500)
    assert few.low < 1.0 < few.high and threshold("buys speed?", few, 1.0).answer == NOT_DISTINGUISHABLE
    same = speedup(slow, list(reversed(slow)), n_boot=500)
    assert same.mean == pytest.approx(1.0)
    assert threshold("buys speed?", same, 1.0).answer == NOT_DISTINGUISHABLE


def test_paired_speedup_cancels_a_drift_that_slows_both_sides():
    # the machine slows down by 30% halfway through; each round times both models within a second
    drift = [1.0] * 8 + [1.3] * 8
    noise = [1.00, 1.02, 0.99, 1.01, 0.98, 1.03, 1.00, 0.97] * 2
    model = [100 * d * e for d, e in zip(drift, noise)]
    dense = [101 * d * e2 for d, e2 in zip(drift, reversed(noise))]
    paired = speedup(model, dense, n_boot=500, paired=True)
    independent = speedup(model, dense, n_boot=500)
    assert paired.low < 1.01 < paired.high  # the same speed, decided within a few percent
    assert paired.high - paired.low < 0.5 * (independent.high - independent.low)
    assert threshold("buys speed?", paired, 1.1).answer == "no"
    assert threshold("buys speed?", independent, 1.1).answer == NOT_DISTINGUISHABLE
    assert "rounds timed in turn" in paired.how
    with pytest.raises(ValueError, match="as many on each side"):
        speedup(model, dense[:5], paired=True)


# ---------------------------------------------------------------- verdicts


def test_difference_inside_the_seed_spread_is_not_distinguishable():
    ce, dice = over_seeds(_seeds(24.4, 2.0, seed=1)), over_seeds(_seeds(24.1, 2.0, seed=2))
    v = compare("Which loss is best overall?", "ce", ce, "dice", dice)
    assert v.answer == f"{NOT_DISTINGUISHABLE}: ce, dice"
    assert "ce 24.4 [" in v.evidence and "(3 seeds, 95% t-interval)" in v.evidence


def test_difference_well_outside_the_spread_is_a_ranking():
    scores = {"ce": _seeds(20.0, 0.5, seed=1), "focal": _seeds(30.0, 0.5, seed=2),
              "dice": _seeds(19.8, 0.5, seed=3)}
    v = rank("Which loss is best?", {k: over_seeds(s) for k, s in scores.items()})
    assert v.answer == "focal"
    assert v.evidence.index("focal") < v.evidence.index("ce") < v.evidence.index("dice")
    # lower is better (e.g. latency): the smallest mean wins
    assert rank("fastest?", {k: over_seeds(s) for k, s in scores.items()}, higher_is_better=False).answer == \
        f"{NOT_DISTINGUISHABLE}: ce, dice"  # the tied set, alphabetical


def test_only_ties_with_the_best_are_named():
    est = {"a": Interval(10, 9, 11, 3, "m"), "b": Interval(8.5, 7.5, 9.5, 3, "m"),
           "c": Interval(7, 6, 8, 3, "m")}  # c overlaps b but not a
    assert rank("q", est).answer == f"{NOT_DISTINGUISHABLE}: a, b"


def test_order_of_the_items_does_not_change_the_answer():
    est = {"a": Interval(10, 9, 11, 3, "m"), "b": Interval(10, 8, 12, 3, "m"), "c": Interval(3, 2, 4, 3, "m")}
    forward = rank("q", est)
    backward = rank("q", dict(reversed(list(est.items()))))
    assert forward == backward and forward.answer == f"{NOT_DISTINGUISHABLE}: a, b"
    cands = {"x": (Interval(30, 29, 31, 60, "m"), 50.0), "y": (Interval(29.8, 28, 31, 60, "m"), 20.0),
             "z": (Interval(29.8, 28, 31, 60, "m"), 20.0)}  # y, z tie on everything: the name decides
    assert recommend_deployment(cands, 1.0) == recommend_deployment(dict(reversed(list(cands.items()))), 1.0)
    assert recommend_deployment(cands, 1.0).pick == "y"


@pytest.mark.parametrize("low, high, answer",
                         [(-0.6, -0.2, "yes"), (-2.5, -1.4, "no"), (-1.5, 0.1, NOT_DISTINGUISHABLE)])
def test_threshold_keeps_accuracy(low, high, answer):
    drop = Interval((low + high) / 2, low, high, 60, "paired bootstrap over 60 images, 95%")
    v = threshold("Does int8 keep accuracy within 1 point?", drop, -1.0, context="at 2.1x [1.9, 2.3] speed-up")
    assert v.answer == answer
    assert v.evidence.endswith("-1.00; at 2.1x [1.9, 2.3] speed-up")


def test_recommend_picks_the_faster_of_indistinguishable_models():
    cands = {"big": (Interval(30.0, 29.0, 31.0, 3, "3 seeds"), 80.0),
             "small": (Interval(28.5, 27.0, 30.0, 3, "3 seeds"), 15.0)}  # 1.5 below, but reaches 29.0
    v = recommend_deployment(cands, 1.0).verdict
    assert v.answer == "small"
    assert "eligible (interval reaches 28.0, 1 point below the best's interval)" in v.evidence
    assert v.evidence.startswith("small 28.5 [27.0, 30.0] at 15 ms, the fastest of 2 of 2 models eligible")


def test_recommend_refuses_a_fast_model_clearly_worse():
    cands = {"big": (Interval(30.0, 29.5, 30.5, 3, "3 seeds"), 80.0),
             "mid": (Interval(29.6, 29.0, 30.2, 3, "3 seeds"), 40.0),
             "tiny": (Interval(25.0, 24.0, 26.0, 3, "3 seeds"), 5.0)}
    v = recommend_deployment(cands, 1.0).verdict
    assert v.answer == "mid"
    assert "excluded (whole interval below 28.5): tiny" in v.evidence  # the best's low 29.5, less 1


def test_table_has_one_row_per_verdict():
    vs = [threshold("q1", Interval(0, -1, 1, 3, "m"), 0.5), rank("q2", {"a": Interval(1, 0, 2, 3, "m")})]
    df = table(vs)
    assert list(df.columns) == ["question", "answer", "evidence"]
    assert df["answer"].tolist() == [NOT_DISTINGUISHABLE, "a"]
