"""Notebook 05: the trained custom model in every inference form this CPU offers, one row per
variant (engine x precision) with validation mIoU, per-class IoU, batch-1 latency and size on
disk; the int8 targets, the QAT decision and what the results file holds. The quantization itself
is in compress/quantize.py (torch FX), compress/onnx_export.py (ONNX Runtime) and
compress/openvino_int8.py (OpenVINO); which int8 form is deployed, in studies/int8_choice.py.

The notebook runs one function per step on a `QuantStudy`, which gathers the rows as it goes.
Every row is scored on the same images (`eval_subset`: the whole val split, or quant.eval_images of
it evenly spread), so the verdicts' paired intervals over images hold; `steps` lists the work for
the plan (segstudy plan), and each piece's actual seconds go to timings.json under the same key.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from segstudy.compress import onnx_export, openvino_int8, quantize
from segstudy.compress.onnx_export import OrtModule
from segstudy.compress.openvino_int8 import OvModule
from segstudy.config import Config
from segstudy.data.datasets import build_dataset
from segstudy.deploy import registry
from segstudy.engine import measure, run_folder, timings
from segstudy.engine.evaluation import from_training
from segstudy.errors import UserError
from segstudy.models.checkpoint import load_trained
from segstudy.studies import int8_choice, results_files
from segstudy.studies.quantization_rows import (
    LATENCY,
    NOTEBOOK,
    eval_subset,
    evaluate_step,
    on_subset,
    per_class_delta,
    table,
    timed_step,
    validate_variant,
    variant,
)
from segstudy.studies.verdict_inputs import Inputs, seed_noise

QAT = "qat"
# the rows' names (results_files.INT8_VARIANTS: the dense int8 ones the targets and verdicts read)
FX_INT8, ORT_INT8, OV_INT8, QAT_INT8 = results_files.INT8_VARIANTS
ORT_FP32, PRUNED_FP32, PRUNED_INT8 = "ONNX Runtime fp32", "pruned fp32", "pruned + int8 torch FX"
PRUNED_ORT_INT8, PRUNED_OV_INT8 = "pruned + int8 ONNX Runtime", "pruned + int8 OpenVINO"
# the dense int8 forms inference.load_engine runs (FX's TorchScript: no), in the order deployed_int8 prefers
# them on a tie: OpenVINO first, the engine issue 37's target measures the deployed form against
SERVABLE_INT8 = (OV_INT8, ORT_INT8)
PRUNED_INT8_FORMS = (PRUNED_OV_INT8, PRUNED_ORT_INT8, PRUNED_INT8)  # the pruned model's, in the same order
AGREEMENT = "compare outputs"  # the step of onnx_runtime's output agreement (quant.compare_images)
AGREEMENT_VARIANTS = (ORT_FP32, FX_INT8, ORT_INT8)  # compared with fp32 eager there
PRUNED = "pruned"  # notebook 04's structurally pruned custom model, in the calibration step's name


def calibration_count(cfg: Config) -> int:
    """Training images the study calibrates on: the largest of quant.calib_images and quant.calib_sweep."""
    return max(cfg.quant.calib_images, *cfg.quant.calib_sweep)


def sweep_sizes(cfg: Config) -> list[int]:
    """The calibration sizes fx_ptq converts (and scores) an int8 copy at."""
    return sorted({cfg.quant.calib_images, *cfg.quant.calib_sweep})


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
                f"at the end every variant timed in turn with fp32 eager, {b.iters} rounds after {b.warmup} "
                f"warm-up (the medians and the speed-ups); int8 speed-up target "
                f"{int8_choice.speedup_target(c):.0f}x; {self.scored_on()}")

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
    """Every variant timed in turn with fp32 eager, bench.iters rounds of one pass each (the only timing
    of the study's rows: bench.speedup_iters = 15 rounds of all 8 took notebook 05 from 97 to 182 s in
    the demo on a Zen 4 EPYC; benchmarks/bench_quantize.py times more rounds): each
    row's latency is these timings, with the reference's of the same rounds
    ("reference_times_ms"), so every speed-up (result_tables.speedup) is read round by round and a
    slow minute of the machine slows both sides. Returns the table with them."""
    b = study.cfg.bench
    x = torch.randn(1, 3, b.height, b.width)
    runners = {name: _runner(model, channels_last, amp, x) for name, (model, channels_last, amp) in study.runs.items()}
    with torch.inference_mode(), timed_step(study.cfg, LATENCY):
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
    if isinstance(model, OvModule):  # the bare request, as openvino_int8.latency times it
        image = np.ascontiguousarray(x.numpy())
        return lambda: model.run(image)
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
    with timed_step(study.cfg, calibrate_step("torch FX", name)):
        return quantize.fx_ptq(model, study.calib, [q.calib_images], q.observer)["models"][q.calib_images]


def sweep_name(n: int) -> str:
    """The int8 copy fx_ptq scores at n calibration images, apart from quant.calib_images' (FX_INT8's row)."""
    return f"{FX_INT8} (N={n})"


def fx_ptq(study: QuantStudy) -> pd.DataFrame:
    """Post-training int8 with torch FX; one calibration pass, a converted copy at each N of
    quant.calib_sweep. Returns validation mIoU vs N (and cumulative calibration time)."""
    cfg, q = study.cfg, study.cfg.quant
    with timed_step(cfg, calibrate_step("torch FX")):
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
    cfg, q = study.cfg, study.cfg.quant
    with timed_step(cfg, calibrate_step("ONNX Runtime")):  # the export too: seconds beside the calibration
        onnx_fp32 = onnx_export.export(study.fp32, study.out / "custom_fp32.onnx", study.calib[0][None])
    study.artefacts["fp32_onnx"] = str(onnx_fp32)
    _ort_row(study, ORT_FP32, onnx_fp32, "fp32")
    _ort_row(study, ORT_INT8, _ort_int8(study, onnx_fp32, "custom_int8.onnx", "custom"),
             f"int8 ({q.ort_activation} activations)", "int8_onnx")
    val_images = quantize.validation_images(cfg, q.compare_images)
    with timed_step(cfg, AGREEMENT):
        agreement = quantize.agreement(study.fp32, {name: study.models[name] for name in AGREEMENT_VARIANTS},
                                       val_images)
    study.notes["agreement_vs_fp32"] = agreement
    return pd.DataFrame(agreement).T.rename(columns={"max_abs": "max |Δ logits|", "mean_abs": "mean |Δ logits|",
                                                     "pixel_agreement": "argmax agreement"})


def _ort_int8(study: QuantStudy, onnx_fp32: Path, file: str, model: str) -> Path:
    q = study.cfg.quant
    with timed_step(study.cfg, calibrate_step("ONNX Runtime", model)):
        return onnx_export.quantize_int8(onnx_fp32, study.out / file, study.calib[:q.calib_images], q.ort_activation)


def _ort_row(study: QuantStudy, name: str, path: Path, precision: str, artefact: str | None = None) -> None:
    """The ONNX file at `path` as the study's row `name` (scored, its file's size; timed in time_in_turn)."""
    study.models[name] = onnx_export.OrtModule(onnx_export.session(path, study.threads))
    add(study, name, study.models[name], engine="onnxruntime", precision=precision, path=path)
    if artefact:
        study.artefacts[artefact] = str(path)


def openvino(study: QuantStudy) -> str:
    """OpenVINO int8 (NNCF post-training quantization) of the same exported ONNX model, from the same
    calibration images; skipped, with the reason, where OpenVINO cannot run. Returns what it did."""
    why = study.notes["openvino"] = openvino_int8.unavailable()
    if why:
        return f"no OpenVINO rows: {why}"
    xml = _ov_int8(study, Path(study.artefacts["fp32_onnx"]), "custom_int8_openvino.xml", "custom")
    precision = _ov_row(study, OV_INT8, xml, "int8_openvino")
    return f"OpenVINO {openvino_int8.ov_version()} int8 from NNCF, other layers in {precision}: {xml}"


def _ov_int8(study: QuantStudy, onnx_fp32: Path, file: str, model: str) -> Path:
    with timed_step(study.cfg, calibrate_step("OpenVINO", model)):
        return openvino_int8.quantize_int8(onnx_fp32, study.out / file, study.calib[:study.cfg.quant.calib_images])


def _ov_row(study: QuantStudy, name: str, xml: Path, artefact: str) -> str:
    """The OpenVINO IR at `xml` as the study's row `name`; returns the precision of its float layers."""
    module = study.models[name] = OvModule(openvino_int8.compiled(xml, study.threads))
    precision = openvino_int8.inference_precision(module.model)
    add(study, name, module, engine="openvino", precision=f"int8 (NNCF; float layers {precision})", path=xml,
        size_bytes=xml.stat().st_size + openvino_int8.weights_file(xml).stat().st_size)
    study.artefacts[artefact] = str(xml)
    return precision


