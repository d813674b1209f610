"""The results files of notebooks 00-05 under outputs/<profile>/: the one owner of their layout.

Each notebook writes its file through a `write_*` function here, and notebook 06 (report_figures)
reads them back only through `read` and the table helpers here, so a field changes in one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from segstudy.config import PROJECT_ROOT, Config
from segstudy.engine import measure, provenance
from segstudy.errors import UserError
from segstudy.files import atomic_path
from segstudy.files import write_json as _write_json_file

# every results file (relative to outputs/<profile>/), by the key the report uses
FILES = {
    "data": "00_data_exploration/summary.json",
    "baselines": "01_baselines/results.json",
    "custom": "02_custom_model/results.json",
    "losses": "03_loss_comparison/results.json",
    "pruning": "04_pruning_sweeps/results.json",
    "quantization": "05_quantization/results.json",
    "verdicts": "06_report_figures/verdicts.json",  # written by the report itself, from the files above
}
# each validation image's confusion matrix of the models of a results file, by the key its row names
# under "confusions" (numpy, not JSON: [N, C, C + 1] integers per model)
CONFUSIONS = {"pruning": "04_pruning_sweeps/confusions.npz", "quantization": "05_quantization/confusions.npz"}


def path(cfg: Config, key: str) -> Path:
    return cfg.output_dir / FILES[key]


def shown(file: str | Path) -> str:
    """A path as the report shows it: relative to the repository when inside it (shorter, and the
    same on every machine), else absolute."""
    try:
        return str(Path(file).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(file)


def writer(cfg: Config, key: str) -> str:
    """The notebook that writes FILES[key], and the command that runs it."""
    notebook = FILES[key].split("/")[0]
    return f"notebook {notebook} (./run_all.sh {cfg.profile} --only {notebook[:2]})"


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
    if isinstance(v, np.generic):
        return _plain(v.item())
    return str(v) if isinstance(v, Path) else v


def confusions_path(cfg: Config, key: str) -> Path:
    return cfg.output_dir / CONFUSIONS[key]


def read_confusions(cfg: Config, key: str) -> dict[str, np.ndarray] | None:
    """CONFUSIONS[key] as {row key: [N, C, C + 1]}, or None when the file is absent."""
    file = confusions_path(cfg, key)
    if not file.is_file():
        return None
    with np.load(file) as npz:
        return {k: npz[k] for k in npz.files}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "row"


def _take_confusions(rows: dict[str, dict], store: dict[str, np.ndarray]) -> dict[str, dict]:
    """Copies of the rows without their "per_image" arrays, each moved to `store` under a unique
    key that the row names under "confusions" (rows without one are left as they are)."""
    out = {}
    for name, row in rows.items():
        row = dict(row)
        conf = row.pop("per_image", None)
        if conf is not None:
            key = base = _slug(name)
            while key in store:
                key = f"{base}-{len(store)}"
            store[key] = np.asarray(conf)
            row["confusions"] = key
        out[name] = row
    return out


def write_confusions(file: str | Path, store: dict[str, np.ndarray]) -> Path:
    """The per-image confusions of a notebook's models, compressed (mostly zeros), atomically."""
    with atomic_path(file) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, **store)  # a file object: numpy would append .npz to the temp name
    return Path(file)


def write_json(file: str | Path, payload: dict) -> Path:
    """Write a results file atomically (a crash never leaves half a JSON for notebook 06)."""
    return _write_json_file(file, _plain(payload))


def read(cfg: Config, key: str) -> tuple[dict | None, Path, str | None]:
    """(data, path, note): data is None and note says why when the file is absent."""
    file = path(cfg, key)
    if not file.is_file():
        return None, file, f"{shown(file)} does not exist; it is written by {writer(cfg, key)}."
    try:
        return json.loads(file.read_text()), file, None
    except json.JSONDecodeError as exc:
        raise UserError(f"{file} is not valid JSON ({exc}); re-run {writer(cfg, key)}") from None


