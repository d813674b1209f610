"""The report's verdict table: each question of the study, its answer, and the uncertainty behind it.

Why these statistics:

- From-scratch trainings on a CPU budget are short, and their seed-to-seed noise is often larger
  than the differences between the variants being compared. So a training-level question (which
  loss is best) is answered from several seeds: the mean and a Student-t interval of the mean,
  which stays honest with 3 seeds where a normal interval would be too narrow.
- Two variants evaluated on the same validation images (int8 vs fp32, pruned vs its dense
  control) share the images' difficulty. Their *difference* is bootstrapped with the same
  resampled images for both (paired), which cancels that shared variation and is much tighter
  than comparing two separate intervals. A difference between two single trainings can then be
  widened by the seed noise measured in the seeded study (add_noise), when it has to count.
- Timings are skewed (a slow outlier now and then): speed-ups compare medians, with a bootstrap
  interval over the repeated timings.

Rules: a ranking names a winner only when its interval does not overlap any other's; otherwise
the answer is "not distinguishable at this budget" (NOT_DISTINGUISHABLE) with the tied names.
An estimate from a single value (1 seed, 1 image, 1 timing) has no measured spread: its interval
is unbounded, so it never decides anything on its own.

Units: every mIoU here is in points (0-100, the report's unit and the unit of the recommendation
tolerance), i.e. 100 x engine.metrics.miou, the one definition (ConfusionMatrix's too). Confusion
matrices have ground truth in rows and either C or C + 1 columns (the engine's extra "void"
prediction column, which counts as a false negative of the row's class and a false positive of
nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from segstudy.engine import metrics

NOT_DISTINGUISHABLE = "not distinguishable at this budget"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval [low, high] from n values (seeds, images, timings).

    `how` says where the interval comes from, e.g. "3 seeds, 95% t-interval". With n < 2 nothing
    measured the spread and the interval is (-inf, inf)."""

    mean: float
    low: float
    high: float
    n: int
    how: str
    level: float = 0.95

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"interval [{self.low}, {self.high}] is empty or NaN")

    @property
    def has_spread(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def __str__(self) -> str:
        if not self.has_spread:
            return f"{_fmt(self.mean)} [no spread]"
        return f"{_fmt(self.mean)} [{_fmt(self.low)}, {_fmt(self.high)}]"


@dataclass(frozen=True)
class Verdict:
    """One row of the report's verdict table."""

    question: str
    answer: str
    evidence: str


def _fmt(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def unbounded(mean: float, n: int, how: str, level: float = 0.95) -> Interval:
    """An estimate that nothing measured the spread of: (-inf, inf) around `mean`."""
    return Interval(mean, -math.inf, math.inf, n, how, level)


def _percentile(mean: float, samples: np.ndarray, n: int, how: str, level: float) -> Interval:
    """Percentile bootstrap interval around the estimate of the full sample."""
    alpha = 1 - level
    low, high = np.nanquantile(samples, [alpha / 2, 1 - alpha / 2])
    # the full-sample estimate can fall a hair outside the percentiles in a skewed case: the
    # interval is kept as the bootstrap gives it, only ordered (float noise on a zero width)
    return Interval(float(mean), float(min(low, high)), float(max(low, high)), n, how, level)


# ---------------------------------------------------------------- estimates


def over_seeds(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of one score over training seeds, with a Student-t interval of the mean."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("over_seeds needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return unbounded(mean, 1, "1 seed: no spread", level)
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), f"{x.size} seeds, {level:.0%} t-interval", level)


def _check(confusions: np.ndarray, ndim: int) -> np.ndarray:
    m = np.asarray(confusions, dtype=float)
    if m.ndim != ndim or m.shape[-1] not in (m.shape[-2], m.shape[-2] + 1):
        want = "[C, C]" if ndim == 2 else "[N, C, C]"
        raise ValueError(f"expected confusion matrices {want} (or C + 1 columns), got {m.shape}")
    return m


def miou(confusion: np.ndarray) -> float:
    """mIoU in points of one confusion matrix (rows = truth); absent classes are not scored."""
    return float(100 * metrics.miou(_check(confusion, 2)))


def _resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] how often each image is drawn in each bootstrap resample."""
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    rows = np.repeat(np.arange(n_boot), n)
    return np.bincount(rows * n + draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)


def _boot_mious(weights: np.ndarray, confusions: np.ndarray) -> np.ndarray:
    # a resample's confusion matrix is the weighted sum of the per-image ones (one matmul for all)
    n, *shape = confusions.shape
    return 100 * metrics.miou((weights @ confusions.reshape(n, -1)).reshape(len(weights), *shape))


def miou_bootstrap(confusions: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """mIoU (points) of per-image confusion matrices [N, C, C], with a bootstrap interval over images."""
    m = _check(confusions, 3)
    point = miou(m.sum(0))
    if len(m) < 2:
        return unbounded(point, len(m), f"{len(m)} image: no spread", level)
    samples = _boot_mious(_resample_weights(len(m), n_boot, seed), m)
    return _percentile(point, samples, len(m), f"bootstrap over {len(m)} images, {level:.0%}", level)


def paired_difference(conf_a: np.ndarray, conf_b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> Interval:
    """mIoU(a) - mIoU(b) in points for two models scored on the same images (per-image confusions),
    bootstrapped with the same resampled images for both."""
    a, b = _check(conf_a, 3), _check(conf_b, 3)
    if a.shape != b.shape:
        raise ValueError(f"paired confusions must have the same shape (same images, classes): {a.shape} vs {b.shape}")
    point = miou(a.sum(0)) - miou(b.sum(0))
    if len(a) < 2:
        return unbounded(point, len(a), f"{len(a)} image: no spread", level)
    w = _resample_weights(len(a), n_boot, seed)
    samples = _boot_mious(w, a) - _boot_mious(w, b)
    return _percentile(point, samples, len(a), f"paired bootstrap over {len(a)} images, {level:.0%}", level)


def unpaired_difference(conf_a: np.ndarray, conf_b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> Interval:
    """mIoU(a) - mIoU(b) in points for one model on two different sets of images (e.g. another
    dataset's val split against its own), each set resampled on its own."""
    a, b = _check(conf_a, 3), _check(conf_b, 3)
    point = miou(a.sum(0)) - miou(b.sum(0))
    if min(len(a), len(b)) < 2:
        return unbounded(point, min(len(a), len(b)), "fewer than 2 images on a side: no spread", level)
    samples = (_boot_mious(_resample_weights(len(a), n_boot, seed), a)
               - _boot_mious(_resample_weights(len(b), n_boot, seed + 1), b))
    return _percentile(point, samples, len(a) + len(b),
                       f"bootstrap over {len(a)} and {len(b)} images on their own, {level:.0%}", level)


def pooled_sd(groups: Mapping[str, Sequence[float]]) -> float:
    """Pooled within-group standard deviation (e.g. of mIoU over seeds, per loss): the seed noise
    of one training. Its degrees of freedom are sum(len(g) - 1), for add_noise(df=...)."""
    ss = sum(float(np.sum((np.asarray(g, float) - np.mean(g)) ** 2)) for g in groups.values() if len(g) > 1)
    df = sum(len(g) - 1 for g in groups.values() if len(g) > 1)
    if df == 0:
        raise ValueError("pooled_sd needs a group with at least 2 values")
    return math.sqrt(ss / df)


def add_noise(diff: Interval, seed_sd: float, trainings: int = 2, df: int | None = None) -> Interval:
    """Widen a difference measured on single trainings by their seed noise.

    The images' interval (paired bootstrap) says nothing about how another seed would have
    trained; `trainings` independent trainings each add seed_sd**2 to the difference's variance
    (2 for two separately trained models; 1 when one model derives from the other's weights and
    only its own training, e.g. a fine-tune, is random; 0 for int8 vs fp32 of the same weights).
    Each side of the interval grows to sqrt(h**2 + (q * sqrt(trainings) * seed_sd)**2), q the
    normal quantile, or Student's with `df` (that of pooled_sd) when given."""
    q = stats.norm.ppf(0.5 + diff.level / 2) if df is None else stats.t.ppf(0.5 + diff.level / 2, df)
    extra = q * math.sqrt(trainings) * seed_sd
    low = diff.mean - math.hypot(diff.mean - diff.low, extra)
    high = diff.mean + math.hypot(diff.high - diff.mean, extra)
    how = f"{diff.how} + seed noise of {trainings} training(s), sd {seed_sd:.2f}"
    return Interval(diff.mean, low, high, diff.n, how, diff.level)


def speedup(times: Sequence[float], baseline_times: Sequence[float], n_boot: int = 2000, seed: int = 0,
            level: float = 0.95, paired: bool = False) -> Interval:
    """How many times faster than the baseline: median(baseline_times) / median(times), with a
    bootstrap interval resampling each set of repeated timings independently. With ~5 timings a
    side the median's interval is about their whole range (one slow outlier in 5 can be the
    median of a resample): time 10 or more runs when the speed-up is the question.

    `paired`: timing i of each side was taken in the same round (engine.measure.latencies), so the
    speed-up is the median of the per-round ratios, bootstrapped over rounds: a slow minute of
    the machine slows both sides of a round and cancels out (docs/results.md)."""
    t, base = np.asarray(times, float), np.asarray(baseline_times, float)
    if t.size == 0 or base.size == 0 or (t <= 0).any() or (base <= 0).any():
        raise ValueError("speedup needs positive timings on both sides")
    if paired and t.size != base.size:
        raise ValueError(f"paired timings need as many on each side: {t.size} vs {base.size}")
    n = int(min(t.size, base.size))
    point = float(np.median(base / t) if paired else np.median(base) / np.median(t))
    if n < 2:
        return unbounded(point, n, "1 timing: no spread", level)
    rng = np.random.default_rng(seed)
    if paired:
        rounds = rng.integers(0, n, (n_boot, n))
        samples = np.median(base[rounds] / t[rounds], axis=1)
        return _percentile(point, samples, n, f"{n} rounds timed in turn, bootstrap of the median ratio, "
                                              f"{level:.0%}", level)
    samples = (np.median(rng.choice(base, (n_boot, base.size)), axis=1)
               / np.median(rng.choice(t, (n_boot, t.size)), axis=1))
    return _percentile(point, samples, n, f"{t.size} vs {base.size} timings, bootstrap of medians, {level:.0%}", level)


# ---------------------------------------------------------------- verdicts


def _listing(estimates: Sequence[tuple[str, Interval]]) -> str:
    hows = {e.how for _, e in estimates}
    if len(hows) == 1:  # say the method once when all share it
        return "; ".join(f"{name} {e}" for name, e in estimates) + f" ({hows.pop()})"
    return "; ".join(f"{name} {e} ({e.how})" for name, e in estimates)


def rank(question: str, estimates: Mapping[str, Interval], higher_is_better: bool = True) -> Verdict:
    """The best by mean, alone if its interval overlaps no other's; else the tied names, as
    "not distinguishable at this budget: best, tied...". Independent of the mapping's order."""
    if not estimates:
        raise ValueError("rank needs at least one estimate")
    sign = -1 if higher_is_better else 1
    # ordered by mean, best first, then by name: no dependence on the dict's order
    ordered = sorted(estimates.items(), key=lambda kv: (sign * kv[1].mean, kv[0]))
    best_name, best = ordered[0]
    tied = [name for name, e in ordered[1:] if e.overlaps(best)]
    evidence = _listing(ordered)
    if not tied:
        return Verdict(question, best_name, evidence + "; no other interval overlaps the best's")
    # the tied set in alphabetical order: the verdict is the set, the evidence keeps the means' order
    return Verdict(question, f"{NOT_DISTINGUISHABLE}: {', '.join(sorted([best_name, *tied]))}",
                   evidence + f"; {', '.join(tied)} overlap{'s' if len(tied) == 1 else ''} {best_name}'s interval")


def compare(question: str, name_a: str, a: Interval, name_b: str, b: Interval,
            higher_is_better: bool = True) -> Verdict:
    """rank() of two separately estimated results (e.g. two losses over seeds). For two variants
    scored on the same images use threshold(paired_difference(...), 0.0, ...) instead: tighter."""
    return rank(question, {name_a: a, name_b: b}, higher_is_better)


def threshold(question: str, est: Interval, floor: float, context: str = "") -> Verdict:
    """"yes" if the whole interval is above `floor`, "no" if it is wholly below, otherwise not
    distinguishable. E.g. an int8 drop kept within 1 point: threshold(q, paired_difference(int8,
    fp32), -1.0); pruning buys speed: threshold(q, speedup(pruned, dense), 1.0). `context` is
    appended to the evidence (e.g. the speed-up the kept accuracy comes with)."""
    if est.low > floor:
        answer, why = "yes", "the whole interval is above"
    elif est.high < floor:
        answer, why = "no", "the whole interval is below"
    else:
        answer, why = NOT_DISTINGUISHABLE, "the interval contains"
    evidence = f"{est} ({est.how}); {why} {_fmt(floor)}"
    return Verdict(question, answer, evidence + (f"; {context}" if context else ""))


def combined(*answers: str) -> str:
    """One answer for a target with several bounds, each answered by `threshold`: "yes" when every
    bound is met, "no" when any is missed, else not distinguishable."""
    if all(a == "yes" for a in answers):
        return "yes"
    return "no" if "no" in answers else NOT_DISTINGUISHABLE


@dataclass(frozen=True)
class Recommendation:
    """recommend_deployment's answer: the verdict (its answer is the pick), the most accurate
    candidate and the bar a candidate's interval had to reach."""

    verdict: Verdict
    best: str
    bar: float

    @property
    def pick(self) -> str:
        return self.verdict.answer


Candidate = tuple[str, tuple[Interval, float]]  # name, (mIoU interval in points, latency in ms)


def recommend_deployment(candidates: Mapping[str, tuple[Interval, float]] | Sequence[Candidate], tolerance: float,
                         question: str = "Which model to deploy?", context: str = "") -> Recommendation:
    """The fastest model not distinguishable from the most accurate one, `tolerance` points
    allowed: a model is eligible when its interval reaches the best's interval less the tolerance
    (high >= best.low - tolerance), the overlap rule of every other verdict; a bar at the best's
    mean would move with the best's seed luck. candidates: name -> (mIoU interval in points,
    latency in ms), or such pairs (a name measured twice, by two notebooks, is two candidates); ties
    break by name. `context` is appended to the evidence (e.g. the seed noise)."""
    if not candidates:
        raise ValueError("recommend_deployment needs at least one candidate")
    pairs = candidates.items() if isinstance(candidates, Mapping) else candidates
    items = sorted(pairs, key=lambda kv: kv[0])  # by name first: equal means/latencies break ties by name
    best_name, (best, best_ms) = max(items, key=lambda kv: kv[1][0].mean)
    bar = best.low - tolerance
    eligible = [(name, e, ms) for name, (e, ms) in items if e.high >= bar]
    excluded = [name for name, (e, _) in sorted(items, key=lambda kv: kv[1][1]) if e.high < bar]
    pick, pick_est, pick_ms = min(eligible, key=lambda t: (t[2], -t[1].mean))
    evidence = (f"{pick} {pick_est} at {pick_ms:.3g} ms, the fastest of {len(eligible)} of {len(items)} models "
                f"eligible (interval reaches {_fmt(bar)}, {tolerance:g} point{'' if tolerance == 1 else 's'} "
                f"below the best's interval): the best {best_name} {best} at {best_ms:.3g} ms")
    if excluded:
        evidence += f"; excluded (whole interval below {_fmt(bar)}): {', '.join(excluded)}"
    evidence += f"; intervals: {pick_est.how}" + (f"; {context}" if context else "")
    return Recommendation(Verdict(question, pick, evidence), best_name, bar)


def table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """The report's opening table: one row per question."""
    return pd.DataFrame([(v.question, v.answer, v.evidence) for v in verdicts],
                        columns=["question", "answer", "evidence"])
