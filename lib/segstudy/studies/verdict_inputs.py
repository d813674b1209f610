"""What the verdict table reads: the results files and per-image confusions of one report (each
read once, through studies.results_files), and the seed noise of one training.

Seed noise: only notebook 03 trains the same model several times. Its pooled within-loss standard
deviation of mIoU is the noise of one training, and widens every accuracy interval that rests on
single trainings (pruned against dense control, the deployment candidates). Its model and schedule
are the loss study's (loss_study.model, loss_study.epochs; the demo's is the cheap U-Net), not
necessarily those of the model judged: the best estimate this budget has, named in the evidence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segstudy.config import Config
from segstudy.errors import UserError
from segstudy.studies import results_files, verdicts
from segstudy.studies.verdicts import Interval


class Missing(Exception):
    """A question's input is not there; the message names what writes it."""


@dataclass(frozen=True)
class SeedNoise:
    """The seed-to-seed standard deviation of one training's mIoU (points), from notebook 03."""

    sd: float
    df: int
    runs: int
    model: str = "custom"  # the loss study's model: the other models' seed noise is assumed the same

    def widen(self, est: Interval, trainings: int) -> Interval:
        return verdicts.add_noise(est, self.sd, trainings, self.df)

    def __str__(self) -> str:
        return f"seed sd {self.sd:.2f} points from notebook 03's {self.runs} runs of {self.model} (df {self.df})"


class Inputs:
    """The results files and confusion files of one report, each read once; `used` lists the
    files read (the table's sources)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.used: list[Path] = []
        self._files: dict[str, tuple[dict | None, str | None]] = {}
        self._confusions: dict[str, dict[str, np.ndarray] | None] = {}

    def results(self, key: str) -> dict:
        if key not in self._files:
            data, file, note = results_files.read(self.cfg, key)
            self._files[key] = (data, note)
            if data is not None:
                self.used.append(file)
        data, note = self._files[key]
        if data is None:
            raise Missing(note)
        return data

    def confusions(self, key: str, row: dict, name: str) -> np.ndarray:
        """The per-image confusions of `row` (named `name` in messages) from CONFUSION_FILES[key]."""
        if key not in self._confusions:
            self._confusions[key] = results_files.read_confusions(self.cfg, key)
            if self._confusions[key] is not None:
                self.used.append(results_files.confusions_path(self.cfg, key))
        store = self._confusions[key] or {}
        if row.get("confusions") not in store:
            file = results_files.shown(results_files.confusions_path(self.cfg, key))
            raise Missing(f"no per-image confusions of '{name}' in {file} (an older notebook); "
                          f"re-run {results_files.writer(self.cfg, key)}")
        return store[row["confusions"]]

    def reading(self, key: str):
        return results_files.reading(self.cfg, key)


def loss_runs(ins: Inputs) -> list[dict]:
    d = ins.results("losses")
    with ins.reading("losses"):
        runs = [r for r in d["runs"] if r["best_miou"] is not None]
    if not runs:
        raise Missing(f"no finished loss run in notebook 03's results; run {results_files.writer(ins.cfg, 'losses')}")
    return runs


def by_loss(runs: list[dict], score: Callable[[dict], float]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in runs:
        out.setdefault(r["loss"], []).append(score(r))
    return out


def seed_noise(ins: Inputs) -> SeedNoise | None:
    """Pooled over the losses of notebook 03; None when it was not run or no loss has 2 seeds."""
    try:
        groups = by_loss(loss_runs(ins), lambda r: 100 * r["best_miou"])
    except (Missing, UserError):
        return None
    df = sum(len(g) - 1 for g in groups.values())
    model = ins.results("losses").get("model", "custom")  # older files: notebook 03 trained the custom model
    return SeedNoise(verdicts.pooled_sd(groups), df, sum(map(len, groups.values())), model) if df else None


def no_noise(ins: Inputs) -> Missing:
    try:
        ins.results("losses")
    except Missing:
        return Missing("the seed noise of a training is measured by notebook 03's loss study (2 or more seeds "
                       f"of a loss); run {results_files.writer(ins.cfg, 'losses')}")
    return Missing("the seed noise of a training is measured by notebook 03's loss study, which ran one seed "
                   "per loss: give loss_study.seeds 2 or more")