@contextmanager
def reading(cfg: Config, key: str) -> Iterator[None]:
    """A results file without the fields read here comes from another version of its notebook."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path(cfg, key)} lacks a field notebook 06 reads ({exc!r}); it may "
                        f"come from an older segstudy: re-run {writer(cfg, key)}") from None


# --- writers, one per notebook ---------------------------------------------------------------

def _write(cfg: Config, key: str, payload: dict) -> Path:
    """FILES[key] with the provenance stamp (commit, environment, machine, profile, overrides)."""
    return write_json(path(cfg, key), payload | {"provenance": provenance.stamp(cfg)})


def write_data_summary(cfg: Config, summary: dict) -> Path:
    return _write(cfg, "data", {"profile": cfg.profile, "data_root": cfg.data.root, "splits": summary})


def write_models(cfg: Config, key: str, results: dict[str, dict], profiles: dict[str, dict]) -> Path:
    """Notebooks 01 (key baselines) and 02 (key custom): each model's training result and profile."""
    payload = {"profile": cfg.profile, "bench": {"height": cfg.bench.height, "width": cfg.bench.width,
                                                 **measure.cpu_info()},
               "models": {name: {**results[name], **profiles[name]} for name in results}}
    return _write(cfg, key, payload)


def write_losses(cfg: Config, runs: list[dict], summary: pd.DataFrame, class_means: pd.DataFrame,
                 small_class_delta: pd.DataFrame) -> Path:
    keep = ("loss", "seed", "best_miou", "final", "history", "train_seconds", "run_dir", "mlflow_run_id")
    payload = {"profile": cfg.profile, "model": cfg.loss_study.model,
               "epochs": cfg.loss_study.epochs or cfg.train.epochs, "runs": [{k: r.get(k) for k in keep} for r in runs],
               "summary": summary.reset_index(names="loss").to_dict(orient="records"),
               "class_means": class_means.to_dict(orient="index"),
               "small_class_delta_vs_ce": {k: v for k, v in small_class_delta.to_dict(orient="index").items()
                                           if "note" not in v}}
    return _write(cfg, "losses", payload)


def pruning_row_name(row: dict) -> str:
    """A pruning row's name: "structured group_norm 0.35 + KD", "dense control + fine-tune"."""
    level = "" if row["method"].startswith("dense") else f" {row['level']:g}"
    return f"{row['method']}{level}" + ("" if row.get("recovery", "none") == "none" else f" + {row['recovery']}")


def write_pruning(cfg: Config, rows: list[dict], dense_row: dict, layers: dict) -> Path:
    """Notebook 04's rows; their per-image confusions go to CONFUSIONS["pruning"], keyed."""
    store: dict[str, np.ndarray] = {}
    dense = _take_confusions({"dense": dense_row}, store)["dense"]
    named = _take_confusions({f"{i:02d} {pruning_row_name(r)}": r for i, r in enumerate(rows)}, store)
    write_confusions(confusions_path(cfg, "pruning"), store)
    payload = {"profile": cfg.profile, "cpu": measure.cpu_info(), "bench": cfg.bench, "prune": cfg.prune,
               "dense": dense, "rows": list(named.values()), "layer_sparsity": layers}
    return _write(cfg, "pruning", payload)


def write_quantization(cfg: Config, study: dict) -> Path:
    """Notebook 05's study (studies.quantization.QuantStudy as a dict) with the profile's settings;
    the per-image confusions of its variants go to CONFUSIONS["quantization"], keyed."""
    store: dict[str, np.ndarray] = {}
    study = study | {k: _take_confusions(study[k], store) for k in ("variants", "other_models") if study.get(k)}
    write_confusions(confusions_path(cfg, "quantization"), store)
    return _write(cfg, "quantization", {"profile": cfg.profile, "model": "custom",
                                                  "reference": "fp32 eager", "bench": cfg.bench,
                                                  "quant": cfg.quant} | study)


