"""Run the numbered notebooks headlessly with papermill and export each to HTML.

`./run_all.sh [profile]` calls `segstudy run`. Every `notebooks/NN_*.ipynb` runs in order with
the profile injected into its `parameters` cell; the executed copy goes to
outputs/<profile>/NN_*.ipynb and its HTML next to it. The first failing notebook stops the run;
its executed copy (with the failing cell's traceback) is kept. After the run, notebook 08's
executed copy becomes outputs/<profile>/report.html (no code, figures embedded) and
outputs/<profile>/index.html links every executed notebook with its wall time.
"""

from __future__ import annotations

import html
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm
from jupyter_client.manager import AsyncKernelManager
from nbclient.exceptions import CellTimeoutError
from nbconvert import HTMLExporter
from tqdm import tqdm
from traitlets import Unicode
from traitlets.config import Config as TraitletsConfig

from segstudy.config import Config
from segstudy.config_paths import PROJECT_ROOT
from segstudy.config_profiles import load_config, resolve_profile
from segstudy.data.datasets import prepare_data, unset_datasets
from segstudy.data.shared_memory import check_shared_memory
from segstudy.engine import provenance
from segstudy.engine import timings as timing_records
from segstudy.errors import UserError
from segstudy.files import disk_full, no_space, write_json, write_text
from segstudy.studies import plan, results_files
from segstudy.tracking import mlflow_uri

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
REPORT_NOTEBOOK = "08_report_figures"  # its executed copy becomes report.html
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


def _read_without_streams(executed: Path, names: tuple[str, ...]) -> nbformat.NotebookNode:
    """The executed notebook without its stream outputs called `names` (tqdm bars go to stderr:
    nbconvert would show each as a pink box)."""
    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            cell["outputs"] = [o for o in cell.get("outputs", [])
                               if not (o.get("output_type") == "stream" and o.get("name") in names)]
    return nb


def export_html(executed: Path) -> Path:
    """HTML next to the executed notebook, without stderr streams (progress bars)."""
    body, _ = HTMLExporter().from_notebook_node(_read_without_streams(executed, ("stderr",)))
    page = executed.with_suffix(".html")
    write_text(page, body)
    return page


def _profile_arg(profile: str) -> str:
    """A profile name stays a name in the executed notebooks; a YAML path becomes absolute."""
    return str(resolve_profile(profile).resolve()) if str(profile).endswith((".yaml", ".yml")) else str(profile)


class KernelLogManager(AsyncKernelManager):
    """nbclient's kernel manager, with the kernel process's own stderr in a file (`log_path`)
    instead of the terminal. The notebook's outputs do not go there (ipykernel sends those to the
    notebook); what does is the kernel's own noise, such as the ZMQ traceback it prints when Ctrl-C
    stops the run while it replies."""

    log_path = Unicode("", help="file the kernel's stderr is appended to").tag(config=True)

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        if self.log_path:
            kw["stderr"] = open(self.log_path, "ab")  # noqa: SIM115 - the kernel process holds it
        await super()._async_launch_kernel(kernel_cmd, **kw)


class SegstudyLines:
    """A stdout_file for papermill: the kernel's "[segstudy] ..." lines (the plan, each epoch, the
    ETA, the ImageNet fallback, reuse) echoed on this terminal above the progress bar; the
    notebook keeps everything."""

    def __init__(self) -> None:
        self.pending = ""

    def write(self, text: str) -> None:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.startswith("[segstudy]"):
                tqdm.write(line, file=sys.stdout)

    def flush(self) -> None:
        sys.stdout.flush()


def execute(notebook: Path, executed: Path, profile: str, overrides: dict[str, Any], timeout: int | None = None,
            progress: bool = True, log_output: bool = False) -> float:
    """Run one notebook with papermill (explicit kernel, cwd = its folder), export its HTML;
    returns the seconds it took. A failing cell raises UserError naming the notebook. `timeout`: the
    seconds a cell may run (None: no limit; nbclient applies it to a whole cell, and a training cell
    of the full profile runs for hours)."""
    executed.parent.mkdir(parents=True, exist_ok=True)
    print(f"[segstudy] {notebook.name} -> {executed}", flush=True)
    start = time.perf_counter()
    try:
        # the kernel listens on Unix sockets in a private folder instead of unencrypted TCP on
        # localhost (which ipykernel warns about): nothing else on the machine can reach it
        with tempfile.TemporaryDirectory(prefix="segstudy-kernel-") as sockets:
            # shutdown_kernel immediate: the kernel is killed once its last cell has answered, instead
            # of waiting while Python tears down torch and the rest (about 2 s per notebook)
            ipc = TraitletsConfig({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "kernel")},
                                   "NotebookClient": {"kernel_manager_class": KernelLogManager,
                                                      "shutdown_kernel": "immediate"},
                                   "KernelLogManager": {"log_path": str(kernel_log(executed))}})
            pm.execute_notebook(str(notebook), str(executed), kernel_name="python3", cwd=str(notebook.parent),
                                parameters={"profile": _profile_arg(profile), "overrides": overrides},
                                progress_bar=progress, log_output=log_output, execution_timeout=timeout,
                                stdout_file=None if log_output else SegstudyLines(),
                                request_save_on_cell_execute=True, config=ipc)
    except (CellTimeoutError, pm.PapermillExecutionError) as exc:
        if isinstance(exc, CellTimeoutError) or exc.ename == "CellTimeoutError":
            raise UserError(f"a cell of notebook {notebook.name} ran longer than --timeout {timeout} s and was "
                            f"stopped; run again with a larger --timeout, or without one (no limit): finished "
                            f"trainings are reused. The executed copy is {keep_failed(executed)}") from None
        raise UserError(f"notebook {notebook.name} failed in cell {exc.exec_count}: {exc.ename}: "
                        f"{exc.evalue}. The executed copy with the full traceback is {keep_failed(executed)}") from None
    except OSError as exc:  # papermill writing the executed copy
        if disk_full(exc):
            raise no_space(executed, 0) from None
        raise
    seconds = round(time.perf_counter() - start, 1)
    log = kernel_log(executed)
    if log.is_file() and not log.stat().st_size:
        log.unlink()  # the kernel said nothing of its own: no empty file beside every notebook
    html = export_html(executed)
    print(f"[segstudy] {notebook.name} done in {seconds:.1f} s -> {html}", flush=True)
    return seconds


