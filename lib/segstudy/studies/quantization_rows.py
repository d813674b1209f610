"""Notebook 05's rows: each variant scored on the same val images (eval_subset), timed and sized
(`variant`), and the tables built from them. The study that adds the rows is studies/quantization.py."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset

from segstudy.compress.onnx_export import OrtModule
from segstudy.compress.openvino_int8 import OvModule
from segstudy.config import Config
from segstudy.config_profiles import derive
from segstudy.data.datasets import build_dataset
from segstudy.engine import measure, timings
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.engine.evaluation import confusion_over, eval_loader
from segstudy.engine.metrics import ConfusionMatrix
from segstudy.studies import result_tables

NOTEBOOK = "05_quantization"  # its QAT fine-tune's and its steps' keys in the plan and timings.json
LATENCY = "latency"  # the step that holds every latency timing of the notebook


def eval_subset(val_images: int, wanted: int) -> list[int]:
    """The val images every row is scored on: all `val_images` when `wanted` is 0 or not fewer, else
    the middle image of each of `wanted` equal blocks of the split (evenly spread: Cityscapes' val is
    ordered by city, so every city keeps its share). Fixed, so every variant is scored on the same
    images and the paired interval over them holds."""
    if not wanted or wanted >= val_images:
        return list(range(val_images))
    return [(2 * i + 1) * val_images // (2 * wanted) for i in range(wanted)]


@contextlib.contextmanager
def timed_step(cfg: Config, name: str | None) -> Iterator[None]:
    """timings.timed under this notebook's step `name` (no record without a name)."""
    with timings.timed(cfg, timings.step_key(NOTEBOOK, name)) if name else contextlib.nullcontext():
        yield


def cpu_only(model: nn.Module) -> bool:
    """int8 kernels (torch's quantized modules), ONNX Runtime and OpenVINO run on the CPU only."""
    return any(isinstance(m, (OrtModule, OvModule)) or type(m).__module__.startswith("torch.ao.nn.quantized")
               for m in model.modules())


def evaluate_step(name: str) -> str:
    """The step (its name in the plan and timings.json) that scores row `name`."""
    return f"evaluate {name}"


def validate_variant(model: nn.Module, cfg: Config, *, amp: str = "none", channels_last: bool = False,
                     step: str | None = None) -> dict:
    """The model scored on eval_subset of cfg's val split, on cfg.device or on the CPU for int8 / ONNX
    Runtime models (a GPU profile still scores them); with each image's confusion matrix
    ("per_image"), which the verdicts pair. `step`: its name in timings.json."""
    if cpu_only(model) and cfg.device != "cpu":
        cfg = derive(cfg, {"device": "cpu"})
    device = resolve_device(cfg.device)
    val = build_dataset(cfg.data, cfg.data.val_split)
    images = Subset(val, eval_subset(len(val), cfg.quant.eval_images))
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with timed_step(cfg, step):
        cm = confusion_over(model, eval_loader(images, cfg, device), device, autocast_dtype(amp, device),
                            channels_last, per_image=True)
    return cm.compute() | {"per_image": cm.per_image}


def on_subset(metrics: dict, cfg: Config) -> dict:
    """Metrics over the whole val split with "per_image" (evaluation.from_training) restricted to
    eval_subset, as validate_variant would have scored them."""
    per_image = metrics["per_image"]
    cm = ConfusionMatrix.from_per_image(per_image[eval_subset(len(per_image), cfg.quant.eval_images)])
    return cm.compute() | {"per_image": cm.per_image}


def variant(model: nn.Module, cfg: Config, *, engine: str, precision: str, metrics: dict | None = None,
            latency: dict | None = None, channels_last: bool = False, amp: str = "none",
            size_bytes: int | None = None, path: str | Path | None = None, name: str | None = None) -> dict:
    """One row of the study for a model returning {"out": logits}: validation metrics and per-image
    confusions (validate_variant; pass `metrics` to reuse them), size on disk (the file at `path`,
    else the state_dict) and, when given, its batch-1 `latency` (measure.latency's dict). Without one
    the latency is left for the round in which every row is timed in turn (quantization.time_in_turn):
    a timing of each row alone would be replaced there. With channels_last the model is copied first:
    validation converts in place. `name`: the row's, whose steps timings.json times."""
    if channels_last:
        model = copy.deepcopy(model)
    if metrics is None:
        metrics = validate_variant(model, cfg, amp=amp, channels_last=channels_last,
                                   step=evaluate_step(name) if name else None)
    if size_bytes is None:
        size_bytes = Path(path).stat().st_size if path else measure.size_on_disk(model)
    # per_image: saved apart from the JSON (results_files.write_quantization); times: every timing
    per_image = metrics.get("per_image")
    latency = latency or {}
    return {"engine": engine, "precision": precision, "miou": metrics["miou"], "iou": metrics["iou"],
            "latency_ms": latency.get("median_ms"), "latency_times_ms": latency.get("times_ms"), "latency": latency,
            "size_bytes": size_bytes, "path": str(path) if path else None, "per_image": per_image,
            "val_images": None if per_image is None else len(per_image)}


def table(rows: dict[str, dict], reference: str = "fp32 eager") -> pd.DataFrame:
    return result_tables.quantization_table(rows, reference)


def per_class_delta(rows: dict[str, dict], reference: str = "fp32 eager") -> pd.DataFrame:
    """IoU change in points per class (columns) and variant (rows) against the reference."""
    ref = rows[reference]["iou"]
    return pd.DataFrame({name: {c: 100 * (v - ref[c]) if _finite(v) and _finite(ref[c]) else math.nan
                                for c, v in r["iou"].items()}
                         for name, r in rows.items() if name != reference}).T.round(2)


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


