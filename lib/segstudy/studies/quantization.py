"""Notebook 05: the trained custom model in every inference form this CPU offers, one row per
variant (engine x precision) with validation mIoU, per-class IoU, batch-1 latency and size on
disk; the int8 targets, the QAT decision and what the results file holds. The quantization itself
is in compress/quantize.py (torch FX) and compress/onnx_export.py (ONNX Runtime).

The notebook runs one function per step on a `QuantStudy`, which gathers the rows as it goes.
Every row is scored on the same images (`eval_subset`: the whole val split, or quant.eval_images of
it evenly spread), so the verdicts' paired intervals over images hold; `steps` lists the work for
the plan (segstudy plan), and each piece's actual seconds go to timings.json under the same key.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset

from segstudy.compress import onnx_export, quantize
from segstudy.compress.onnx_export import OrtModule
from segstudy.config import Config, derive
from segstudy.data.datasets import build_dataset
from segstudy.deploy import registry
from segstudy.engine import measure, run_folder, timings
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.engine.evaluation import confusion_over, eval_loader, from_training
from segstudy.engine.metrics import ConfusionMatrix
from segstudy.engine.timings import Passes, Step
from segstudy.errors import UserError
from segstudy.models.checkpoint import load_trained
from segstudy.studies import results_files

NOTEBOOK = "05_quantization"  # its QAT fine-tune's and its steps' keys in the plan and timings.json
QAT = "qat"
# the rows' names (results_files.INT8_VARIANTS: the dense int8 ones the targets and verdicts read)
FX_INT8, ORT_INT8, QAT_INT8 = results_files.INT8_VARIANTS
ORT_FP32, PRUNED_FP32, PRUNED_INT8 = "ONNX Runtime fp32", "pruned fp32", "pruned + int8 torch FX"
LATENCY = "latency"  # the step that holds every latency timing of the notebook
AGREEMENT = "compare outputs"  # the step of onnx_runtime's output agreement (quant.compare_images)
AGREEMENT_VARIANTS = (ORT_FP32, FX_INT8, ORT_INT8)  # compared with fp32 eager there
PRUNED = "pruned"  # notebook 04's structurally pruned custom model, in the calibration step's name


def eval_subset(val_images: int, wanted: int) -> list[int]:
    """The val images every row is scored on: all `val_images` when `wanted` is 0 or not fewer, else
    the middle image of each of `wanted` equal blocks of the split (evenly spread: Cityscapes' val is
    ordered by city, so every city keeps its share). Fixed, so every variant is scored on the same
    images and the paired interval over them holds."""
    if not wanted or wanted >= val_images:
        return list(range(val_images))
    return [(2 * i + 1) * val_images // (2 * wanted) for i in range(wanted)]


def calibration_count(cfg: Config) -> int:
    """Training images the study calibrates on: the largest of quant.calib_images and quant.calib_sweep."""
    return max(cfg.quant.calib_images, *cfg.quant.calib_sweep)


def sweep_sizes(cfg: Config) -> list[int]:
    """The calibration sizes fx_ptq converts (and scores) an int8 copy at."""
    return sorted({cfg.quant.calib_images, *cfg.quant.calib_sweep})


@contextlib.contextmanager
def _timed(cfg: Config, name: str | None) -> Iterator[None]:
    """timings.timed under this notebook's step `name` (no record without a name)."""
    with timings.timed(cfg, timings.step_key(NOTEBOOK, name)) if name else contextlib.nullcontext():
        yield


