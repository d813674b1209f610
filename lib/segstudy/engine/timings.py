"""outputs/<profile>/timings.json: the run's plan (each training, and each step that trains nothing,
with its estimated seconds), the actual seconds of every training and step that finished, and each
notebook's wall time; the ETA line training prints once per epoch; and `Step`, how a notebook
describes the work it does besides training (scoring, calibrating, timing) for the plan to count.

Layout: {"planned_at", "source", "plan": [{"key", "notebook", "kind", ..., "planned_s", "reused"}],
"trainings": {run key: {"planned_s", "actual_s", "finished_at"}}, "steps": {step key: the same},
"notebooks": {stem: seconds}, "notebooks_total_s": their sum, "cells": {stem: [{"cell", "seconds",
"code"}], the notebook's code cells by papermill's measured duration, slowest first}}.
A run key is the training's folder relative to outputs/<profile>/ (runs/unet,
runs/custom-ce-seed0), or <notebook>/<name> for a fine-tune or a step, which have no folder of
their own (05_quantization/evaluate int8 ONNX Runtime).
Every write re-reads the file under a lock and replaces it atomically: the notebook runner and
the training inside a notebook's kernel both write it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from segstudy.config import Config
from segstudy.files import exclusive_lock, write_json

SECTIONS = ("planned_at", "source", "plan", "trainings", "steps", "notebooks", "notebooks_total_s", "cells")
STEP_KINDS = ("evaluate", "calibrate", "latency")  # plan rows whose actual seconds go to "steps"


def step_key(notebook: str, name: str) -> str:
    """The key of work without a run folder of its own (a fine-tune, a step) in the plan and timings.json."""
    return f"{notebook}/{name}"


def eval_size(cfg: Config) -> tuple[int, int]:
    """(height, width) of a validation image as the plan prices it: the shorter side data.base_size,
    at Cityscapes' 2:1 aspect."""
    return cfg.data.base_size, 2 * cfg.data.base_size


@dataclasses.dataclass(frozen=True)
class Passes:
    """`count` batch-1 forward passes of `model` (a model name) through `engine` (how the plan prices
    them: studies.plan_costs.CPU_COST's keys on the CPU; "amp", "fp32" or "bf16" on the device)."""

    model: str
    engine: str
    count: int


@dataclasses.dataclass(frozen=True)
class Step:
    """Work of a notebook that trains nothing (scoring models, calibrating int8 ranges, timing
    latencies), as the study that does it describes it: the plan prices it, timings.json records
    its actual seconds under `key` (`timed`). `on_cpu`: on the CPU whatever the profile's device
    (int8 kernels, ONNX Runtime, every latency); else on cfg.device. `size`: (height, width)."""

    notebook: str
    name: str
    kind: str  # STEP_KINDS
    on_cpu: bool
    size: tuple[int, int]
    work: tuple[Passes, ...]
    note: str = ""
    reused: bool = False  # never: the plan's rows share the field

    @property
    def key(self) -> str:
        return step_key(self.notebook, self.name)

    @property
    def passes(self) -> int:
        return sum(p.count for p in self.work)


def path(cfg: Config) -> Path:
    return cfg.output_dir / "timings.json"


