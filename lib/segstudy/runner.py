"""Run the numbered notebooks headlessly with papermill and export each to HTML.

`./run_all.sh [profile]` calls `segstudy run`. Every `notebooks/NN_*.ipynb` runs in order with
the profile injected into its `parameters` cell; the executed copy goes to
outputs/<profile>/NN_*.ipynb and its HTML next to it. The first failing notebook stops the run;
its executed copy (with the failing cell's traceback) is kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm
from nbconvert import HTMLExporter

from segstudy.config import PROJECT_ROOT, load_config, resolve_profile
from segstudy.datasets import prepare_data
from segstudy.errors import UserError

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOK_PARAMETERS = {"profile", "overrides"}  # what every notebook's parameters cell defines


def list_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    notebooks = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(o) for o in only)]
        if not notebooks:
            raise UserError(f"--only {' '.join(only)} matches no notebook in {notebooks_dir}")
    return notebooks


def check_parameters(notebook: Path) -> None:
    """papermill only warns about unknown parameters; a notebook that lacks ours is an error."""
    declared = set(pm.inspect_notebook(str(notebook)))
    missing = NOTEBOOK_PARAMETERS - declared
    if missing:
        raise UserError(f"{notebook} has no {', '.join(sorted(missing))} in a cell tagged "
                        f"'parameters'; every notebook starts with: profile = \"demo\"; overrides = {{}}")


def export_html(executed: Path) -> Path:
    """HTML next to the executed notebook, without stderr streams (progress bars)."""
    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            cell["outputs"] = [o for o in cell.get("outputs", [])
                               if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    body, _ = HTMLExporter().from_notebook_node(nb)
    html = executed.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def run_notebooks(profile: str = "demo", overrides: dict[str, Any] | None = None,
                  only: list[str] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR,
                  timeout: int = 3600, progress: bool = True, log_output: bool = False) -> dict[str, float]:
    """Execute the notebooks in order; returns {notebook: seconds}. Raises on the first failure."""
    overrides = overrides or {}
    cfg = load_config(profile, overrides)  # a bad profile or key fails here, before any work
    # a profile name stays a name in the executed notebooks; a YAML path becomes absolute
    profile_arg = str(profile) if not str(profile).endswith((".yaml", ".yml")) \
        else str(resolve_profile(profile).resolve())
    notebooks = list_notebooks(notebooks_dir, only)
    for nb in notebooks:
        check_parameters(nb)
    prepare_data(cfg)
    out_dir = cfg.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    timing_file = out_dir / "timings.json"
    if timing_file.is_file():
        timings.update(json.loads(timing_file.read_text()))
    for nb in notebooks:
        executed = out_dir / nb.name
        print(f"[segstudy] {nb.name} -> {executed}", flush=True)
        start = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(executed), kernel_name="python3", cwd=str(nb.parent),
                                parameters={"profile": profile_arg, "overrides": overrides},
                                progress_bar=progress, log_output=log_output, execution_timeout=timeout,
                                request_save_on_cell_execute=True)
        except pm.PapermillExecutionError as exc:
            raise UserError(f"notebook {nb.name} failed in cell {exc.exec_count}: {exc.ename}: "
                            f"{exc.evalue}. The executed copy with the full traceback is {executed}"
                            ) from None
        timings[nb.stem] = round(time.perf_counter() - start, 1)
        html = export_html(executed)
        timing_file.write_text(json.dumps(timings, indent=2))
        print(f"[segstudy] {nb.name} done in {timings[nb.stem]:.1f} s -> {html}", flush=True)
    return timings
