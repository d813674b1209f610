"""The tables and statistics read off the saved results (studies.results_files reads and writes
the files): each model's per-class IoU, the models side by side, notebook 05's variants, and the
speed-up of one measured model over another, which the verdicts, the targets and the tables all
read here, so one model has one speed-up.

Units as in the files: mIoU and IoU fractions in, points (x 100) in the tables; latency in ms.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from segstudy.config import Config
from segstudy.studies import results_files, verdicts

if TYPE_CHECKING:  # pandas' Styler module is slow to import; shown() reaches it through df.style
    from pandas.io.formats.style import Styler


def shown(table: pd.DataFrame) -> Styler:
    """How the study shows a table, in the notebooks and the report alike: numbers with two decimals,
    "–" where a row has no such measurement (a model not timed, FLOPs not counted), text columns
    left-aligned, a named index as a plain first column (pandas would give it a second header row)."""
    named = any(n is not None for n in table.index.names)
    plain = isinstance(table.index, pd.RangeIndex)  # row numbers say nothing: hide them
    df = table.reset_index() if named else table.copy()
    text = [c for c in df.columns if not pd.to_numeric(df[c].dropna(), errors="coerce").notna().all()]
    for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
            df[c] = df[c].round(2) + 0.0  # -0.004 shows as 0.00, not -0.00
    style = df.style.format(precision=2, na_rep="–", thousands=",").set_properties(subset=text, **{
        "text-align": "left"}).set_table_styles([{"selector": "th", "props": "text-align: left"}])
    return style.hide(axis="index") if named or plain else style


def per_class_table(results: dict[str, dict]) -> pd.DataFrame:
    """IoU % per class (columns) and model (rows), from the best epoch's validation."""
    rows = {}
    for name, r in results.items():
        best = max((h for h in r["history"] if "val_iou" in h), key=lambda h: h["val_miou"])
        rows[name] = {k: 100 * v if v is not None else np.nan for k, v in best["val_iou"].items()}
    return pd.DataFrame(rows).T.round(1)


def model_tables(cfg: Config) -> pd.DataFrame:
    """The comparison rows notebooks 01 and 02 saved, one row per model; a missing file is a row
    whose `source` says so, rather than silently skipped."""
    rows = []
    for key in ("baselines", "custom"):
        d, file, _ = results_files.read(cfg, key)
        if d is None:
            rows.append({"model": f"(missing: {file.parent.name})", "source": f"{file} not found: run that notebook"})
            continue
        for name, m in d["models"].items():
            rows.append({"model": name, "val mIoU %": 100 * m["best_miou"],
                         "backbone init": m.get("backbone_init", "unknown"), "latency ms": m["latency_ms"],
                         "params M": m["parameters"] / 1e6, "GFLOPs": m["gflops"], "source": file.parent.name})
    return pd.DataFrame(rows).set_index("model").round(2)


def speedup(row: dict, reference: dict, same_rounds: bool = False) -> verdicts.Interval | None:
    """How many times faster `row` is than `reference`, from their repeated timings: round by round
    when `row` was timed in turn with it ("reference_times_ms", engine.measure.latencies), else
    from each side's timings (one median each in older files). None without timings. The verdicts,
    the targets and the tables all read a speed-up here, so one model has one speed-up.
    `same_rounds`: both rows were timed in the same rounds (notebook 05's variants, one against
    another), so their own timings pair; a row's "reference_times_ms" are another model's."""
    times, base_times = (r.get("latency_times_ms") or ([r["latency_ms"]] if r.get("latency_ms") else None)
                         for r in (row, reference))
    side_by_side = base_times if same_rounds else row.get("reference_times_ms")
    if not times or not (side_by_side or base_times):
        return None
    if side_by_side and len(side_by_side) == len(times):
        return verdicts.speedup(times, side_by_side, paired=True)
    return verdicts.speedup(times, side_by_side or base_times)


def speedup_ratio(row: dict, reference: dict) -> float:
    """`speedup`'s point value, NaN without timings: the tables' number."""
    est = speedup(row, reference)
    return math.nan if est is None else est.mean


def quantization_table(rows: dict[str, dict], reference: str = "fp32 eager") -> pd.DataFrame:
    """Notebook 05's variants: mIoU, the val images it was scored on (quant.eval_images: a subset on a
    profile that scores fewer), its change vs the reference, latency, speed-up (`speedup`), size; one
    row per variant (the notebook, and the report from its saved rows)."""
    ref = rows[reference]
    out = pd.DataFrame({name: {
        "engine": r.get("engine"), "precision": r.get("precision"), "val mIoU %": 100 * r["miou"],
        "val images": r.get("val_images"),  # absent from files written before notebook 05 kept it
        "Δ mIoU points": 100 * (r["miou"] - ref["miou"]), "latency ms": r["latency_ms"],
        f"speed-up vs {reference}": speedup_ratio(r, ref),
        "size MB": r["size_bytes"] / 2**20 if r.get("size_bytes") else None} for name, r in rows.items()}).T
    out = out.astype({c: float for c in out.columns if c not in ("engine", "precision", "val images")}).round(2)
    return out.astype({"val images": "Int64"})
