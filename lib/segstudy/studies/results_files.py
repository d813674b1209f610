"""The results files of notebooks 00-07 under outputs/<profile>/: the one owner of their layout.

Each notebook writes its files (results.json, its CSV tables, the per-image confusions) through a
`write_*` function here, `segstudy sweep` its sweep.json, and notebook 08 (report_figures) reads
them back only through `read` and the readers here, so a field changes in one place; the tables
and statistics built from what was read are studies.result_tables'.

Units, the same in every file: mIoU and IoU ("miou", "best_miou", "val_miou", "iou") are fractions
in [0, 1], as the metrics compute them and MLflow logs them; tables and figures show points
(x 100). Latency in ms.
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

from segstudy.config import Config
from segstudy.config_paths import PROJECT_ROOT
from segstudy.engine import measure, provenance
from segstudy.errors import UserError
from segstudy.files import atomic_path, write_text
from segstudy.files import write_json as _write_json_file

FORMAT = 2  # 2: mIoU as a fraction in every file (notebook 04's were points)
# every results file (relative to outputs/<profile>/), by the key the report uses
FILES = {
    "data": "00_data_exploration/summary.json",
    "baselines": "01_baselines/results.json",
    "custom": "02_custom_model/results.json",
    "cross": "02_custom_model/cross_dataset.json",
    "losses": "03_loss_comparison/results.json",
    "pruning": "04_pruning_sweeps/results.json",
    "quantization": "05_quantization/results.json",
    "monitoring": "07_monitoring/results.json",
    "verdicts": "08_report_figures/verdicts.json",  # written by the report itself, from the files above
}
# notebook 05's dense int8 variants, by the names its rows carry
INT8_VARIANTS = ("int8 PTQ torch FX", "int8 ONNX Runtime", "int8 OpenVINO", "int8 QAT torch FX")
# the per-image confusion files of three results files (a run folder's own is
# engine.run_folder.CONFUSIONS): each validation image's confusion matrix of each model, by the key
# its row names under "confusions" (numpy, not JSON: [N, C, C + 1] integers per model)
CONFUSION_FILES = {"pruning": "04_pruning_sweeps/confusions.npz", "quantization": "05_quantization/confusions.npz",
              "cross": "02_custom_model/cross_confusions.npz"}


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
    return cfg.output_dir / CONFUSION_FILES[key]


def read_confusions(cfg: Config, key: str) -> dict[str, np.ndarray] | None:
    """CONFUSION_FILES[key] as {row key: [N, C, C + 1]}, or None when the file is absent."""
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
    """Write a results file atomically (a crash never leaves half a JSON for notebook 08)."""
    return _write_json_file(file, _plain(payload))


def read(cfg: Config, key: str) -> tuple[dict | None, Path, str | None]:
    """(data, path, note): data is None and note says why when the file is absent."""
    file = path(cfg, key)
    if not file.is_file():
        return None, file, f"{shown(file)} does not exist; it is written by {writer(cfg, key)}."
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{file} is not valid JSON ({exc}); re-run {writer(cfg, key)}") from None
    if data.get("format") != FORMAT:
        return None, file, (f"{shown(file)} was written by an older segstudy (another layout or unit); "
                            f"re-run {writer(cfg, key)}.")
    return data, file, None


@contextmanager
def reading(cfg: Config, key: str) -> Iterator[None]:
    """A results file without the fields read here comes from another version of its notebook."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path(cfg, key)} lacks a field notebook 08 reads ({exc!r}); it may "
                        f"come from an older segstudy: re-run {writer(cfg, key)}") from None


# --- writers, one per notebook ---------------------------------------------------------------

def _write(cfg: Config, key: str, payload: dict) -> Path:
    """FILES[key] with the provenance stamp (commit, environment, machine, profile, overrides)."""
    return write_json(path(cfg, key), payload | {"format": FORMAT, "provenance": provenance.stamp(cfg)})


def write_data_summary(cfg: Config, summary: dict, datasets: dict | None = None) -> Path:
    """Notebook 00: data.dataset's splits, and each dataset's val split (`datasets`, by name)."""
    return _write(cfg, "data", {"profile": cfg.profile, "data_root": cfg.data.root, "splits": summary,
                                "datasets": datasets or {}})


def write_csv(file: Path, table: pd.DataFrame, **to_csv) -> Path:
    """A notebook's table as CSV, atomically (numbers as the table holds them)."""
    return write_text(file, table.to_csv(**to_csv))


def write_models(cfg: Config, key: str, results: dict[str, dict], profiles: dict[str, dict],
                 comparison: pd.DataFrame, per_class: pd.DataFrame) -> Path:
    """Notebooks 01 (key baselines) and 02 (key custom): each model's training result and profile,
    and the notebook's tables (comparison.csv, per_class_iou.csv)."""
    folder = path(cfg, key).parent
    write_csv(folder / "comparison.csv", comparison)
    write_csv(folder / "per_class_iou.csv", per_class)
    payload = {"profile": cfg.profile, "bench": {"height": cfg.bench.height, "width": cfg.bench.width,
                                                 **measure.cpu_info()},
               "models": {name: {**results[name], **profiles[name]} for name in results}}
    return _write(cfg, key, payload)


