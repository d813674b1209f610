"""Notebook 05's decisions, read off its rows: the int8 targets, whether to run QAT, and which int8
form is deployed (the fastest servable one, timed in turn with the others, within report.keep_loss
of fp32), with its time against OpenVINO's. Rows are the dicts studies/quantization.py builds
("latency_ms", "latency_times_ms" of the rounds timed in turn, "miou")."""

from __future__ import annotations

from collections.abc import Sequence

from segstudy.errors import UserError
from segstudy.studies import result_tables, verdicts


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
        speedup, ratio = result_tables.speedup_ratio(r, rows[fp32]), r["latency_ms"] / fastest
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


def deployed_int8(rows: dict[str, dict], servable: Sequence[str], *, openvino: str, fp32: str = "fp32 eager",
                  max_loss: float = 1.0) -> dict | None:
    """Which of the `servable` int8 rows is deployed: the lowest latency (the median of the rounds
    timed in turn) among those losing at most `max_loss` mIoU points against `fp32`, else the most
    accurate. With the `openvino` row present, the chosen one's time as a multiple of OpenVINO's
    (the median of the per-round ratios, with its bootstrap interval). None without servable rows."""
    present = [k for k in servable if k in rows]
    if not present:
        return None
    # rows without "miou" (the benchmark's) are judged on speed only, as check_targets judges them
    loss = {k: 100 * (rows[fp32]["miou"] - rows[k]["miou"]) if "miou" in rows[k] else 0.0 for k in present}
    kept = [k for k in present if loss[k] <= max_loss]
    pick = (min(kept, key=lambda k: rows[k]["latency_ms"]) if kept
            else min(present, key=lambda k: loss[k]))
    why = (f"the fastest of {', '.join(present)} within {max_loss:g} mIoU points of {fp32}" if kept
           else f"none of {', '.join(present)} is within {max_loss:g} points of {fp32}: the most accurate")
    out = {"variant": pick, "why": why, "latency_ms": rows[pick]["latency_ms"], "miou_loss_points": loss[pick]}
    if openvino in rows and rows[pick].get("latency_times_ms") and rows[openvino].get("latency_times_ms"):
        ratio = verdicts.speedup(rows[openvino]["latency_times_ms"], rows[pick]["latency_times_ms"], paired=True)
        out |= {"time_vs_openvino": ratio.mean, "time_vs_openvino_interval": [ratio.low, ratio.high],
                "time_vs_openvino_how": ratio.how}
    return out
