"""Notebook 03: one model (loss_study.model) trained with each loss under one schedule and
several seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from segstudy.config import Config
from segstudy.config_profiles import derive
from segstudy.data.labels import CLASS_NAMES, SMALL_CLASSES
from segstudy.engine import run_folder
from segstudy.engine.training import train
from segstudy.studies import results_files


def run_grid(cfg: Config, names: list[str] | None = None, seeds: list[int] | None = None) -> list[dict]:
    """One training run per (loss, seed), each in runs/<model>-<loss>-seed<seed>/ (reused if finished)."""
    runs = []
    for name in names or cfg.loss_study.names:
        for seed in seeds or run_seeds(cfg):
            # only the scores are compared: a finished loss run keeps no weights (disk: 12+ runs)
            result = _twin_result(cfg, name, seed) or train(
                run_config(cfg, name, seed), run_dir=cfg.output_dir / run_key(cfg, name, seed), keep_weights=False)
            runs.append({"loss": name, "seed": seed, **result})
    return runs


def twin_key(cfg: Config, name: str, seed: int) -> str | None:
    """runs/<loss_study.model>, the training notebook 01 or 02 makes of that model, when the
    (loss, seed) run would be trained with the same settings (same loss, seed and schedule): the
    grid then reads that run instead of repeating it."""
    own = run_config(cfg, name, seed)
    base = derive(cfg, {"model.name": cfg.loss_study.model})
    same = all(getattr(own, k) == getattr(base, k) for k in ("seed", "data", "model", "train", "loss"))
    return run_folder.key(cfg.loss_study.model) if same else None


def _twin_result(cfg: Config, name: str, seed: int) -> dict | None:
    """The twin run (twin_key) when run_folder.reusable returns it for this (loss, seed)'s settings."""
    key = twin_key(cfg, name, seed)
    if key is None:
        return None
    own = run_config(cfg, name, seed)
    done, _ = run_folder.reusable(cfg.output_dir / key, own, own.model)
    if done:
        print(f"[segstudy] loss {name}, seed {seed} trains exactly as {key}: reusing that run")
    return done


def run_seeds(cfg: Config) -> list[int]:
    """The training seeds of the grid: loss_study.seeds shifted by the study's seed, seed x n + s
    (n seeds): seed 0 trains 0, 1, 2 and seed 1 trains 3, 4, 5, so another `seed` checks the
    verdicts on other trainings, not on the same ones."""
    offsets = cfg.loss_study.seeds
    return [cfg.seed * len(offsets) + s for s in offsets]


def run_config(cfg: Config, name: str, seed: int) -> Config:
    """The config of the (loss, seed) run: loss_study's model and schedule."""
    study = cfg.loss_study
    # metrics are tracked; the grid's models are not worth registering
    return derive(cfg, {"seed": seed, "loss.name": name, "train.epochs": study.epochs or cfg.train.epochs,
                        "model.name": study.model, "tracking.log_model": False})


def run_key(cfg: Config, name: str, seed: int) -> str:
    """The run folder under outputs/<profile>/."""
    return run_folder.key(f"{cfg.loss_study.model}-{name}-seed{seed}")


def _best(run: dict) -> dict:
    return max((h for h in run["history"] if "val_iou" in h), key=lambda h: h["val_miou"])


def per_run_iou(runs: list[dict]) -> pd.DataFrame:
    """Rows (loss, seed), columns: the 19 classes (IoU %, best epoch)."""
    rows = {(r["loss"], r["seed"]): {c: 100 * (_best(r)["val_iou"][c] if _best(r)["val_iou"][c] is not None
                                               else np.nan) for c in CLASS_NAMES} for r in runs}
    return pd.DataFrame(rows).T.rename_axis(["loss", "seed"])


def summary(runs: list[dict]) -> pd.DataFrame:
    """Per loss: mIoU mean, std and range over seeds, and the mean IoU of the small classes."""
    ious = per_run_iou(runs)
    miou = pd.Series({(r["loss"], r["seed"]): 100 * r["best_miou"] for r in runs})
    small = ious[SMALL_CLASSES].mean(axis=1)
    df = pd.DataFrame({"mIoU": miou, "small-class IoU": small})
    g = df.groupby(level=0, sort=False)
    out = pd.DataFrame({"seeds": g.size(), "mIoU mean": g["mIoU"].mean(), "mIoU std": g["mIoU"].std(ddof=1),
                        "mIoU min": g["mIoU"].min(), "mIoU max": g["mIoU"].max(),
                        "small-class IoU mean": g["small-class IoU"].mean()})
    return out.round(2)


def class_means(runs: list[dict]) -> pd.DataFrame:
    """Loss x class: IoU % averaged over seeds."""
    return per_run_iou(runs).groupby(level=0, sort=False).mean().round(1)


def small_class_delta(runs: list[dict], reference: str = "ce") -> pd.DataFrame:
    """Small-class IoU of each loss minus the reference loss's (points, seed-averaged)."""
    means = class_means(runs)[SMALL_CLASSES]
    if reference not in means.index:
        return pd.DataFrame({"note": [f"reference loss '{reference}' was not run"]})
    delta = (means - means.loc[reference]).drop(index=reference).round(1)
    if delta.empty:
        return pd.DataFrame({"note": [f"only the reference loss '{reference}' was run: nothing to compare"]})
    return delta


def curves(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per loss: epochs, and mean/min/max validation mIoU % over seeds per epoch."""
    out = {}
    for loss in dict.fromkeys(r["loss"] for r in runs):
        hist = [[100 * h["val_miou"] for h in r["history"] if "val_miou" in h] for r in runs if r["loss"] == loss]
        n = min(map(len, hist))
        arr = np.array([h[:n] for h in hist])
        out[loss] = {"epoch": list(range(1, n + 1)), "mean": arr.mean(0).tolist(), "min": arr.min(0).tolist(),
                     "max": arr.max(0).tolist()}
    return out


def save(cfg: Config, runs: list[dict]) -> Path:
    """outputs/<profile>/03_loss_comparison/results.json: the runs and the tables above."""
    return results_files.write_losses(cfg, runs, summary(runs), class_means(runs), small_class_delta(runs),
                                      per_run_iou(runs))