def write_losses(cfg: Config, runs: list[dict], summary: pd.DataFrame, class_means: pd.DataFrame,
                 small_class_delta: pd.DataFrame, per_run_iou: pd.DataFrame) -> Path:
    """Notebook 03's runs and tables (and per_run_iou.csv)."""
    write_csv(path(cfg, "losses").parent / "per_run_iou.csv", per_run_iou.round(2))
    keep = ("loss", "seed", "best_miou", "final", "history", "train_seconds", "run_dir", "mlflow_run_id")
    payload = {"profile": cfg.profile, "model": cfg.loss_study.model,
               "epochs": cfg.loss_study.epochs or cfg.train.epochs, "runs": [{k: r.get(k) for k in keep} for r in runs],
               "summary": summary.reset_index(names="loss").to_dict(orient="records"),
               "class_means": class_means.to_dict(orient="index"),
               "small_class_delta_vs_ce": {k: v for k, v in small_class_delta.to_dict(orient="index").items()
                                           if "note" not in v}}
    return _write(cfg, "losses", payload)


def write_cross(cfg: Config, rows: list[dict], table: pd.DataFrame) -> Path:
    """Notebook 02's cross-dataset scores: one row per (model, evaluation dataset), each with its
    per-image confusions (cross_confusions.npz), and the table (cross_dataset.csv)."""
    folder = path(cfg, "cross").parent
    write_csv(folder / "cross_dataset.csv", table)
    store: dict[str, np.ndarray] = {}
    kept = _take_confusions({f"{r['model']} on {r['dataset']}": r for r in rows}, store)
    write_confusions(confusions_path(cfg, "cross"), store)
    return _write(cfg, "cross", {"profile": cfg.profile, "primary": cfg.data.dataset, "mix": cfg.cross.mix,
                                 "rows": list(kept.values())})


def pruning_row_name(row: dict) -> str:
    """A pruning row's name: "structured group_norm 0.35 + KD", "dense control + fine-tune"."""
    level = "" if row["method"].startswith("dense") else f" {row['level']:g}"
    return f"{row['method']}{level}" + ("" if row.get("recovery", "none") == "none" else f" + {row['recovery']}")


def unstructured_at_finetune_sparsity(d: dict) -> list[dict]:
    """Notebook 04's unstructured rows at the prune.finetune_sparsity it ran with (every unstructured
    row of an older file that does not say)."""
    level = (d.get("prune") or {}).get("finetune_sparsity")
    return [r for r in d["rows"] if r["method"].startswith("unstructured")
            and (level is None or abs(r["level"] - level) < 1e-9)]


def write_pruning(cfg: Config, rows: list[dict], dense_row: dict, layers: dict) -> Path:
    """Notebook 04's rows; their per-image confusions go to CONFUSION_FILES["pruning"], keyed."""
    store: dict[str, np.ndarray] = {}
    dense = _take_confusions({"dense": dense_row}, store)["dense"]
    named = _take_confusions({f"{i:02d} {pruning_row_name(r)}": r for i, r in enumerate(rows)}, store)
    write_confusions(confusions_path(cfg, "pruning"), store)
    write_csv(path(cfg, "pruning").parent / "pruning.csv", pruning_table([dense_row, *rows]), index=False)
    payload = {"profile": cfg.profile, "cpu": measure.cpu_info(), "bench": cfg.bench, "prune": cfg.prune,
               "dense": dense, "rows": list(named.values()), "layer_sparsity": layers}
    return _write(cfg, "pruning", payload)


def write_quantization(cfg: Config, study: dict, variants: pd.DataFrame, per_class_delta: pd.DataFrame) -> Path:
    """Notebook 05's study (studies.quantization.QuantStudy as a dict) with the profile's settings
    and its tables (variants.csv, per_class_iou_delta.csv); the per-image confusions of its
    variants go to CONFUSION_FILES["quantization"], keyed."""
    folder = path(cfg, "quantization").parent
    write_csv(folder / "variants.csv", variants)
    write_csv(folder / "per_class_iou_delta.csv", per_class_delta)
    store: dict[str, np.ndarray] = {}
    study = study | {k: _take_confusions(study[k], store) for k in ("variants", "other_models") if study.get(k)}
    write_confusions(confusions_path(cfg, "quantization"), store)
    return _write(cfg, "quantization", {"profile": cfg.profile, "model": "custom",
                                                  "reference": "fp32 eager", "bench": cfg.bench,
                                                  "quant": cfg.quant} | study)


