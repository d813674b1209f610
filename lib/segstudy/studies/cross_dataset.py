"""Notebook 02's cross-dataset study: every trained model scored on every dataset of the profile
(data.dataset and cross.*), and the custom model also trained on the union of training sets
(cross.mix, data.datasets.MixedDatasets' sampling rule) with as many iterations as alone.

A dataset scores only the classes it labels (SegmentationFolder.classes; nuImages: 7 of 19), so its
mIoU is over those; the per-image confusions kept here let the verdict pair two models image by image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from segstudy.config import Config
from segstudy.config_profiles import derive
from segstudy.data.datasets import build_dataset, check_files, check_labels, data_config, dataset_names
from segstudy.data.labels import CLASS_NAMES
from segstudy.engine import evaluation, run_folder
from segstudy.engine.metrics import ConfusionMatrix, scored_on
from segstudy.engine.timings import Passes, Step, eval_size, timed
from segstudy.engine.training import train
from segstudy.models.checkpoint import load_trained
from segstudy.studies import results_files, verdicts

NOTEBOOK = "02_custom_model"  # its steps' keys in the plan and timings.json


def mixed_config(cfg: Config) -> Config:
    """cfg for a training on data.dataset and cross.mix together."""
    return derive(cfg, {"data.mix_with": list(cfg.cross.mix)})


def mixed_name(cfg: Config, model: str) -> str:
    """The mixed training's name and run folder: custom+bdd100k."""
    return "+".join([model, *cfg.cross.mix])


def train_mixed(cfg: Config) -> dict[str, dict]:
    """cross.models, each trained on the mixed training set (reused like any run); {} without cross.mix."""
    if not cfg.cross.mix:
        return {}
    mixed = mixed_config(cfg)
    return {mixed_name(cfg, m): train(mixed, m, run_dir=run_folder.run_dir(cfg, mixed_name(cfg, m)))
            for m in cfg.cross.models}


def training_data(cfg: Config, name: str) -> list[str]:
    """The datasets a model of this study was trained on."""
    return [cfg.data.dataset, *cfg.cross.mix] if "+" in name else [cfg.data.dataset]


def scoring_step(cfg: Config, name: str, model: str, dataset: str, val_images: int) -> Step:
    """Model `name` (a `model` network) scored on `dataset`'s val split, for the plan and timings.json:
    on the device, in the training's precision."""
    return Step(NOTEBOOK, f"evaluate {name} on {dataset} val", "evaluate", False, eval_size(cfg),
                (Passes(model, "amp", val_images),))


def _per_image(cfg: Config, name: str, result: dict, dataset: str) -> np.ndarray:
    """[N, C, C + 1] confusions of the model on `dataset`'s val split; data.dataset's are the ones its
    training kept (evaluation.from_training) when they are the same."""
    data = data_config(cfg, dataset)
    cfg_d = derive(cfg, {"data": dataclasses.asdict(data)})
    if dataset == cfg.data.dataset:
        trained = mixed_config(cfg) if "+" in name else cfg
        kept = evaluation.from_training(Path(result["checkpoint_best"]).parent, trained, amp=cfg.train.amp,
                                        channels_last=cfg.train.channels_last)
        if kept is not None:
            return kept["per_image"]
    # the precision and memory layout the training validated with (bf16 on a GPU box, channels_last)
    with timed(cfg, scoring_step(cfg, name, result["model"], dataset, 0).key):
        return evaluation.validate(load_trained(result["checkpoint_best"]), cfg_d, amp=cfg.train.amp,
                                   channels_last=cfg.train.channels_last, per_image=True)["per_image"]


def score(cfg: Config, models: dict[str, dict]) -> list[dict]:
    """One row per (model, dataset): mIoU over the dataset's labelled classes with its bootstrap interval
    over images, and the per-image confusions ("per_image")."""
    rows = []
    for dataset in dataset_names(cfg):
        data = data_config(cfg, dataset)
        val = build_dataset(data, data.val_split)
        check_files(val, data.val_split)
        check_labels(val, data.val_split, Path(cfg.output_root) / "cache")  # a broken mask stops here, named
        for name, result in models.items():
            confusions = scored_on(_per_image(cfg, name, result, dataset), val.classes)
            est = verdicts.miou_bootstrap(confusions, seed=cfg.seed)
            iou = ConfusionMatrix.from_per_image(confusions).compute()["iou"]
            rows.append({"model": name, "trained on": training_data(cfg, name), "dataset": dataset,
                         "miou": est.mean / 100, "low": est.low / 100, "high": est.high / 100, "images": len(val),
                         "classes": [CLASS_NAMES[c] for c in val.classes], "iou": iou, "per_image": confusions})
    return rows