def cpu_only(model: nn.Module) -> bool:
    """int8 kernels (torch's quantized modules) and ONNX Runtime sessions run on the CPU only."""
    return any(isinstance(m, OrtModule) or type(m).__module__.startswith("torch.ao.nn.quantized")
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
    with _timed(cfg, step):
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
    confusions (validate_variant; pass `metrics` to reuse them), batch-1 latency at the bench size
    with every timing (measure.latency; pass `latency` for ORT) and size on disk (the file at
    `path`, else the state_dict). With channels_last the model is copied first: validate and measure.latency
    convert in place. `name`: the row's, whose steps timings.json times."""
    if channels_last:
        model = copy.deepcopy(model)
    if metrics is None:
        metrics = validate_variant(model, cfg, amp=amp, channels_last=channels_last,
                                   step=evaluate_step(name) if name else None)
    if latency is None:
        b = cfg.bench
        with _timed(cfg, LATENCY if name else None):
            latency = measure.latency(model, b.height, b.width, warmup=b.warmup, iters=b.iters,
                                      channels_last=channels_last, dtype=torch.bfloat16 if amp == "bf16" else None)
    if size_bytes is None:
        size_bytes = Path(path).stat().st_size if path else measure.size_on_disk(model)
    # per_image: saved apart from the JSON (results_files.write_quantization); times: every timing
    per_image = metrics.get("per_image")
    return {"engine": engine, "precision": precision, "miou": metrics["miou"], "iou": metrics["iou"],
            "latency_ms": latency["median_ms"], "latency_times_ms": latency.get("times_ms"), "latency": latency,
            "size_bytes": size_bytes, "path": str(path) if path else None, "per_image": per_image,
            "val_images": None if per_image is None else len(per_image)}


def table(rows: dict[str, dict], reference: str = "fp32 eager") -> pd.DataFrame:
    return results_files.quantization_table(rows, reference)


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
    """The int8 targets for each dense int8 variant in `int8`: speed-up vs `fp32` >= speedup_target,
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
        speedup, ratio = results_files.speedup_ratio(r, rows[fp32]), r["latency_ms"] / fastest
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
    """The trained model of notebooks 01/02 (outputs/<profile>/runs/<name>/checkpoint_best.pt)."""
    ckpt = run_folder.best(cfg, name)
    if not ckpt.is_file():
        notebook = "02_custom_model" if name == "custom" else "01_baselines"
        raise UserError(f"{ckpt} does not exist: notebook 05 quantizes the model notebook {notebook} trains; "
                        f"run it first (./run_all.sh {cfg.profile} --only {notebook[:2]})")
    return load_trained(ckpt)


def pruned_checkpoint(cfg: Config) -> Path:
    """Where notebook 04 saves the structurally pruned custom model."""
    return cfg.output_dir / "04_pruning_sweeps" / "pruned_structured.pt"


@dataclasses.dataclass
class QuantStudy:
    """What notebook 05 has measured so far: rows by variant name, the models behind them, the
    files written, and the notes each step leaves for the results file."""

    cfg: Config
    out: Path
    cpu: dict
    threads: int
    fp32: nn.Module
    calib: quantize.CalibrationImages  # read one at a time
    rows: dict[str, dict] = dataclasses.field(default_factory=dict)
    models: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    # name -> (model, channels_last, amp): how each row's model runs, for time_in_turn
    runs: dict[str, tuple[nn.Module, bool, str]] = dataclasses.field(default_factory=dict)
    artefacts: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        c, b = self.cpu, self.cfg.bench
        return (f"{c['cpu']}: {self.threads} threads, avx2={c['avx2']} avx512_vnni={c['avx512_vnni']} "
                f"avx512_bf16={c['avx512_bf16']} amx_int8={c['amx_int8']}; latency: batch 1 at {b.width}x{b.height}, "
                f"median of {b.iters} after {b.warmup} warm-up, and at the end every variant timed in turn with "
                f"fp32 eager for {b.iters} rounds (the speed-ups); int8 speed-up target "
                f"{speedup_target(c):.0f}x; {self.scored_on()}")

    def scored_on(self) -> str:
        """Which val images every row is scored on, in words (eval_subset)."""
        n, of = self.notes["eval_images"]["images"], self.notes["eval_images"]["of"]
        if n == of:
            return f"every row scored on all {of} val images"
        return (f"every row scored on the same {n} of the {of} val images (quant.eval_images, evenly spread: "
                f"the paired intervals are over these {n})")


def add(study: QuantStudy, name: str, model: nn.Module, *, channels_last: bool = False, amp: str = "none",
        **row) -> dict:
    """variant() of `model` as the study's row `name`, remembered for time_in_turn."""
    study.rows[name] = variant(model, study.cfg, channels_last=channels_last, amp=amp, name=name, **row)
    study.runs[name] = (model, channels_last, amp)
    return study.rows[name]


def time_in_turn(study: QuantStudy) -> pd.DataFrame:
    """Every variant timed in turn with fp32 eager, bench.iters rounds of one pass each (no speed verdict
    rests on these; bench.speedup_iters = 15 rounds of all 8 took notebook 05 from 97 to 182 s in the
    demo on a Zen 4 EPYC): each
    row's latency becomes these timings, with the reference's of the same rounds
    ("reference_times_ms"), so every speed-up (results_files.speedup) is read round by round and a
    slow minute of the machine slows both sides. Returns the table with them."""
    b = study.cfg.bench
    x = torch.randn(1, 3, b.height, b.width)
    runners = {name: _runner(model, channels_last, amp, x) for name, (model, channels_last, amp) in study.runs.items()}
    with torch.inference_mode(), _timed(study.cfg, LATENCY):
        timed = measure.timed_in_turn(runners, b.warmup, b.iters, size=f"{b.width}x{b.height}")
    reference = timed["fp32 eager"]["times_ms"]
    for name, t in timed.items():
        study.rows[name] |= {"latency_ms": t["median_ms"], "latency_times_ms": t["times_ms"], "latency": t,
                             "reference_times_ms": reference}
    study.notes["timed_in_turn"] = {"rounds": b.iters, "warmup": b.warmup, "reference": "fp32 eager"}
    return table(study.rows)


def _runner(model: nn.Module, channels_last: bool, amp: str, x: torch.Tensor) -> Callable[[], object]:
    """One batch-1 pass of a variant as it is measured alone (measure.latency, onnx_export.latency)."""
    if isinstance(model, OrtModule):  # the bare session, as onnx_export.latency times it
        feed = {model.input_name: np.ascontiguousarray(x.numpy())}
        return lambda: model.session.run(None, feed)
    if channels_last:
        model, x = copy.deepcopy(model).to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    model = model.eval()
    if amp == "bf16":
        def run() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)
        return run
    return lambda: model(x)


