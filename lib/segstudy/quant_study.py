"""Notebook 05's study helpers: one row per inference variant (engine x precision) with validation
mIoU, per-class IoU, batch-1 latency and size on disk; the tables, issue 6's targets, the QAT
decision and the results file. The quantization itself is in quantize.py and onnx_export.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from segstudy import measure
from segstudy.config import Config
from segstudy.errors import UserError
from segstudy.quantize import atomic_path


def cpu_only(model: nn.Module) -> bool:
    """int8 kernels (torch's quantized modules) and ONNX Runtime sessions run on the CPU only."""
    from segstudy.onnx_export import OrtModule

    return any(isinstance(m, OrtModule) or type(m).__module__.startswith("torch.ao.nn.quantized")
               for m in model.modules())


def validate(model: nn.Module, cfg: Config, *, amp: str = "none", channels_last: bool = False) -> dict:
    """train.validate on cfg.device, or on the CPU for int8 / ONNX Runtime models (a GPU profile
    still scores them)."""
    from segstudy.train import validate as validate_on

    if cpu_only(model) and cfg.device != "cpu":
        cfg = dataclasses.replace(cfg, device="cpu")
    return validate_on(model, cfg, amp=amp, channels_last=channels_last)


def variant(model: nn.Module, cfg: Config, *, engine: str, precision: str, metrics: dict | None = None,
            latency: dict | None = None, channels_last: bool = False, amp: str = "none",
            size_bytes: int | None = None, path: str | Path | None = None) -> dict:
    """One row of the study for a model returning {"out": logits}: validation metrics
    (train.validate; pass `metrics` to reuse them), batch-1 latency at the bench size
    (measure.latency; pass `latency` for ORT) and size on disk (the file at `path`, else the
    state_dict). With channels_last the model is copied first: validate and measure.latency
    convert in place."""
    if channels_last:
        model = copy.deepcopy(model)
    if metrics is None:
        metrics = validate(model, cfg, amp=amp, channels_last=channels_last)
    if latency is None:
        b = cfg.bench
        latency = measure.latency(model, b.height, b.width, warmup=b.warmup, iters=b.iters,
                                  channels_last=channels_last, dtype=torch.bfloat16 if amp == "bf16" else None)
    if size_bytes is None:
        size_bytes = Path(path).stat().st_size if path else measure.size_on_disk(model)
    return {"engine": engine, "precision": precision, "miou": metrics["miou"], "iou": metrics["iou"],
            "latency_ms": latency["median_ms"], "latency": latency, "size_bytes": size_bytes,
            "path": str(path) if path else None}


def table(rows: dict[str, dict], reference: str = "fp32 eager") -> pd.DataFrame:
    """mIoU, its change vs the reference, latency, speed-up, size: one row per variant."""
    ref = rows[reference]
    out = pd.DataFrame({name: {
        "engine": r["engine"], "precision": r["precision"], "val mIoU %": 100 * r["miou"],
        "Δ mIoU points": 100 * (r["miou"] - ref["miou"]), "latency ms": r["latency_ms"],
        "speed-up vs fp32 eager": ref["latency_ms"] / r["latency_ms"], "size MB": r["size_bytes"] / 2**20,
    } for name, r in rows.items()}).T
    return out.astype({c: float for c in out.columns if c not in ("engine", "precision")}).round(2)


def per_class_delta(rows: dict[str, dict], reference: str = "fp32 eager") -> pd.DataFrame:
    """IoU change in points per class (columns) and variant (rows) against the reference."""
    ref = rows[reference]["iou"]
    return pd.DataFrame({name: {c: 100 * (v - ref[c]) if _finite(v) and _finite(ref[c]) else math.nan
                                for c, v in r["iou"].items()}
                         for name, r in rows.items() if name != reference}).T.round(2)


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def speedup_target(cpu: dict) -> float:
    """The issue's bar: 5x over fp32 eager where the CPU has int8 dot-product instructions
    (AVX-512 VNNI / AMX), 3x on AVX2-only machines."""
    return 5.0 if cpu.get("avx512_vnni") or cpu.get("amx_int8") else 3.0


def check_targets(cpu: dict, rows: dict[str, dict], int8: Sequence[str], *, fp32: str = "fp32 eager",
                  max_loss: float = 1.0, within: float = 1.2) -> dict[str, dict]:
    """Issue 6's targets for each dense int8 variant in `int8`: speed-up vs `fp32` >= speedup_target,
    latency within `within` x of the fastest of them, mIoU loss <= max_loss points (when measured:
    rows without "miou", as in the benchmark, are judged on speed only)."""
    need = speedup_target(cpu)
    present = [k for k in int8 if k in rows]
    if fp32 not in rows or not present:
        return {}
    fastest = min(rows[k]["latency_ms"] for k in present)
    out = {}
    for k in present:
        r = rows[k]
        speedup, ratio = rows[fp32]["latency_ms"] / r["latency_ms"], r["latency_ms"] / fastest
        loss = 100 * (rows[fp32]["miou"] - r["miou"]) if "miou" in r and "miou" in rows[fp32] else None
        out[k] = {"speedup": speedup, "speedup_target": need, "ratio_to_fastest_int8": ratio,
                  "miou_loss_points": loss,
                  "passed": speedup >= need and ratio <= within and (loss is None or loss <= max_loss)}
    return out


def qat_decision(mode: str, ptq_loss_points: float, max_loss: float) -> tuple[bool, str]:
    """Whether to run QAT (quant.qat: auto | always | never) and why, in words."""
    if mode not in ("auto", "always", "never"):
        raise UserError(f"quant.qat = '{mode}'; choose auto, always or never")
    if mode != "auto":
        return mode == "always", f"quant.qat = {mode}"
    if ptq_loss_points > max_loss:
        return True, f"PTQ lost {ptq_loss_points:.2f} mIoU points > {max_loss}"
    return False, f"PTQ lost {ptq_loss_points:.2f} mIoU points <= {max_loss}: QAT not needed"


def trained_model(cfg: Config, name: str = "custom") -> nn.Module:
    """The trained model of notebooks 01/02 (outputs/<profile>/runs/<name>/checkpoint_best.pt),
    trained now with the profile's schedule when it is missing."""
    from segstudy.models import load_trained
    from segstudy.train import train

    ckpt = cfg.output_dir / "runs" / name / "checkpoint_best.pt"
    if not ckpt.is_file():
        print(f"[segstudy] {ckpt} does not exist (notebook 02 writes it): training {name} now")
        ckpt = Path(train(cfg, model_name=name, progress=False)["checkpoint_best"])
    return load_trained(ckpt)


def pruned_checkpoint(cfg: Config) -> Path:
    """Where notebook 04 saves the structurally pruned custom model."""
    return cfg.output_dir / "04_pruning_sweeps" / "pruned_structured.pt"


def _plain(v):
    """JSON-ready: NaN/inf -> None, dataclasses -> dicts, paths -> strings, int keys -> strings."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _plain(dataclasses.asdict(v))
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v) if isinstance(v, Path) else v


def save_json(path: str | Path, payload: dict) -> Path:
    """Write the results file atomically (a crash never leaves half a JSON for notebook 06)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_plain(payload), indent=2))
    return Path(path)


def register_int8(cfg: Config, rows: dict[str, dict], artefacts: dict[str, str]) -> dict | None:
    """The ONNX Runtime int8 model (the servable int8 form: no torch needed to run it) as
    segstudy-custom-int8@champion, tagged with its measured mIoU and latency."""
    from segstudy import registry

    row = rows["int8 ONNX Runtime"]
    return registry.register(cfg, artefacts["int8_onnx"], "segstudy-custom-int8",
                             {"val_miou": row["miou"], "latency_ms": row["latency_ms"]},
                             tags={"engine": "onnxruntime", "precision": row["precision"]})