def run_key(cfg: Config, run_dir: str | Path) -> str:
    """runs/unet for outputs/<profile>/runs/unet; a folder elsewhere keeps its full path."""
    run_dir = Path(run_dir).resolve()
    try:
        return run_dir.relative_to(cfg.output_dir.resolve()).as_posix()
    except ValueError:
        return str(run_dir)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read(cfg: Config) -> dict:
    """The file's content; an absent or unreadable file is an empty record. Files written before
    the plan existed hold only {notebook: seconds}: those become the "notebooks" section."""
    try:
        data = json.loads(path(cfg).read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    old = {k: v for k, v in data.items() if k not in SECTIONS and isinstance(v, (int, float))}
    out = {k: v for k, v in data.items() if k in SECTIONS}
    out.setdefault("plan", [])
    out.setdefault("trainings", {})
    out.setdefault("steps", {})
    out["notebooks"] = old | out.get("notebooks", {})
    return out


@contextlib.contextmanager
def _locked(cfg: Config) -> Iterator[None]:
    with exclusive_lock(path(cfg).with_suffix(".lock")):
        yield


def update(cfg: Config, change: Callable[[dict], None]) -> dict:
    """Read, `change` in place, write back atomically (tmp + os.replace), under a lock."""
    with _locked(cfg):
        data = read(cfg)
        change(data)
        write_json(path(cfg), data)
    return data


def _section(kind: str | None) -> str:
    return "steps" if kind in STEP_KINDS else "trainings"


def write_plan(cfg: Config, plan: list[dict], source: str) -> dict:
    """A new plan (rows with "key", "planned_s" and "kind"); the actual times already recorded stay."""
    def change(data: dict) -> None:
        data |= {"planned_at": now(), "source": source, "plan": plan}
        for row in plan:
            data[_section(row.get("kind"))].setdefault(row["key"], {})["planned_s"] = row["planned_s"]
    return update(cfg, change)


def _record(cfg: Config, section: str, key: str, seconds: float, add: bool) -> dict:
    def change(data: dict) -> None:
        planned = next((r["planned_s"] for r in data["plan"] if r["key"] == key), None)
        before = (_finished_since_plan(data, key) or 0.0) if add else 0.0
        entry = data[section].setdefault(key, {})
        entry |= {"actual_s": round(before + seconds, 1), "finished_at": now()}
        entry.setdefault("planned_s", planned)
    return update(cfg, change)


def record_finished(cfg: Config, key: str, seconds: float, add: bool = False) -> dict:
    """A training's actual wall time (its validation passes included), next to its plan. `add`:
    one more part of it (a fine-tune in steps), added to what this plan's run recorded so far."""
    return _record(cfg, "trainings", key, seconds, add)


def record_step(cfg: Config, key: str, seconds: float) -> dict:
    """One part of a step's actual wall time (Step.key), added to what this plan's run recorded so far
    for it: a step such as notebook 05's latencies is timed in several parts."""
    return _record(cfg, "steps", key, seconds, add=True)


@contextlib.contextmanager
def timed(cfg: Config, key: str) -> Iterator[None]:
    """Record the block's wall time as a part of step `key` (record_step), when it finishes."""
    start = time.perf_counter()
    yield
    record_step(cfg, key, time.perf_counter() - start)


def record_notebook(cfg: Config, stem: str, seconds: float, cells: list[dict] | None = None) -> dict:
    """A notebook's wall time and, when given, its code cells' seconds (cell_seconds)."""
    def change(data: dict) -> None:
        data["notebooks"][stem] = seconds
        data["notebooks_total_s"] = round(sum(data["notebooks"].values()), 1)
        if cells is not None:
            data.setdefault("cells", {})[stem] = cells
    return update(cfg, change)


def cell_seconds(executed_cells: list[dict]) -> list[dict]:
    """The code cells of an executed notebook (nbformat dicts) by the seconds papermill measured for each
    (its cell metadata "papermill.duration"), slowest first, each with its first line that is not an
    import or a comment (the call the time went to)."""
    out = []
    for i, cell in enumerate(executed_cells):
        duration = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell.get("cell_type") == "code" and duration is not None:
            lines = [line for line in "".join(cell.get("source", "")).splitlines() if line.strip()]
            work = [line for line in lines if not line.startswith(("import ", "from ", "#"))] or lines
            out.append({"cell": i, "seconds": round(float(duration), 1), "code": work[0][:100] if work else ""})
    return sorted(out, key=lambda c: -c["seconds"])


def notebook_seconds(cfg: Config) -> dict[str, float]:
    return dict(read(cfg)["notebooks"])


def duration(seconds: float) -> str:
    """12 s, 14 min, 5.3 h: the unit a person reads an ETA in."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _finished_since_plan(data: dict, key: str) -> float | None:
    """The actual seconds of `key` (a training or a step) when it finished after the current plan was written."""
    entry = data["trainings"].get(key) or data["steps"].get(key, {})
    if entry.get("actual_s") is None or entry.get("finished_at", "") < data.get("planned_at", ""):
        return None
    return entry["actual_s"]


def progress_line(cfg: Config, run_key: str, done_steps: int, total_steps: int, elapsed_s: float,
                  first_step: int = 0) -> str:
    """"ETA: this training 12 min, the run 5.3 h (planned 6.0 h)". `elapsed_s` covers steps
    first_step..done_steps (a resumed training starts past 0). The run: what is left of this
    training plus the planned time of the rows after it in the plan (trainings and the steps that
    train nothing: scoring, calibration, latencies), scaled by measured/planned so far (finished
    rows of this plan, and this training's pace); without a plan that holds `run_key` (e.g.
    `segstudy train` alone) the line covers this training only."""
    rate = elapsed_s / max(1, done_steps - first_step)
    left = rate * max(0, total_steps - done_steps)
    line = f"ETA: this training {duration(left)}"
    data = read(cfg)
    keys = [row["key"] for row in data["plan"]]
    if run_key not in keys:
        return line
    i = keys.index(run_key)
    rows = data["plan"]
    planned_total = sum(r["planned_s"] for r in rows if not r.get("reused"))
    actual = [(r["planned_s"], s) for r in rows[:i] if (s := _finished_since_plan(data, r["key"])) is not None]
    measured = sum(s for _, s in actual) + rate * total_steps  # this training's pace over all its steps
    planned = sum(p for p, _ in actual) + rows[i]["planned_s"]
    ratio = measured / planned if planned > 0 else 1.0
    after = sum(r["planned_s"] for r in rows[i + 1:] if not r.get("reused"))
    return f"{line}, the run {duration(left + ratio * after)} (planned {duration(planned_total)})"
