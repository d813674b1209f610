"""Notebook 05's decisions, read off its rows: the int8 targets, whether to run QAT, and which int8
form is deployed (of the servable ones within report.keep_loss of fp32, the first in order unless
another is distinguishably faster in the rounds timed in turn), with its time against OpenVINO's.
Rows are the dicts studies/quantization.py builds ("latency_ms", "latency_times_ms" of the rounds
timed in turn, "miou")."""

from __future__ import annotations

from collections.abc import Sequence

from segstudy.errors import UserError
from segstudy.studies import result_tables, verdicts
from segstudy.studies.verdict_inputs import SeedNoise


def speedup_target(cpu: dict) -> float:
    """The issue's bar: 5x over fp32 eager where the CPU has int8 dot-product instructions
    (AVX-512 VNNI / AMX), 3x on AVX2-only machines."""
    return 5.0 if cpu.get("avx512_vnni") or cpu.get("amx_int8") else 3.0


def _miou_change(row: dict, fp32: dict) -> verdicts.Interval | None:
    """row minus fp32 in mIoU points, paired over the validation images where both rows hold their
    per-image confusions (notebook 05's rows in memory); None for rows without mIoU (the benchmark's)."""
    if "miou" not in row or "miou" not in fp32:
        return None
    if row.get("per_image") is not None and fp32.get("per_image") is not None:
        return verdicts.paired_difference(row["per_image"], fp32["per_image"])
    return verdicts.unbounded(100 * (row["miou"] - fp32["miou"]), 1, "no per-image confusions")


def trainings(variant: str) -> int:
    """The trainings whose seed noise an int8 form's mIoU change against fp32 carries: QAT fine-tunes
    the fp32 weights (one), post-training quantization trains nothing (none)."""
    return 1 if "QAT" in variant else 0


def check_targets(cpu: dict, rows: dict[str, dict], int8: Sequence[str], *, fp32: str = "fp32 eager",
                  max_loss: float = 1.0, within: float = 1.2, noise: SeedNoise | None = None) -> dict[str, dict]:
    """The int8 targets for each dense int8 variant in `int8`, judged on intervals by the verdicts'
    rule (verdicts.threshold): speed-up over `fp32` above speedup_target (result_tables.speedup);
    speed at least 1/`within` of the fastest of them (the rounds timed in turn); mIoU minus
    `fp32`'s above -max_loss points (paired over the images; rows without "miou", as in the
    benchmark, are judged on speed only; QAT's change is widened by `noise`, its fine-tune's seed noise,
    and open without it). "met": yes | no | not distinguishable at this budget."""
    need = speedup_target(cpu)
    present = [k for k in int8 if k in rows]
    if fp32 not in rows or not present:
        return {}
    fastest = rows[min(present, key=lambda k: rows[k]["latency_ms"])]
    out = {}
    for k in present:
        r = rows[k]
        speed, vs_fastest = result_tables.speedup(r, rows[fp32]), result_tables.speedup(r, fastest, same_rounds=True)
        change = _miou_change(r, rows[fp32])
        if change is not None and trainings(k):
            change = (noise.widen(change, trainings(k)) if noise
                      else verdicts.unbounded(change.mean, change.n, "without the seed noise of notebook 03"))
        answers = [verdicts.threshold(k, speed, need).answer, verdicts.threshold(k, vs_fastest, 1 / within).answer]
        if change is not None:
            answers.append(verdicts.threshold(k, change, -max_loss).answer)
        out[k] = {"speedup": speed.mean, "speedup_interval": str(speed), "speedup_target": need,
                  "ratio_to_fastest_int8": 1 / vs_fastest.mean,
                  "miou_change_points": None if change is None else str(change), "met": verdicts.combined(*answers)}
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


def first_not_slower(rows: dict[str, dict], kept: Sequence[str], fastest: str | None = None) -> str:
    """The first of `kept` (in the given order) that `fastest` (by median latency, the fastest of
    `kept` unless given) is not distinguishably faster than, on the rounds timed in turn
    (verdicts.threshold above 1x). Two engines within their noise would otherwise swap places from
    run to run, and with them the deployed model, its mIoU and the report's answers."""
    fastest = fastest or min(kept, key=lambda k: rows[k]["latency_ms"])
    for k in kept:
        ahead = result_tables.speedup(rows[fastest], rows[k], same_rounds=True)
        if ahead is None or verdicts.threshold(k, ahead, 1.0).answer != "yes":
            return k
    return fastest  # not reached: the fastest is not distinguishably faster than itself


def deployed_int8(rows: dict[str, dict], servable: Sequence[str], *, openvino: str, fp32: str = "fp32 eager",
                  max_loss: float = 1.0) -> dict | None:
    """Which of the `servable` int8 rows is deployed: among those losing at most `max_loss` mIoU
    points against `fp32`, the first in `servable`'s order unless another is distinguishably faster
    in the rounds timed in turn (then the fastest), else the most accurate. With the `openvino` row
    present, the chosen one's time as a multiple of OpenVINO's (the median of the per-round ratios,
    with its bootstrap interval). None without servable rows."""
    present = [k for k in servable if k in rows]
    if not present:
        return None
    # rows without "miou" (the benchmark's) are judged on speed only, as check_targets judges them
    loss = {k: 100 * (rows[fp32]["miou"] - rows[k]["miou"]) if "miou" in rows[k] else 0.0 for k in present}
    kept = [k for k in present if loss[k] <= max_loss]
    if not kept:
        pick = min(present, key=lambda k: loss[k])
        why = f"none of {', '.join(present)} is within {max_loss:g} points of {fp32}: the most accurate"
    else:
        fastest = min(kept, key=lambda k: rows[k]["latency_ms"])
        pick = first_not_slower(rows, kept, fastest)
        why = (f"the fastest of {', '.join(kept)}, within {max_loss:g} mIoU points of {fp32}" if pick == fastest
               else f"within {max_loss:g} mIoU points of {fp32}; {fastest} timed faster but not "
                    f"distinguishably in the rounds timed in turn, so the first of {', '.join(kept)}")
    out = {"variant": pick, "why": why, "latency_ms": rows[pick]["latency_ms"], "miou_loss_points": loss[pick]}
    ratio = result_tables.speedup(rows[openvino], rows[pick], same_rounds=True) if openvino in rows else None
    if ratio is not None:
        out |= {"time_vs_openvino": ratio.mean, "time_vs_openvino_interval": [ratio.low, ratio.high],
                "time_vs_openvino_how": ratio.how}
    return out