def write_monitoring(cfg: Config, summary: dict, windows: list[dict], reference: dict) -> Path:
    """Notebook 07's drift study: the summary (false-alarm rate, detection delay), every window,
    the reference (with its calibration scores) and the profile's monitoring settings."""
    return _write(cfg, "monitoring", {"profile": cfg.profile, "summary": summary, "windows": windows,
                                      "reference": reference, "monitoring": cfg.monitoring})


def write_verdicts(cfg: Config, rows: list, inputs: list[Path]) -> Path:
    """Notebook 08's verdict table (studies.verdicts.Verdict rows) and the files it was read from."""
    return _write(cfg, "verdicts", {"profile": cfg.profile, "verdicts": rows,
                                    "inputs": [shown(p) for p in inputs]})


SWEEP_FILE = "sweep.json"


def sweeps_dir(output_root: str | Path) -> Path:
    """outputs/sweeps/: every `segstudy sweep`, one folder each."""
    return Path(output_root) / "sweeps"


def sweep_file(output_root: str | Path, name: str) -> Path:
    """outputs/sweeps/<name>/sweep.json: one `segstudy sweep`'s runs, gathered."""
    return sweeps_dir(output_root) / name / SWEEP_FILE


def write_sweep(output_root: str | Path, name: str, notebook: str, profile: str, fixed: dict, grid: dict,
                runs: list[dict]) -> Path:
    """The sweep's runs so far, each with its params, folder, seconds and the notebook's results
    (read back through `read_run_results`), or the error that stopped it."""
    return _write_json_file(sweep_file(output_root, name),
                            {"sweep": name, "notebook": notebook, "profile": profile, "fixed": fixed, "grid": grid,
                             "runs": runs}, default=str)


def read_run_results(output_root: str | Path, profile: str, notebook: str) -> dict | None:
    """results.json of `notebook` (a stem) under another output_root (a sweep's run), or None."""
    file = Path(output_root) / profile / notebook / "results.json"
    return json.loads(file.read_text()) if file.is_file() else None


def sweeps(cfg: Config) -> list[tuple[Path, dict, list[dict]]]:
    """Every sweep of this profile under output_root: (file, sweep.json, one row per run with its
    params, best validation mIoU (a fraction, over the run's models or loss runs), seconds, error)."""
    found = []
    for file in sorted(sweeps_dir(cfg.output_root).glob(f"*/{SWEEP_FILE}")):
        d = json.loads(file.read_text())
        if d.get("profile") != cfg.profile:
            continue
        rows = []
        for run in d.get("runs", []):
            res = run.get("results") or {}  # notebook 03 saves "runs", notebooks 01/02 "models"
            entries = res.get("runs") or list((res.get("models") or {}).values())
            scores = [r["best_miou"] for r in entries if isinstance(r, dict) and r.get("best_miou") is not None]
            rows.append({"params": run.get("params", {}), "best_miou": max(scores) if scores else None,
                         "seconds": run.get("seconds"), "error": run.get("error", "")})
        found.append((file, d, rows))
    return found


TUNE_FILE = "study.json"


def tune_dir(cfg: Config, study: str) -> Path:
    """outputs/<profile>/tune/<study>/: one tuning study's files (segstudy tune, notebook 06)."""
    return cfg.output_dir / "tune" / study


def write_tune(cfg: Config, study: str, summary: dict) -> Path:
    """The study's summary (trials by state, the best trial, the files beside it), stamped."""
    return write_json(tune_dir(cfg, study) / TUNE_FILE,
                      summary | {"format": FORMAT, "provenance": provenance.stamp(cfg)})


def tunes(cfg: Config) -> list[tuple[Path, dict]]:
    """Every tuning study of this profile with its summary (the report's tuning section)."""
    files = sorted((cfg.output_dir / "tune").glob(f"*/{TUNE_FILE}"))
    return [(file, d) for file in files if (d := json.loads(file.read_text())).get("format") == FORMAT]


# --- readers -------------------------------------------------------------------------------------

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


def pruning_table(rows: list[dict]) -> pd.DataFrame:
    """Notebook 04's rows (dense, pruned) as a table."""
    cols = ["method", "level", "recovery", "sparsity", "miou", "params", "gflops", "latency_ms", "size_mb",
            "size_gz_mb"]
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows])
    df["sparsity"] = 100 * df["sparsity"]
    df["miou"] = 100 * df["miou"].astype(float)
    df["params"] = df["params"] / 1e6
    return df.rename(columns={"sparsity": "zeros %", "miou": "mIoU %", "params": "params (M)", "gflops": "GFLOPs",
                              "latency_ms": "latency ms", "size_mb": "size MB", "size_gz_mb": "gzip MB"}).round(2)


def quantization_rows(d: dict) -> dict[str, dict]:
    """Notebook 05's variants as {name: row}; tolerant of a list or a dict under a few names."""
    rows = next((d[k] for k in ("rows", "variants", "results") if k in d), None)
    if isinstance(rows, list):
        rows = {r.get("name") or f"{r.get('engine')} {r.get('precision')}": r for r in rows}
    if not isinstance(rows, dict):
        raise KeyError("rows")
    return rows
