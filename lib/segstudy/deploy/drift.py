"""Drift of what a served model receives and predicts, against the reference stored with it.

Each image becomes one row of features: its size (pixels) and aspect (width / height), and four
histograms of its pixels: brightness (luma in 16 bins), contrast (each pixel's distance from the
image's mean luma, 8 bins), colour (4 x 4 x 4 RGB bins), and the share of each of the 19 classes in
its prediction. A window of images is summarised as one distribution per feature: the mean of its
images' histograms (pixel histograms pooled this way vary little between in-domain windows, unlike a
histogram of one number per image), and histograms of size (half-octaves) and aspect
(quarter-octaves).

The drift score of a window is the largest Jensen-Shannon distance (base 2: 0 = identical, 1 =
disjoint) between a feature's window distribution and the reference's. Its threshold is set on
held-out in-domain windows (`calibrate`): the reference images are split again and again into a
pseudo-reference and a window of the others, and the threshold is the (1 - false_alarm) quantile of
those windows' scores, so an in-domain window crosses it with about that probability.

Registration (deploy.registry) stores a `Reference` with the model; the server (serving.py) keeps a
`DriftWindow`; `segstudy monitor` and notebook 07 score windows with `score_windows`.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from segstudy.config import Config
from segstudy.data.labels import NUM_CLASSES
from segstudy.deploy import inference
from segstudy.files import write_json

STATISTIC = "Jensen-Shannon distance (base 2), the largest over the features"
FEATURES = ("classes", "colour", "brightness", "contrast", "size", "aspect")
SCALARS = {"size": 0, "aspect": 1}  # column of each one-number feature
# fixed bins: pixels per image in half-octaves (1 K to 16 MP), aspect in quarter-octaves around 1:1
EDGES = {"size": 2.0 ** np.arange(10, 24.5, 0.5), "aspect": 2.0 ** (np.arange(-12, 13) / 4 + 0.125)}
_LUMA_BINS = 16
_SPREAD_EDGES = np.array([0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4]) * 255  # |luma - mean luma|: 8 bins
_COLOUR_LEVELS = 4  # per channel: 4 x 4 x 4 colours
BRIGHTNESS = slice(2, 2 + _LUMA_BINS)
CONTRAST = slice(BRIGHTNESS.stop, BRIGHTNESS.stop + len(_SPREAD_EDGES) + 1)
COLOUR = slice(CONTRAST.stop, CONTRAST.stop + _COLOUR_LEVELS ** 3)
CLASSES = slice(COLOUR.stop, COLOUR.stop + NUM_CLASSES)
HISTOGRAMS = {"classes": CLASSES, "colour": COLOUR, "brightness": BRIGHTNESS, "contrast": CONTRAST}
WIDTH = CLASSES.stop
# features read on a subsample of at most this many pixels: the server pays about 1 ms per image
_SAMPLE_PIXELS = 16_384
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_row(image: np.ndarray, class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """One image's features: (H, W, 3) uint8 RGB and the pixels predicted per class (19, in order)."""
    height, width = image.shape[:2]
    step = max(1, math.isqrt(height * width // _SAMPLE_PIXELS))
    sample = image[::step, ::step].reshape(-1, 3)
    n = max(len(sample), 1)
    luma = sample @ _LUMA
    levels = (sample >> 6).astype(np.intp)  # 256 / 4 = 64 values per level
    colours = np.bincount((levels[:, 0] * _COLOUR_LEVELS + levels[:, 1]) * _COLOUR_LEVELS + levels[:, 2],
                          minlength=_COLOUR_LEVELS ** 3)
    counts = np.asarray(class_counts, dtype=np.float64)
    row = np.empty(WIDTH)
    row[:2] = height * width, width / height
    row[BRIGHTNESS] = np.bincount(np.minimum(luma * (_LUMA_BINS / 256), _LUMA_BINS - 1).astype(np.intp),
                                  minlength=_LUMA_BINS) / n
    row[CONTRAST] = np.bincount(np.digitize(np.abs(luma - luma.mean()), _SPREAD_EDGES),
                                minlength=len(_SPREAD_EDGES) + 1) / n
    row[COLOUR] = colours / n
    row[CLASSES] = counts / max(counts.sum(), 1)
    return row


def distributions(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Each feature's distribution over a set of images (each image weighs the same)."""
    out = {name: rows[:, columns].mean(0) for name, columns in HISTOGRAMS.items()}
    for name, column in SCALARS.items():
        bins = np.digitize(rows[:, column], EDGES[name])
        out[name] = np.bincount(bins, minlength=len(EDGES[name]) + 1) / len(rows)
    return out


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance in base 2 (the square root of the divergence): 0 to 1."""
    p, q = p / max(p.sum(), 1e-12), q / max(q.sum(), 1e-12)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def distances(reference: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, float]:
    window = distributions(rows)
    return {name: js_distance(window[name], reference[name]) for name in FEATURES}


def calibrate(rows: np.ndarray, window: int, false_alarm: float, rounds: int, seed: int = 0) -> list[float]:
    """Scores of `rounds` held-out in-domain windows: each round leaves `window` random reference
    images out, takes the rest as the reference, and scores the window."""
    if len(rows) < window + 2:
        return []
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(rounds):
        order = rng.permutation(len(rows))
        kept, left_out = rows[order[window:]], rows[order[:window]]
        scores.append(max(distances(distributions(kept), left_out).values()))
    return scores


@dataclass
class Reference:
    """What a registered model's inputs and predictions looked like on its val split, and the
    threshold of its drift score for windows of `window` images."""

    rows: np.ndarray  # (images, WIDTH): one feature row per reference image
    window: int  # images per drift window
    step: int  # images between two scores (= window: windows do not overlap)
    false_alarm: float  # the share of in-domain windows the threshold lets cross it
    calibration: list[float] = field(default_factory=list)  # held-out in-domain window scores
    source: str = ""  # where the reference images came from
    statistic: str = STATISTIC

    @cached_property
    def expected(self) -> dict[str, np.ndarray]:
        return distributions(self.rows)

    @property
    def threshold(self) -> float:
        """The (1 - false_alarm) quantile of the calibration scores (inf when there were too few
        reference images to calibrate: no alarm)."""
        if not self.calibration:
            return math.inf
        return float(np.quantile(self.calibration, 1 - self.false_alarm, method="higher"))

    def score(self, rows: np.ndarray) -> tuple[float, dict[str, float]]:
        """(drift score, distance per feature) of a window of feature rows."""
        found = distances(self.expected, np.asarray(rows))
        return max(found.values()), found

    def summary(self) -> dict:
        return {"statistic": self.statistic, "window": self.window, "step": self.step, "images": len(self.rows),
                "threshold": self.threshold, "false_alarm": self.false_alarm, "calibration_windows":
                len(self.calibration), "source": self.source}

    def save(self, path: str | Path) -> Path:
        payload = asdict(self) | {"rows": self.rows.tolist(), "features": list(FEATURES), "width": WIDTH}
        return write_json(path, payload, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        d = json.loads(Path(path).read_text())
        return cls(np.asarray(d["rows"], dtype=np.float64), d["window"], d["step"], d["false_alarm"],
                   d["calibration"], d.get("source", ""), d.get("statistic", STATISTIC))


def build_reference(rows: Iterable[np.ndarray], window: int, step: int, false_alarm: float, rounds: int,
                    source: str = "", seed: int = 0) -> Reference:
    """The reference of these images' feature rows, its threshold calibrated on held-out windows."""
    rows = np.stack(list(rows))
    return Reference(rows, window, step or window, false_alarm, calibrate(rows, window, false_alarm, rounds, seed),
                     source)


def held_out(paths: Sequence[Path], count: int) -> tuple[list[Path], list[Path]]:
    """(reference, held out): `count` images spread evenly over the sorted list (0: all of them), so
    that a split sorted by city or sequence is represented throughout, and the others."""
    paths = sorted(paths)
    if not count or count >= len(paths):
        return list(paths), []
    picked = set(np.linspace(0, len(paths) - 1, count).round().astype(int).tolist())
    return [p for i, p in enumerate(paths) if i in picked], [p for i, p in enumerate(paths) if i not in picked]


class DriftWindow:
    """The server's sliding window: the last `reference.window` images; every `reference.step`
    images once full, `add` returns the window's (score, distances)."""

    def __init__(self, reference: Reference):
        self.reference = reference
        self.rows: deque[np.ndarray] = deque(maxlen=reference.window)
        self.since = 0

    def add(self, row: np.ndarray) -> tuple[float, dict[str, float]] | None:
        self.rows.append(row)
        self.since += 1
        if len(self.rows) < self.reference.window or self.since < self.reference.step:
            return None
        self.since = 0
        return self.reference.score(np.stack(self.rows))


def score_windows(reference: Reference, rows: Sequence[np.ndarray], labels: Sequence[str] | None = None,
                  step: int | None = None) -> list[dict]:
    """Every full window of `rows` in order (`step` images apart, default the reference's), as dicts:
    window, first and last image (0-based), label (of its last image), score, alarm, each distance."""
    window, step = reference.window, step or reference.step
    out = []
    for end in range(window, len(rows) + 1, step):
        score, found = reference.score(np.stack(rows[end - window:end]))
        out.append({"window": len(out), "first": end - window, "last": end - 1,
                    "label": labels[end - 1] if labels else "", "score": score,
                    "alarm": score > reference.threshold} | found)
    return out


def rows_of(images: Iterable[np.ndarray], segment: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Feature rows of decoded images, each segmented by `segment` (image -> train ids)."""
    rows = []
    for image in images:
        counts = np.bincount(segment(image).ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        rows.append(image_row(image, counts))
    return rows


def val_images(cfg: Config) -> tuple[list[Path], list[Path]]:
    """(reference, held out): the profile's val images, monitoring.reference_images of them spread
    evenly for the reference, the others held out (notebook 07's in-domain windows)."""
    from segstudy.data.datasets import build_dataset

    paths = [s.image for s in build_dataset(cfg.data, cfg.data.val_split, raw=True).samples]
    return held_out(paths, cfg.monitoring.reference_images)


def decoded(paths: Iterable[Path]) -> Iterable[np.ndarray]:
    """Images read as the server reads a request (inference.decode_image)."""
    for path in paths:
        yield inference.decode_image(Path(path).read_bytes(), str(path))


def reference_for(cfg: Config, model: str | Path, base_size: int) -> Reference:
    """The reference stored with a registered model: its inputs and predictions on the val split
    (the network on the profile's device: the full profile registers on a GPU box)."""
    from segstudy.engine.device import resolve_device

    chosen, _ = val_images(cfg)
    engine = inference.load_engine(model, resolve_device(cfg.device))
    rows = rows_of(decoded(chosen), lambda image: inference.segment(engine, image, base_size))
    m = cfg.monitoring
    source = f"{len(chosen)} {cfg.data.val_split} images of {cfg.data.dataset} at {cfg.data.root}"
    return build_reference(rows, m.window, m.step, m.false_alarm, m.calibration_rounds, source, cfg.seed)