def start(cfg: Config) -> QuantStudy:
    """Threads (torch and ONNX Runtime get the same cores), the CPU, notebook 02's model, the
    calibration images (training images, eval transforms) and the val images every row is scored on."""
    threads = quantize.set_threads(cfg.quant.threads)
    study = QuantStudy(cfg, cfg.output_dir / "05_quantization", measure.cpu_info(), threads, trained_model(cfg),
                       quantize.calibration_images(cfg, calibration_count(cfg)))
    study.models["fp32 eager"] = study.fp32
    val = len(build_dataset(cfg.data, cfg.data.val_split, raw=True))
    study.notes["eval_images"] = {"images": len(eval_subset(val, cfg.quant.eval_images)), "of": val,
                                  "quant.eval_images": cfg.quant.eval_images}
    return study


REFERENCES = {"fp32 eager": ("none", False), "fp32 channels_last": ("none", True),
              "bf16 autocast + channels_last": ("bf16", True)}  # name: (amp, channels_last)


def references(study: QuantStudy) -> pd.DataFrame:
    """fp32 eager, fp32 channels_last and bf16 autocast + channels_last. The one that evaluates as
    notebook 02's training did reads its accuracy from there (evaluation.from_training)."""
    fp32, cfg = study.fp32, study.cfg
    for name, (amp, channels_last) in REFERENCES.items():
        known = from_training(run_folder.run_dir(cfg, "custom"), cfg, amp=amp, channels_last=channels_last)
        if known:
            study.notes["accuracy_from_training"] = name
            known = on_subset(known, cfg)
        add(study, name, fp32, engine="torch", precision="bf16" if amp == "bf16" else "fp32",
            channels_last=channels_last, amp=amp, metrics=known)
    return table(study.rows)


def calibrate_step(engine: str, model: str = "custom") -> str:
    """The step (its name in the plan and timings.json) that calibrates `model` with `engine`."""
    return f"calibrate {engine} {model}"


def _fx_int8(study: QuantStudy, model: nn.Module, name: str) -> nn.Module:
    q = study.cfg.quant
    with _timed(study.cfg, calibrate_step("torch FX", name)):
        return quantize.fx_ptq(model, study.calib, [q.calib_images], q.observer)["models"][q.calib_images]


def sweep_name(n: int) -> str:
    """The int8 copy fx_ptq scores at n calibration images, apart from quant.calib_images' (FX_INT8's row)."""
    return f"{FX_INT8} (N={n})"