def qat(study: QuantStudy) -> str:
    """Quantization-aware training when qat_decision says so; returns the decision in words."""
    cfg, q = study.cfg, study.cfg.quant
    ptq_loss = 100 * (study.rows["fp32 eager"]["miou"] - study.rows[FX_INT8]["miou"])
    run, reason = int8_choice.qat_decision(q.qat, ptq_loss, cfg.report.keep_loss)
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
    """Notebook 04's structurally pruned model in fp32 and int8 with every engine (torch FX, ONNX
    Runtime, OpenVINO where it runs), when it exists; targets() chooses the study's pruned + int8 form."""
    path = pruned_checkpoint(study.cfg)
    info = study.notes["pruned"] = {"checkpoint": str(path), "available": path.is_file()}
    if not path.is_file():
        return f"no pruned model at {path}: run notebook 04 first; the pruned rows are skipped"
    pruned = load_trained(path)
    add(study, PRUNED_FP32, pruned, engine="torch", precision="fp32")
    int8 = _fx_int8(study, pruned, PRUNED)
    int8_path = quantize.save_torchscript(int8, study.out / "pruned_int8_fx.pt")
    add(study, PRUNED_INT8, int8, engine="torch FX (x86)", precision="int8", path=int8_path)
    study.artefacts["pruned_int8_fx_torchscript"] = str(int8_path)
    with timed_step(study.cfg, calibrate_step("ONNX Runtime", PRUNED)):
        onnx_fp32 = onnx_export.export(pruned, study.out / "pruned_fp32.onnx", study.calib[0][None])
    _ort_row(study, PRUNED_ORT_INT8, _ort_int8(study, onnx_fp32, "pruned_int8.onnx", PRUNED),
             f"int8 ({study.cfg.quant.ort_activation} activations)", "pruned_int8_onnx")
    if not openvino_int8.unavailable():  # said once, by openvino()
        _ov_row(study, PRUNED_OV_INT8, _ov_int8(study, onnx_fp32, "pruned_int8_openvino.xml", PRUNED),
                "pruned_int8_openvino")
    info["parameters"] = measure.parameters(pruned)
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
        with timed_step(cfg, LATENCY):
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


