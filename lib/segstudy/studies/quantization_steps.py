"""Notebook 05's work for the plan (segstudy plan): every scoring, calibration and latency timing
studies/quantization.py runs, under the step names it records its seconds with in timings.json."""

from __future__ import annotations

from segstudy.config import Config
from segstudy.engine.timings import Passes, Step
from segstudy.studies.quantization import (
    AGREEMENT,
    AGREEMENT_VARIANTS,
    FX_INT8,
    LATENCY,
    NOTEBOOK,
    ORT_FP32,
    ORT_INT8,
    OV_INT8,
    PRUNED,
    PRUNED_FP32,
    PRUNED_INT8,
    PRUNED_ORT_INT8,
    PRUNED_OV_INT8,
    QAT_INT8,
    REFERENCES,
    calibrate_step,
    calibration_count,
    other_names,
    sweep_name,
    sweep_sizes,
)
from segstudy.studies.quantization_rows import eval_subset, evaluate_step

OPENVINO_NOTE = "where OpenVINO runs (compress/openvino_int8.unavailable)"


def qat_note(cfg: Config) -> str:
    """When QAT runs, for the plan's row of its fine-tune and of its scoring."""
    return "only if PTQ loses more than report.keep_loss" if cfg.quant.qat == "auto" else ""


def steps(cfg: Config, val_images: int) -> list[Step]:
    """This notebook's work besides QAT's fine-tune, for the plan, in the order it runs: each row scored
    on eval_subset of the `val_images` val images (int8 and ONNX Runtime on the CPU, the rest on
    cfg.device), each calibration, the output agreement and, last, every latency timing (batch 1 at
    the bench size on the CPU: every variant in turn; quant.other_models' pair in turn)."""
    q, b = cfg.quant, cfg.bench
    n, rounds = len(eval_subset(val_images, q.eval_images)), b.warmup + b.iters
    size, observer = (cfg.data.base_size, 2 * cfg.data.base_size), f"calibrate {q.observer}"
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
    out += [calibrate("OpenVINO", Passes("custom", "calibrate OpenVINO", q.calib_images), "custom", OPENVINO_NOTE),
            evaluate(OV_INT8, "int8 OpenVINO", note=OPENVINO_NOTE)]
    timed[OV_INT8] = "int8 OpenVINO"
    if q.qat != "never":
        out.append(evaluate(QAT_INT8, "int8 torch FX", note=qat_note(cfg)))
        timed[QAT_INT8] = "int8 torch FX"
    out += [evaluate(PRUNED_FP32, "fp32", note=pruned_note)]
    pruned = {PRUNED_INT8: ("torch FX", observer), PRUNED_ORT_INT8: ("ONNX Runtime", "calibrate ONNX Runtime"),
              PRUNED_OV_INT8: ("OpenVINO", "calibrate OpenVINO")}  # row: (engine, its calibration's passes)
    for name, (engine, calibration) in pruned.items():
        out += [calibrate(engine, Passes("custom", calibration, q.calib_images), PRUNED, pruned_note),
                evaluate(name, f"int8 {engine}", note=pruned_note)]
        timed[name] = f"int8 {engine}"
    timed[PRUNED_FP32] = "fp32"
    work = [Passes("custom", engine, rounds) for engine in timed.values()]
    for model in q.other_models:
        fp32_name, int8_name = other_names(model)
        note = f"if notebook 01's trained {model} exists"
        out += [calibrate("torch FX", Passes(model, observer, q.calib_images), model, note),
                evaluate(fp32_name, "fp32", model, note), evaluate(int8_name, "int8 torch FX", model, note)]
        work += [Passes(model, "fp32", rounds), Passes(model, "int8 torch FX", rounds)]
    note = f"{len(timed)} variants x {rounds} rounds in turn" + (
        f"; {len(q.other_models)} other model(s), fp32 and int8 in turn" if q.other_models else "")
    return out + [Step(NOTEBOOK, LATENCY, "latency", True, (b.height, b.width), tuple(work), note)]