def kernel_log(executed: Path) -> Path:
    """<notebook>.kernel.log beside the executed notebook: its kernel's own stderr."""
    return executed.with_suffix(".kernel.log")


def keep_failed(executed: Path) -> Path:
    """A copy of a failed notebook's executed file under failed/, named for this run (the time and
    process), so the next or a concurrent run writing `executed` cannot overwrite its traceback."""
    kept = executed.parent / "failed" / f"{executed.stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.ipynb"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(executed, kept)
    return kept


def run_notebooks(profile: str = "demo", overrides: dict[str, Any] | None = None,
                  only: list[str] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR,
                  timeout: int | None = None, progress: bool = True, log_output: bool = False) -> dict[str, float]:
    """Execute the notebooks in order; returns {notebook: seconds}. Raises on the first failure."""
    cfg = load_config(profile, overrides)  # a bad profile or key fails here, before any work
    overrides, cfg = without_unset_datasets(profile, overrides or {}, cfg)
    notebooks = list_notebooks(notebooks_dir, only)
    for nb in notebooks:
        check_parameters(nb)
    check_shared_memory(cfg)  # a container's 64 MB /dev/shm stops the first training's workers otherwise
    prepare_data(cfg)
    out_dir = cfg.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    started = provenance.now()
    announce_plan(cfg, [nb.stem for nb in notebooks])
    for nb in notebooks:
        seconds = execute(nb, out_dir / nb.name, profile, overrides, timeout, progress, log_output)
        cells = timing_records.cell_seconds(nbformat.read(out_dir / nb.name, as_version=4).cells)
        timing_records.record_notebook(cfg, nb.stem, seconds, cells)
        print("[segstudy] slowest cells: " + "; ".join(f"{c['seconds']:.1f} s `{c['code']}`" for c in cells[:3]),
              flush=True)
    timings = timing_records.notebook_seconds(cfg)
    stamp = provenance.stamp(cfg, started=started, finished=provenance.now())
    write_json(out_dir / "provenance.json", stamp | {"notebooks": [nb.stem for nb in notebooks]})
    write_pages(out_dir, notebooks_dir, timings, ran=[nb.stem for nb in notebooks], stamp=stamp)
    return {nb.stem: timings[nb.stem] for nb in notebooks}


def without_unset_datasets(profile: str, overrides: dict[str, Any], cfg: Config) -> tuple[dict[str, Any], Config]:
    """The overrides and config of a run that leaves out the other datasets whose environment variable
    is not set (said in one line), so that every notebook sees the same datasets."""
    extra, line = unset_datasets(cfg)
    if not extra:
        return overrides, cfg
    print(line, flush=True)
    overrides = overrides | extra
    return overrides, load_config(profile, overrides)


def announce_plan(cfg: Config, notebooks: list[str]) -> None:
    """Print every training the notebooks will run with its estimated time, and record the plan in
    outputs/<profile>/timings.json (training prints its ETA against it)."""
    trainings = plan.trainings(cfg, notebooks)
    if not trainings:
        return
    estimate = plan.estimate(cfg, trainings)
    print(plan.format_plan(cfg, trainings, estimate), flush=True)
    timing_records.write_plan(cfg, plan.rows(trainings, estimate), estimate.source)


def write_pages(out_dir: Path, notebooks_dir: Path, timings: dict[str, float], ran: list[str],
                stamp: dict | None = None) -> None:
    """report.html (when notebook 08 ran) and index.html linking every executed notebook, each
    opening with the provenance stamp of the run that wrote it."""
    block = provenance.as_html(stamp) if stamp else ""
    if REPORT_NOTEBOOK in ran:
        path = write_report(out_dir / f"{REPORT_NOTEBOOK}.ipynb", out_dir / "report.html", block)
        print(f"[segstudy] report: {path}", flush=True)
    index = write_index(out_dir, [nb.stem for nb in list_notebooks(notebooks_dir)], timings, block)
    print(f"[segstudy] index: {index}", flush=True)