def fx_ptq(study: QuantStudy) -> pd.DataFrame:
    """Post-training int8 with torch FX; one calibration pass, a converted copy at each N of
    quant.calib_sweep. Returns validation mIoU vs N (and cumulative calibration time)."""
    cfg, q = study.cfg, study.cfg.quant
    with _timed(cfg, calibrate_step("torch FX")):
        ptq = quantize.fx_ptq(study.fp32, study.calib, sweep_sizes(cfg), q.observer)
    sweep = {n: validate_variant(m, cfg, step=evaluate_step(FX_INT8 if n == q.calib_images else sweep_name(n)))
             for n, m in ptq["models"].items()}
    int8 = study.models[FX_INT8] = ptq["models"][q.calib_images]
    path = quantize.save_torchscript(int8, study.out / "custom_int8_fx.pt")
    study.artefacts["int8_fx_torchscript"] = str(path)
    add(study, FX_INT8, int8, engine="torch FX (x86)", precision="int8", metrics=sweep[q.calib_images], path=path)
    study.notes["calibration_sweep"] = {n: {"miou": m["miou"], "calibrate_s": ptq["calibrate_s"][n]}
                                        for n, m in sweep.items()}
    study.notes["fx_kept_in_float"] = ptq["notes"]
    return pd.DataFrame({"val mIoU %": {n: 100 * m["miou"] for n, m in sweep.items()},
                         "calibration s (cumulative)": ptq["calibrate_s"]}).rename_axis("N images").round(2)


def onnx_runtime(study: QuantStudy) -> pd.DataFrame:
    """ONNX Runtime fp32 and static int8 (QDQ) from the same calibration images; returns how far
    their outputs (and torch FX int8's) are from PyTorch fp32 on a few validation images."""
    cfg, q, b = study.cfg, study.cfg.quant, study.cfg.bench
    with _timed(cfg, calibrate_step("ONNX Runtime")):  # the export too: seconds beside the calibration
        onnx_fp32 = onnx_export.export(study.fp32, study.out / "custom_fp32.onnx", study.calib[0][None])
        onnx_int8 = onnx_export.quantize_int8(onnx_fp32, study.out / "custom_int8.onnx",
                                              study.calib[:q.calib_images],
                                              q.ort_activation)
    study.artefacts |= {"fp32_onnx": str(onnx_fp32), "int8_onnx": str(onnx_int8)}
    for name, path, precision in [(ORT_FP32, onnx_fp32, "fp32"),
                                  (ORT_INT8, onnx_int8, f"int8 ({q.ort_activation} activations)")]:
        session = onnx_export.session(path, study.threads)
        study.models[name] = onnx_export.OrtModule(session)
        with _timed(cfg, LATENCY):
            latency = onnx_export.latency(session, b.height, b.width, b.warmup, b.iters)
        add(study, name, study.models[name], engine="onnxruntime", precision=precision, path=path, latency=latency)
    val_images = quantize.validation_images(cfg, q.compare_images)
    with _timed(cfg, AGREEMENT):
        agreement = quantize.agreement(study.fp32, {name: study.models[name] for name in AGREEMENT_VARIANTS},
                                       val_images)
    study.notes["agreement_vs_fp32"] = agreement
    return pd.DataFrame(agreement).T.rename(columns={"max_abs": "max |Δ logits|", "mean_abs": "mean |Δ logits|",
                                                     "pixel_agreement": "argmax agreement"})


def qat(study: QuantStudy) -> str:
    """Quantization-aware training when qat_decision says so; returns the decision in words."""
    cfg, q = study.cfg, study.cfg.quant
    ptq_loss = 100 * (study.rows["fp32 eager"]["miou"] - study.rows[FX_INT8]["miou"])
    run, reason = qat_decision(q.qat, ptq_loss, q.max_loss)
    info = study.notes["qat"] = {"ran": run, "reason": reason}
    if run:
        result = quantize.qat(study.fp32, cfg, q.qat_epochs, lr=q.qat_lr or None,
                              timing_key=timings.step_key(NOTEBOOK, QAT))
        path = quantize.save_torchscript(result["model"], study.out / "custom_int8_qat.pt")
        add(study, QAT_INT8, result["model"], engine="torch FX (x86)", precision="int8", path=path)
        info |= {"epochs": q.qat_epochs, "train_seconds": result["train_seconds"],
                 "fake_quant_miou": result["fake_quant_miou"], "path": str(path)}
        study.artefacts["int8_qat_torchscript"] = str(path)
    return ("running QAT: " if run else "QAT skipped: ") + reason