def add_drops(rows: list[dict], primary: str) -> None:
    """Each row off the primary dataset gains "drop": its mIoU there minus the same model's on the
    primary's val split scored over the same classes (nuImages' 7), with an interval from resampling
    each split's images on its own: how much the model loses off its training domain."""
    home = {r["model"]: r for r in rows if r["dataset"] == primary}
    for r in rows:
        if r["dataset"] != primary and r["model"] in home:
            same_classes = scored_on(home[r["model"]]["per_image"], tuple(CLASS_NAMES.index(c) for c in r["classes"]))
            est = verdicts.unpaired_difference(r["per_image"], same_classes)
            r["drop"] = {"mean": est.mean / 100, "low": est.low / 100, "high": est.high / 100, "how": est.how}


def drop_table(rows: list[dict]) -> pd.DataFrame:
    """model x dataset: mIoU points lost off the primary dataset (over the dataset's classes)."""
    cells = {}
    for r in rows:
        if "drop" in r:
            d = r["drop"]
            mark = " *" if _spread(d["low"], d["high"]) and not d["low"] <= 0 <= d["high"] else ""
            cells.setdefault(r["model"], {})[r["dataset"]] = _cell(d["mean"], d["low"], d["high"], "+") + mark
    return pd.DataFrame.from_dict(cells, orient="index").rename_axis("model")


def run(cfg: Config) -> tuple[list[dict], pd.DataFrame]:
    """The study: notebooks 01 and 02's models (their saved results) and the mixed ones, scored on
    every dataset; saved to 02_custom_model/cross_dataset.json (+ .csv, per-image confusions)."""
    models, _, notes, _ = results_files.trained_models(cfg)
    for note in notes:
        print(f"[segstudy] {note} Its models are not scored across datasets.")
    rows = score(cfg, models | train_mixed(cfg))
    add_drops(rows, cfg.data.dataset)
    frame = table(rows)
    results_files.write_cross(cfg, rows, frame)
    return rows, frame


def _spread(low: float | None, high: float | None) -> bool:
    """Whether an interval was measured: a bound saved as None is JSON's infinity (one image, no spread)."""
    return low is not None and high is not None and bool(np.isfinite([low, high]).all())


def _cell(mean: float, low: float | None, high: float | None, sign: str = "") -> str:
    """Points with their interval, or "[no spread]"."""
    if not _spread(low, high):
        return f"{100 * mean:{sign}.1f} [no spread]"
    return f"{100 * mean:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def table(rows: list[dict]) -> pd.DataFrame:
    """model x training data (rows) by evaluation dataset (columns): "mIoU % [low, high]"."""
    cells = {}
    for r in rows:
        key = (r["model"], " + ".join(r["trained on"]))
        column = f"{r['dataset']} ({len(r['classes'])} classes)"
        cells.setdefault(key, {})[column] = _cell(r["miou"], r["low"], r["high"])
    out = pd.DataFrame.from_dict(cells, orient="index")
    out.index = out.index.set_names(["model", "trained on"])
    return out


def drop_figure(rows: list[dict]):
    """mIoU with its interval per model, one group of bars per evaluation dataset."""
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(rows)
    datasets, models = list(dict.fromkeys(frame["dataset"])), list(dict.fromkeys(frame["model"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(datasets) * len(models) / 2, 3.4))
    width = 0.8 / len(models)
    for k, model in enumerate(models):
        sub = frame[frame["model"] == model].set_index("dataset").loc[datasets]
        x = np.arange(len(datasets)) + k * width
        low, high = (pd.to_numeric(sub[k], errors="coerce").replace([np.inf, -np.inf], np.nan) for k in ("low", "high"))
        ax.bar(x, 100 * sub["miou"], width, label=model,  # no error bar where one image gave no spread
               yerr=[(100 * (sub["miou"] - low)).fillna(0), (100 * (high - sub["miou"])).fillna(0)], capsize=3)
    ax.set_xticks(np.arange(len(datasets)) + width * (len(models) - 1) / 2, datasets)
    ax.set_ylabel("val mIoU % (labelled classes)")
    ax.legend(fontsize=8)
    ax.set_title("Each model on each dataset (95% bootstrap over images)")
    fig.tight_layout()
    return fig