def write_report(executed: Path, out: Path, header: str = "") -> Path:
    """report.html from the executed notebook 08: code hidden, stream outputs (progress bars,
    prints) dropped, figures embedded as data URIs, so the file stands alone."""
    nb = _read_without_streams(executed, ("stdout", "stderr"))
    title = f"segstudy report ({executed.parent.name})"
    nb.metadata["title"] = title
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    if header:  # right after <main>, where nbconvert's lab template starts the page's content
        body = re.sub(r"(<main[^>]*>)", lambda m: m[1] + header, body, count=1) if "<main" in body else header + body
    write_text(out, body)
    return out


def write_index(out_dir: Path, notebooks: list[str], timings: dict[str, float], header: str = "") -> Path:
    """index.html: the report and every notebook's HTML with its wall time (timings.json)."""
    items = []
    for stem in notebooks:
        page = out_dir / f"{stem}.html"
        seconds = timings.get(stem)
        when = f"{seconds:.1f} s" if seconds is not None else "no timing"
        link = f'<a href="{page.name}">{stem}</a>' if page.is_file() else f"{stem} (not run: no {page.name})"
        items.append(f"<tr><td>{link}</td><td style='text-align:right'>{when}</td></tr>")
    total = sum(timings.get(s, 0.0) for s in notebooks)
    report = (f'<p><b><a href="report.html">The report</a></b> (notebook {REPORT_NOTEBOOK} without code)</p>'
              if (out_dir / "report.html").is_file() else
              f"<p><b>No report.html yet</b>: it is built when notebook {REPORT_NOTEBOOK} runs.</p>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>segstudy: {out_dir.name}</title>
<style>body{{font-family:sans-serif;max-width:46em;margin:2em auto}} td{{padding:2px 14px 2px 0}}</style>
</head><body><h1>segstudy, profile {html.escape(out_dir.name)}</h1>{header}{report}
<h2>Executed notebooks</h2><table><tr><th align="left">notebook</th><th>wall time</th></tr>
{chr(10).join(items)}
<tr><td><b>total</b></td><td style='text-align:right'><b>{total:.1f} s</b></td></tr></table>
<p style="color:#555">Wall times from timings.json (the latest run of each notebook).</p></body></html>
"""
    path = out_dir / "index.html"
    write_text(path, page)
    return path


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def sweep(notebook: str | Path, grid: dict[str, list[Any]], profile: str = "demo",
          fixed: dict[str, Any] | None = None, name: str | None = None, timeout: int | None = None,
          progress: bool = True) -> Path:
    """Run `notebook` once per combination of `grid` (config keys -> values) and gather the results.

    Each run gets its own folder outputs/sweeps/<name>/<key=value,...>/ (executed notebook, HTML,
    checkpoints, results) and logs to the profile's MLflow database with the tag sweep=<name>.
    A list-valued key swept over single values runs one value per run (loss_study.names=ce means
    ["ce"]). The gathered table is outputs/sweeps/<name>/sweep.json.
    """
    notebook = Path(notebook)
    if not notebook.is_file():
        raise UserError(f"notebook {notebook} does not exist; e.g. notebooks/03_loss_comparison.ipynb")
    check_parameters(notebook)
    fixed = fixed or {}
    base = load_config(profile, fixed)
    for key, values in grid.items():
        try:
            current = _get(base, key)
        except AttributeError:
            load_config(profile, fixed | {key: values[0]})  # raises the unknown-key error with the valid keys
            raise
        if isinstance(current, list):
            grid[key] = [v if isinstance(v, list) else [v] for v in values]
    name = name or f"{notebook.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = results_files.sweep_file(base.output_root, name).parent
    shared = {"tracking.uri": mlflow_uri(base.tracking, base.output_root), "tracking.sweep": name}
    runs = []
    for combo in itertools.product(*grid.values()):
        params = dict(zip(grid, combo))
        label = ",".join(f"{k}={v[0] if isinstance(v, list) and len(v) == 1 else v}" for k, v in params.items())
        run_root = sweep_dir / re.sub(r"[^A-Za-z0-9=,._-]", "_", label)
        overrides = fixed | params | shared | {"output_root": str(run_root)}
        load_config(profile, overrides)  # every combination is validated before the first one runs
        runs.append((params, run_root, overrides))
    prepare_data(base)
    rows = []
    for params, run_root, overrides in runs:
        row = {"params": params, "folder": str(run_root)}
        try:
            row["seconds"] = execute(notebook, run_root / notebook.name, profile, overrides, timeout, progress)
            row["results"] = results_files.read_run_results(run_root, base.profile, notebook.stem)
        except UserError as exc:
            row["error"] = str(exc)  # keep going: one failed combination does not lose the others
        rows.append(row)
        gathered = results_files.write_sweep(base.output_root, name, notebook.name, base.profile, fixed, grid, rows)
    failed = [r for r in rows if "error" in r]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} sweep runs failed (first: {failed[0]['error']}); "
                        f"the others are gathered in {gathered}")
    return gathered