def pruned_int8(study: QuantStudy) -> str:
    """Notebook 04's structurally pruned model in fp32 and FX int8, when it exists."""
    path = pruned_checkpoint(study.cfg)
    info = study.notes["pruned"] = {"checkpoint": str(path), "available": path.is_file()}
    if not path.is_file():
        return f"no pruned model at {path}: run notebook 04 first; the pruned rows are skipped"
    pruned = load_trained(path)
    add(study, PRUNED_FP32, pruned, engine="torch", precision="fp32")
    int8 = _fx_int8(study, pruned, PRUNED)
    int8_path = quantize.save_torchscript(int8, study.out / "pruned_int8_fx.pt")
    add(study, PRUNED_INT8, int8, engine="torch FX (x86)", precision="int8", path=int8_path)
    info["parameters"] = measure.parameters(pruned)
    study.artefacts["pruned_int8_fx_torchscript"] = str(int8_path)
    return f"pruned model of {info['parameters'] / 1e6:.1f} M parameters quantized from {path}"


def other_models(study: QuantStudy) -> list[pd.DataFrame]:
    """Each model of quant.other_models whose trained checkpoint exists, fp32 and FX int8; one
    table each, against that model's own fp32."""
    cfg, tables = study.cfg, []
    other = study.notes.setdefault("other_models", {})
    for name in cfg.quant.other_models:
        ckpt = run_folder.best(cfg, name)
        if not ckpt.is_file():
            print(f"no trained {name} at {ckpt}: run notebook 01 first; skipped")
            continue
        model = load_trained(ckpt)
        int8 = _fx_int8(study, model, name)
        path = quantize.save_torchscript(int8, study.out / f"{name}_int8_fx.pt")
        b = cfg.bench  # the pair timed in turn, as time_in_turn times notebook 05's own variants
        with _timed(cfg, LATENCY):
            timed = measure.latencies({"fp32": model, "int8": int8}, b.height, b.width, warmup=b.warmup,
                                      iters=b.iters)
        same_rounds = {"reference_times_ms": timed["fp32"]["times_ms"]}
        fp32_name, int8_name = other_names(name)
        rows = {fp32_name: variant(model, cfg, engine="torch", precision="fp32", latency=timed["fp32"],
                                   name=fp32_name) | same_rounds,
                int8_name: variant(int8, cfg, engine="torch FX (x86)", precision="int8", path=path,
                                   latency=timed["int8"], name=int8_name) | same_rounds}
        other |= rows
        study.artefacts[f"{name}_int8_fx_torchscript"] = str(path)
        tables.append(table(rows, reference=f"{name} fp32 eager"))
    return tables


def other_names(model: str) -> tuple[str, str]:
    """The fp32 and int8 rows of a model of quant.other_models."""
    return f"{model} fp32 eager", f"{model} int8 PTQ torch FX"