def targets(study: QuantStudy) -> pd.DataFrame:
    """The int8 targets for each dense int8 variant, which int8 form is deployed and which engine runs
    the pruned model (int8_choice: the first of PRUNED_INT8_FORMS unless another is distinguishably
    faster), and whether that is the fastest variant."""
    rows, keep = study.rows, study.cfg.report.keep_loss
    int8 = [k for k in results_files.INT8_VARIANTS if k in rows]
    noise = seed_noise(Inputs(study.cfg)) if QAT_INT8 in int8 else None
    checked = study.notes["targets"] = int8_choice.check_targets(study.cpu, rows, int8, max_loss=keep, noise=noise)
    fastest = study.notes["fastest"] = min(rows, key=lambda k: rows[k]["latency_ms"])
    deployed = study.notes["deployed_int8"] = int8_choice.deployed_int8(rows, SERVABLE_INT8, openvino=OV_INT8,
                                                                         max_loss=keep)
    other = [k for k in SERVABLE_INT8 if k in rows and deployed and k != deployed["variant"]]
    if PRUNED_INT8 in rows:
        forms = [k for k in PRUNED_INT8_FORMS if k in rows]
        pruned = int8_choice.first_not_slower(rows, forms)
        other += [k for k in forms if k != pruned]
        study.notes["pruned"] |= {"lowest_latency": fastest == pruned, "int8_form": pruned,
                                  "miou_loss_vs_dense_fp32_points": 100 * (rows["fp32 eager"]["miou"]
                                                                           - rows[pruned]["miou"])}
    # the same weights through the engines not chosen: the report's deployment candidates leave them out
    study.notes["other_engines"] = other
    print(f"fastest variant: {fastest} ({rows[fastest]['latency_ms']:.1f} ms)")
    if deployed:
        low, high = deployed.get("time_vs_openvino_interval", (0, 0))
        vs = (f", {deployed['time_vs_openvino']:.2f}x OpenVINO int8's time [{low:.2f}, {high:.2f}]"
              if "time_vs_openvino" in deployed else "")
        print(f"deployed int8: {deployed['variant']} ({deployed['latency_ms']:.1f} ms{vs}): {deployed['why']}")
    return pd.DataFrame(checked).T.round(3)


def save(study: QuantStudy) -> Path:
    """results.json (every row, the notes of each step) and the two tables as CSV."""
    variants, deltas = table(study.rows), per_class_delta(study.rows)
    return results_files.write_quantization(study.cfg, {
        "cpu": study.cpu, "threads": study.threads, "variants": study.rows,
        "per_class_iou_delta_vs_fp32": deltas.to_dict(orient="index"), **study.notes,
        "artefacts": study.artefacts}, variants, deltas)


def register_int8(study: QuantStudy) -> dict | None:
    """The deployed int8 model (targets(): int8_choice.deployed_int8's servable int8 form, which needs
    no torch to run) as segstudy-custom-int8@champion, tagged with its engine, measured mIoU and latency."""
    name = study.notes["deployed_int8"]["variant"]
    row = study.rows[name]
    return registry.register(study.cfg, row["path"], "segstudy-custom-int8",
                             {"val_miou": row["miou"], "latency_ms": row["latency_ms"]},
                             tags={"engine": row["engine"], "precision": row["precision"], "variant": name})
