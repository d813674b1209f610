"""Train several models under one schedule and compare them (notebooks 01 and 02)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from segstudy.config import Config
from segstudy.data.datasets import build_dataset
from segstudy.deploy import registry
from segstudy.engine import measure, run_folder
from segstudy.engine.device import resolve_device
from segstudy.engine.evaluation import PREVIEW_IMAGES
from segstudy.engine.timings import Passes, Step, timed
from segstudy.engine.training import train
from segstudy.models.checkpoint import load_trained
from segstudy.studies import figures


def train_models(cfg: Config, names: list[str]) -> dict[str, dict]:
    """Each model with the profile's data, schedule, seed and metric (or its reused run)."""
    return {name: train(cfg, model_name=name) for name in names}


def latency_steps(cfg: Config, notebook: str, models: list[str]) -> list[Step]:
    """profile_models' latencies, for the plan and timings.json: batch-1 fp32 latency of each trained
    model at the bench size on the CPU, contiguous then channels_last."""
    b = cfg.bench
    return [Step(notebook, f"latency {m}", "latency", True, (b.height, b.width),
                 (Passes(m, "fp32", 2 * (b.warmup + b.iters)),)) for m in models]


def notebook_models(cfg: Config) -> dict[str, list[str]]:
    """The models notebooks 01 and 02 train, by notebook."""
    return {"01_baselines": cfg.compare.baselines, "02_custom_model": cfg.compare.custom}


def profile_models(cfg: Config, results: dict[str, dict]) -> dict[str, dict]:
    """Parameters, FLOPs, size and batch-1 latency (fp32 eager and channels_last) at bench size; the
    latencies' seconds go to timings.json under latency_steps' keys."""
    b = cfg.bench
    rows = {}
    for name, result in results.items():
        model = load_trained(result["checkpoint_best"])
        rows[name] = {"parameters": measure.parameters(model), "gflops": measure.flops(model, b.height, b.width) / 1e9,
                      "size_mb": measure.size_on_disk(model) / 2**20}
        notebook = next((nb for nb, names in notebook_models(cfg).items() if name in names), "02_custom_model")
        with timed(cfg, latency_steps(cfg, notebook, [name])[0].key):
            for key, channels_last in (("latency_ms", False), ("latency_cl_ms", True)):
                rows[name][key] = measure.latency(model, b.height, b.width, warmup=b.warmup, iters=b.iters,
                                                  channels_last=channels_last)["median_ms"]
    return rows


def comparison_table(results: dict[str, dict], profiles: dict[str, dict], cfg: Config) -> pd.DataFrame:
    b = cfg.bench
    rows = []
    for name, r in results.items():
        p = profiles[name]
        rows.append({"model": name, "val mIoU %": 100 * r["best_miou"],
                     "backbone init": r.get("backbone_init", "unknown"),
                     "pixel acc %": 100 * r["final"].get("val_pixel_acc", float("nan")),
                     f"latency ms ({b.width}x{b.height})": p["latency_ms"],
                     "latency ms channels_last": p["latency_cl_ms"], "params M": p["parameters"] / 1e6,
                     "GFLOPs": p["gflops"], "size MB": p["size_mb"], "train img/s": r["train_img_per_s"],
                     "train s": r["train_seconds"]})
    return pd.DataFrame(rows).set_index("model").round(2)


def prediction_figure(cfg: Config, results: dict[str, dict]):
    """The first validation images, their ground truth and every model's prediction: as many as
    training keeps (evaluation.PREVIEW_IMAGES), so the figure reads them instead of predicting."""
    val = build_dataset(cfg.data, cfg.data.val_split)
    n = min(PREVIEW_IMAGES, len(val))
    return figures.prediction_grid(val, predictions(cfg, results, val, n), n)


@torch.inference_mode()
def predictions(cfg: Config, results: dict[str, dict], dataset, n: int) -> dict[str, list[np.ndarray]]:
    """Argmax train ids of the first n images of `dataset` (the validation split, eval preset) for
    every model: those its training's best validation kept (run_folder.PREVIEWS), else computed."""
    device = resolve_device(cfg.device)
    out = {}
    for name, r in results.items():
        out[name] = _kept_previews(Path(r["checkpoint_best"]).parent, n)
        if out[name] is None:
            model = load_trained(r["checkpoint_best"]).to(device)
            out[name] = [model(dataset[i][0][None].to(device))["out"].argmax(1)[0].cpu().numpy() for i in range(n)]
    return out


def _kept_previews(run_dir: Path, n: int) -> list[np.ndarray] | None:
    path = run_dir / run_folder.PREVIEWS
    if not path.is_file():
        return None
    with np.load(path) as kept:
        arrays = [kept[f"arr_{i}"] for i in range(len(kept.files))]
    return arrays[:n] if len(arrays) >= n else None


def register_best(cfg: Config, results: dict[str, dict], profiles: dict[str, dict]) -> dict[str, dict | None]:
    """Each model's best checkpoint as a new version of segstudy-<model> in the MLflow registry,
    alias `champion`, tagged with its validation mIoU and measured latency (the only copy of the
    weights in MLflow: the notebooks' trainings log none of their own)."""
    return {name: registry.register(cfg, r["checkpoint_best"], f"segstudy-{name}",
                                    {"val_miou": r["best_miou"], "latency_ms": profiles[name]["latency_ms"],
                                     "params": profiles[name]["parameters"]})
            for name, r in results.items()}