def steps(cfg: Config, val_images: int) -> list[Step]:
    """This notebook's work besides QAT's fine-tune, for the plan, in the order it runs: each row scored
    on eval_subset of the `val_images` val images (int8 and ONNX Runtime on the CPU, the rest on
    cfg.device), each calibration, the output agreement and, last, every latency timing (batch 1 at
    the bench size on the CPU: each variant alone, then in turn; quant.other_models' pair in turn)."""
    q, b = cfg.quant, cfg.bench
    n, rounds = len(eval_subset(val_images, q.eval_images)), b.warmup + b.iters
    size, observer = (cfg.data.base_size, 2 * cfg.data.base_size), f"calibrate {q.observer}"
    qat_note = "only if PTQ loses more than quant.max_loss" if q.qat == "auto" else ""
    pruned_note = "if notebook 04's pruned model exists; at the dense model's cost, an upper bound"

    def evaluate(name: str, engine: str, model: str = "custom", note: str = "") -> Step:
        return Step(NOTEBOOK, evaluate_step(name), "evaluate", engine not in ("fp32", "bf16"), size,
                    (Passes(model, engine, n),), note)

    def calibrate(engine: str, passes: Passes, name: str, note: str = "") -> Step:
        return Step(NOTEBOOK, calibrate_step(engine, name), "calibrate", True, size, (passes,), note)

    timed = {name: "bf16" if amp == "bf16" else "fp32" for name, (amp, _) in REFERENCES.items()}  # engines
    out = [evaluate(name, engine, note="none if it reads notebook 02's validation (references())")
           for name, engine in timed.items()]
    out.append(calibrate("torch FX", Passes("custom", observer, calibration_count(cfg)), "custom"))
    out += [evaluate(FX_INT8 if k == q.calib_images else sweep_name(k), "int8 torch FX") for k in sweep_sizes(cfg)]
    out.append(calibrate("ONNX Runtime", Passes("custom", "calibrate ONNX Runtime", q.calib_images), "custom"))
    out += [evaluate(ORT_FP32, "ONNX Runtime fp32"), evaluate(ORT_INT8, "int8 ONNX Runtime")]
    timed |= {FX_INT8: "int8 torch FX", ORT_FP32: "ONNX Runtime fp32", ORT_INT8: "int8 ONNX Runtime"}
    out.append(Step(NOTEBOOK, AGREEMENT, "evaluate", True, size, tuple(
        Passes("custom", e, q.compare_images) for e in ("fp32", *(timed[v] for v in AGREEMENT_VARIANTS)))))
    if q.qat != "never":
        out.append(evaluate(QAT_INT8, "int8 torch FX", note=qat_note))
        timed[QAT_INT8] = "int8 torch FX"
    out += [evaluate(PRUNED_FP32, "fp32", note=pruned_note),
            calibrate("torch FX", Passes("custom", observer, q.calib_images), PRUNED, pruned_note),
            evaluate(PRUNED_INT8, "int8 torch FX", note=pruned_note)]
    timed |= {PRUNED_FP32: "fp32", PRUNED_INT8: "int8 torch FX"}
    work = [Passes("custom", engine, 2 * rounds) for engine in timed.values()]
    for model in q.other_models:
        fp32_name, int8_name = other_names(model)
        note = f"if notebook 01's trained {model} exists"
        out += [calibrate("torch FX", Passes(model, observer, q.calib_images), model, note),
                evaluate(fp32_name, "fp32", model, note), evaluate(int8_name, "int8 torch FX", model, note)]
        work += [Passes(model, "fp32", rounds), Passes(model, "int8 torch FX", rounds)]
    note = f"{len(timed)} variants x {rounds} rounds alone, then in turn" + (
        f"; {len(q.other_models)} other model(s), fp32 and int8 in turn" if q.other_models else "")
    return out + [Step(NOTEBOOK, LATENCY, "latency", True, (b.height, b.width), tuple(work), note)]


def targets(study: QuantStudy) -> pd.DataFrame:
    """The int8 targets for each dense int8 variant, and whether pruned + int8 is the fastest."""
    rows, q = study.rows, study.cfg.quant
    int8 = [k for k in results_files.INT8_VARIANTS if k in rows]
    checked = study.notes["targets"] = check_targets(study.cpu, rows, int8, max_loss=q.max_loss)
    fastest = study.notes["fastest"] = min(rows, key=lambda k: rows[k]["latency_ms"])
    if PRUNED_INT8 in rows:
        study.notes["pruned"] |= {"lowest_latency": fastest == PRUNED_INT8,
                                  "miou_loss_vs_dense_fp32_points": 100 * (rows["fp32 eager"]["miou"]
                                                                           - rows[PRUNED_INT8]["miou"])}
    print(f"fastest variant: {fastest} ({rows[fastest]['latency_ms']:.1f} ms)")
    return pd.DataFrame(checked).T.round(3)


def save(study: QuantStudy) -> Path:
    """results.json (every row, the notes of each step) and the two tables as CSV."""
    variants, deltas = table(study.rows), per_class_delta(study.rows)
    return results_files.write_quantization(study.cfg, {
        "cpu": study.cpu, "threads": study.threads, "variants": study.rows,
        "per_class_iou_delta_vs_fp32": deltas.to_dict(orient="index"), **study.notes,
        "artefacts": study.artefacts}, variants, deltas)


def register_int8(study: QuantStudy) -> dict | None:
    """The ONNX Runtime int8 model (the servable int8 form: no torch needed to run it) as
    segstudy-custom-int8@champion, tagged with its measured mIoU and latency."""
    row = study.rows[ORT_INT8]
    return registry.register(study.cfg, study.artefacts["int8_onnx"], "segstudy-custom-int8",
                             {"val_miou": row["miou"], "latency_ms": row["latency_ms"]},
                             tags={"engine": "onnxruntime", "precision": row["precision"]})