def write_verdicts(cfg: Config, verdicts: list, inputs: list[Path]) -> Path:
    """Notebook 06's verdict table (studies.verdicts.Verdict rows) and the files it was read from."""
    return _write(cfg, "verdicts", {"profile": cfg.profile, "verdicts": verdicts,
                                    "inputs": [shown(p) for p in inputs]})


# --- readers and the tables built from what was saved -----------------------------------------

def trained_models(cfg: Config) -> tuple[dict[str, dict], list[Path], list[str], dict]:
    """The trained models of notebooks 01 and 02 (name -> saved result with its "source" file),
    the files read, notes on missing ones, and the bench settings they were measured at."""
    models, paths, notes, bench = {}, [], [], {}
    for key in ("baselines", "custom"):
        d, file, note = read(cfg, key)
        if d is None:
            notes.append(note)
            continue
        with reading(cfg, key):
            models.update({name: m | {"source": file} for name, m in d["models"].items()})
            bench = bench or d["bench"]
        paths.append(file)
    return models, paths, notes, bench


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
        d, file, _ = read(cfg, key)
        if d is None:
            rows.append({"model": f"(missing: {file.parent.name})", "source": f"{file} not found: run that notebook"})
            continue
        for name, m in d["models"].items():
            rows.append({"model": name, "val mIoU %": 100 * m["best_miou"],
                         "backbone init": m.get("backbone_init", "unknown"), "latency ms": m["latency_ms"],
                         "params M": m["parameters"] / 1e6, "GFLOPs": m["gflops"], "source": file.parent.name})
    return pd.DataFrame(rows).set_index("model").round(2)


def pruning_table(rows: list[dict]) -> pd.DataFrame:
    """Notebook 04's rows (dense, pruned) as a table."""
    cols = ["method", "level", "recovery", "sparsity", "miou", "params", "gflops", "latency_ms", "size_mb",
            "size_gz_mb"]
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows])
    df["sparsity"] = 100 * df["sparsity"]
    df["params"] = df["params"] / 1e6
    return df.rename(columns={"sparsity": "zeros %", "miou": "mIoU", "params": "params (M)", "gflops": "GFLOPs",
                              "latency_ms": "latency ms", "size_mb": "size MB", "size_gz_mb": "gzip MB"}).round(2)


def pruning_targets(rows: list[dict], dense: dict, sparsity: float = 0.55) -> pd.DataFrame:
    """The pruning targets, read off notebook 04's rows: the structured model's speed-up and mIoU
    loss after recovery, and the share of dense mIoU kept at 55% unstructured sparsity."""
    out = []
    for r in rows:
        if r["method"].startswith("structured") and r["recovery"] != "none" and r.get("latency_ms"):
            speedup, loss = dense["latency_ms"] / r["latency_ms"], dense["miou"] - r["miou"]
            out.append({"target": f"structured {r['level']} + {r['recovery']}: >= 2.0x faster, <= 2 mIoU points lost",
                        "measured": f"{speedup:.2f}x, {loss:+.2f} points", "met": speedup >= 2.0 and loss <= 2.0})
        if r["method"].startswith("unstructured") and abs(r["level"] - sparsity) < 1e-9:
            kept = r["miou"] / dense["miou"]
            out.append({"target": f"{r['method']} {sparsity:.0%} ({r['recovery']}): keep >= 95% of dense mIoU",
                        "measured": f"{100 * kept:.1f}% ({r['miou']:.2f} of {dense['miou']:.2f})", "met": kept >= 0.95})
    return pd.DataFrame(out)


def quantization_rows(d: dict) -> dict[str, dict]:
    """Notebook 05's variants as {name: row}; tolerant of a list or a dict under a few names."""
    rows = next((d[k] for k in ("rows", "variants", "results") if k in d), None)
    if isinstance(rows, list):
        rows = {r.get("name") or f"{r.get('engine')} {r.get('precision')}": r for r in rows}
    if not isinstance(rows, dict):
        raise KeyError("rows")
    return rows
