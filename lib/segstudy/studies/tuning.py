"""Notebook 06 and `segstudy tune`: an Optuna search over a profile's `tune.space`.

The objective is `tune.model`'s best validation mIoU under a fixed budget (`tune.epochs`,
`tune.max_steps`, `tune.max_images`; validated after every epoch). A trial is an ordinary training
(engine.training.train) in its own run folder, outputs/<profile>/tune/<study>/trials/<number>/; its
validations feed the pruner (median or Hyperband), which stops a poor trial after any of them. The
sampler is TPE, seeded from the profile's seed. The study lives in a storage (tune_storage): a file
beside its results by default, a journal file for several processes on one machine, a database for
several machines; running the same command again continues it, and a trial whose worker died (or
that Ctrl-C stopped) is failed and its parameters tried again first, from its run folder's last
checkpoint. What every trial shares (the datasets, the device; the budget and the search space:
tune_space) is checked before the storage is touched; a trial failing for its own values (a loss
that diverged, a batch larger than the data) is failed and the study goes on, one failing for
anything else stops the study with that one line.

MLflow gets one parent run per study and one child run per trial (the training's own run, nested
with mlflow.parentRunId, tagged with the trial's final state: tune_tracking). `save` writes
trials.csv, the best parameters as a profile fragment (best.yaml), the figures and study.json, which
the report reads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from segstudy import config_paths, interrupts, tracking
from segstudy.config import Config
from segstudy.config_profiles import load_config, parse_overrides, resolve_profile
from segstudy.data.datasets import prepare_data, training_datasets
from segstudy.engine import run_folder
from segstudy.engine.device import resolve_device
from segstudy.engine.training import checked_data, train
from segstudy.errors import UserError
from segstudy.files import write_text
from segstudy.studies import figures, results_files, tune_space, tune_storage, tune_tracking
from segstudy.studies.report_figures import Part

SIGNATURE = "segstudy"  # the study's user attribute: the space and budget it began with
FIGURES = {"history": "optimization_history.png", "importances": "param_importances.png",
           "intermediate": "intermediate_values.png"}
DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass
class Tuning:
    """One study as this process sees it."""

    cfg: Config
    profile: str
    overrides: dict
    name: str
    out: Path  # outputs/<profile>/tune/<study>/
    storage: str  # its URL as shown (no password)
    study: optuna.Study
    parent_run: str | None = None  # the study's MLflow run
    seconds: float = 0.0  # spent in `optimize` by this process
    ran: int = 0  # trials this process finished
    current: int | None = None  # the number of the trial this process runs now
    failures: dict[int, str] = dataclasses.field(default_factory=dict)  # trial number -> why it failed

    def describe(self) -> str:
        tune = self.cfg.tune
        return (f"study '{self.name}' in {self.storage}: {len(self.study.trials)} trials so far; "
                f"{tune.model}, {tune.epochs} epochs per trial, searching {', '.join(tune.space)}")


def start(profile: str, overrides: dict | list[str] | None = None, study: str | None = None,
          storage: str | None = None) -> Tuning:
    """Open (or begin) the study; every input is checked before the storage is touched."""
    overrides = parse_overrides(overrides)
    cfg = load_config(profile, overrides)
    tune_space.check(cfg, profile, overrides)
    name = study or cfg.tune.model
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"--study {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    check_shared(cfg)
    out = results_files.tune_dir(cfg, name)
    store, shown = tune_storage.open_storage(storage, out, cfg.tune)
    # segstudy prints one line per trial, a failed one's reason in it; Optuna's warning adds a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tuning = Tuning(cfg, profile, overrides, name, out, shown, _open_study(cfg, name, store, shown))
    if failed := tune_storage.fail_dead_local_trials(tuning.study, cfg.tune):
        print(f"[segstudy] trials {', '.join(map(str, failed))} were left running by a process that is gone: "
              f"marked failed, their parameters queued again", flush=True)
    tuning.parent_run = tune_tracking.parent_run(cfg, shown, name)
    if cfg.train.gpus > 1:
        print(one_gpu_line(tuning), flush=True)
    return tuning


def one_gpu_line(tuning: Tuning) -> str:
    """What a study started with train.gpus = N > 1 (./run_all.sh full --gpus N) does with the GPUs."""
    n, visible = tuning.cfg.train.gpus, os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={visible}: the first of them" if visible else "the first visible GPU"
    journal = tuning.out / "study.journal"
    return (f"[segstudy] tuning: train.gpus = {n}, but a trial trains in one process on one GPU ({where}), one "
            f"trial at a time; to use {n} GPUs start {n} workers on one storage: "
            f"CUDA_VISIBLE_DEVICES=N SEGSTUDY_WORKER=N segstudy tune --profile {tuning.profile} --trials K "
            f"--storage journal:{journal}, for N = 0 ... {n - 1}")


def check_shared(cfg: Config) -> None:
    """What every trial shares, before the storage is touched: the device, the training and validation
    datasets (generated where the profile generates them), their files' headers and labels."""
    trial = tune_space.budget_config(cfg)
    resolve_device(trial.device)
    prepare_data(trial, training_datasets(trial))
    checked_data(trial)


def _open_study(cfg: Config, name: str, store, shown: str) -> optuna.Study:
    """The stored study (its space and budget unchanged), or a new one."""
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        study = optuna.create_study(study_name=name, storage=store, direction="maximize", load_if_exists=True)
    saved, now = study.user_attrs.get(SIGNATURE), tune_space.signature(cfg)
    if saved is None:
        study.set_user_attr(SIGNATURE, now)
    elif saved != now:
        raise UserError(f"study '{name}' in {shown} began with {tune_space.difference(saved, now)}; its trials "
                        f"would not compare: name a new study (--study NAME) or set tune back as it was")
    study.sampler = optuna.samplers.TPESampler(seed=_seed(cfg, study), n_startup_trials=cfg.tune.startup_trials,
                                               constant_liar=True)
    study.pruner = _pruner(cfg)
    return study


def _seed(cfg: Config, study: optuna.Study) -> int:
    """The profile's seed, moved on by the trials already run (a continued study draws new points)
    and by the worker's index (parallel workers: JOB_COMPLETION_INDEX in an indexed Job, else
    SEGSTUDY_WORKER), so two workers do not propose the same first trials."""
    worker = int(os.environ.get("JOB_COMPLETION_INDEX") or os.environ.get("SEGSTUDY_WORKER") or 0)
    return cfg.seed + 1000 * worker + len(study.get_trials(deepcopy=False))


def _pruner(cfg: Config) -> optuna.pruners.BasePruner:
    tune = cfg.tune
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.epochs)
    return optuna.pruners.NopPruner()


# --- running trials --------------------------------------------------------------------------

class _OwnFailure(Exception):
    """A trial's UserError that its sampled values caused: the trial is failed, the study goes on."""


def optimize(tuning: Tuning, trials: int, timeout: float | None = None) -> None:
    """Run `trials` trials in this process (Optuna's n_trials; queued retries first), or stop
    starting new ones after `timeout` seconds. A trial whose own values fail its training (the loss
    diverged, a batch larger than the data) is failed and the study goes on; a UserError every trial
    would meet, or Ctrl-C, fails the trial, queues its parameters again and stops the study."""
    started, status = time.perf_counter(), "FAILED"
    tune_tracking.set_status(tuning.cfg, tuning.parent_run, "RUNNING")
    try:
        tuning.study.optimize(lambda trial: _objective(tuning, trial), n_trials=trials, timeout=timeout or None,
                              callbacks=[lambda study, trial: _after_trial(tuning, trial)], catch=(_OwnFailure,),
                              gc_after_trial=True)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        _after_stop(tuning)
        raise
    except UserError as exc:
        number = _after_stop(tuning)
        if number is None:
            raise
        raise UserError(f"trial {number} failed for a reason every trial shares, so the study stopped (its "
                        f"parameters run first when it continues): {exc}") from None
    finally:
        tuning.seconds += time.perf_counter() - started
        tune_tracking.set_status(tuning.cfg, tuning.parent_run, status)


def _after_stop(tuning: Tuning) -> int | None:
    """After Ctrl-C or a failure every trial shares: the trial this process ran (failed by Optuna) is
    queued again with its parameters, its MLflow run and the trials table brought up to date; returns
    its number (None when no trial was running)."""
    number, tuning.current = tuning.current, None
    trial = next((t for t in tuning.study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != TrialState.FAIL:
        return None
    tune_storage.requeue(tuning.study, trial)
    tune_tracking.record_trial(tuning.cfg, tuning.parent_run, tuning.study, trial)
    results_files.write_csv(tuning.out / "trials.csv", trials_table(tuning.study), index=False)
    return number


def optimize_until(tuning: Tuning, total: int, timeout: float | None = None) -> int:
    """Run trials until the study holds `total` finished ones (notebook 06: a re-run adds none);
    returns how many this call ran."""
    missing = max(0, total - len(tuning.study.get_trials(deepcopy=False, states=DONE)))
    if missing:
        optimize(tuning, missing, timeout)
    return missing


def trial_dir(tuning: Tuning, number: int) -> Path:
    return tuning.out / "trials" / f"{number:04d}"


def _objective(tuning: Tuning, trial: optuna.Trial) -> float:
    tuning.current = trial.number
    with interrupts.deferred():
        trial.set_user_attr(tune_storage.WORKER, tune_storage.this_worker())
    params = {key: tune_space.suggest(trial, key, spec) for key, spec in tuning.cfg.tune.space.items()}
    # a retry of a trial whose worker died continues that trial's run folder from its last checkpoint
    origin = tune_storage.retry_of(next(t for t in tuning.study.get_trials(deepcopy=False) if t.number == trial.number))
    run_dir = trial_dir(tuning, trial.number if origin is None else origin)
    cfg = load_config(tuning.profile, tuning.overrides | tune_space.budget(tuning.cfg) | params)

    def report(epoch: int, record: dict) -> None:
        with interrupts.deferred():  # the study's database, written and read
            trial.report(record["val_miou"], epoch)
            prune = epoch < cfg.train.epochs and trial.should_prune()  # after the last epoch nothing is saved
        if prune:
            raise optuna.TrialPruned(f"val mIoU {100 * record['val_miou']:.2f} after epoch {epoch}")

    tags = {"segstudy.study": tuning.name, "segstudy.trial": str(trial.number)}
    with tracking.extra_tags(tags | ({"mlflow.parentRunId": tuning.parent_run} if tuning.parent_run else {})):
        try:
            result = train(cfg, run_dir=run_dir, progress=False, keep_weights=False, on_validation=report)
        except optuna.TrialPruned:
            # a pruned trial is never continued nor used: its checkpoints are only weight on the disk
            for name in (run_folder.LATEST, run_folder.BEST):
                (run_dir / name).unlink(missing_ok=True)
            raise
        except UserError as exc:
            if not _own_failure(exc, params):
                raise
            tuning.failures[trial.number] = str(exc)
            raise _OwnFailure(str(exc)) from None
    return result["best_miou"]


def _own_failure(exc: UserError, params: dict) -> bool:
    """Whether a trial's error comes from its sampled values: a loss that diverged (training raises
    its UserError while handling the FloatingPointError), or a message naming a key the trial sampled
    (data.batch_size larger than the images). Anything else (the data, a file, a folder in use) is
    what every trial would meet."""
    return isinstance(exc.__context__, FloatingPointError) or any(key in str(exc) for key in params)


def _after_trial(tuning: Tuning, trial: FrozenTrial) -> None:
    """One line, the MLflow runs brought up to date, the trials table rewritten (a killed
    study keeps a current one)."""
    tuning.ran += 1
    tuning.current = None
    value = f", val mIoU {100 * trial.value:.2f}" if trial.value is not None else ""
    last = f" at epoch {max(trial.intermediate_values)}" if trial.state == TrialState.PRUNED and \
        trial.intermediate_values else ""
    why = f": {tuning.failures[trial.number]}" if trial.number in tuning.failures else ""
    print(f"[segstudy] trial {trial.number}: {trial.state.name.lower()}{last}{value}{why} "
          f"({', '.join(f'{k}={_shown(v)}' for k, v in trial.params.items())})", flush=True)
    tune_tracking.record_trial(tuning.cfg, tuning.parent_run, tuning.study, trial)
    results_files.write_csv(tuning.out / "trials.csv", trials_table(tuning.study), index=False)


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --- results ----------------------------------------------------------------------------------

def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, val mIoU (points), the parameters, validations, seconds, worker."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        worker = t.user_attrs.get(tune_storage.WORKER) or {}
        rows.append({"trial": t.number, "state": t.state.name,
                     "val mIoU %": None if t.value is None else 100 * t.value,
                     **t.params, "validations": len(t.intermediate_values),
                     "last epoch": max(t.intermediate_values, default=None),
                     "seconds": t.duration.total_seconds() if t.duration else None,
                     "retry of": tune_storage.retry_of(t),
                     "worker": f"{worker.get('host', '?')}:{worker.get('pid', '?')}" if worker else ""})
    return pd.DataFrame(rows)


def save(tuning: Tuning) -> dict:
    """trials.csv, best.yaml (when a trial completed), the three figures and study.json; returns the
    summary written to study.json."""
    study, out = tuning.study, tuning.out
    table = trials_table(study)
    results_files.write_csv(out / "trials.csv", table, index=False)
    states = table["state"].value_counts().to_dict() if len(table) else {}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    summary = {"study": tuning.name, "profile": tuning.cfg.profile, "storage": tuning.storage,
               "signature": tune_space.signature(tuning.cfg), "trials": len(table),
               "states": {s.name: states.get(s.name, 0) for s in TrialState},
               "seconds_this_process": tuning.seconds,
               "seconds_trials": float(table["seconds"].fillna(0).sum()) if len(table) else 0.0,
               "best": None if best is None else {"trial": best.number, "val_miou": best.value, "params": best.params,
                                                  "set": set_args(best.params),
                                                  "fragment": str(write_best(tuning, best))},
               "mlflow_parent_run": tuning.parent_run, "figures": save_figures(tuning)}
    results_files.write_tune(tuning.cfg, tuning.name, summary)
    return summary


def set_args(params: dict) -> list[str]:
    """The best parameters as `--set` arguments."""
    return [f"{key}={value}" for key, value in params.items()]


def write_best(tuning: Tuning, best: FrozenTrial) -> Path:
    """best.yaml: the profile the study ran with its --set values, the tuned model (tune.model) and the
    best parameters: `segstudy train --profile best.yaml` trains what the best trial trained, at the
    profile's own length (the study's budget is left out), `segstudy run` runs the notebooks with it,
    `extends: <it>` starts another profile from it. Every path is written as the study resolved it
    (absolute), as the file lives elsewhere than the profile it extends."""
    cfg = tuning.cfg
    keys = ({k: v for k, v in tuning.overrides.items() if not k.startswith("tune.")} | _paths(cfg)
            | {"model.name": cfg.tune.model} | best.params)
    fragment: dict = {"extends": str(resolve_profile(tuning.profile).resolve()), "profile": f"{cfg.profile}-tuned"}
    for key, value in keys.items():
        node = fragment
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    head = (f"# study '{tuning.name}' ({tuning.storage}), trial {best.number}: val mIoU {100 * best.value:.2f} "
            f"({cfg.tune.model}, {cfg.tune.epochs} epochs per trial)\n"
            f"# or: --profile {tuning.profile} --set model.name={cfg.tune.model} {' '.join(set_args(best.params))}\n")
    return write_text(tuning.out / "best.yaml", head + yaml.safe_dump(fragment, sort_keys=False))


def _paths(cfg: Config) -> dict[str, str]:
    """Every path key of the config (declared with config_paths.path_field) that holds one, as loaded."""
    return {key: getattr(section, f.name) for key, section, f in config_paths.path_fields(cfg)
            if getattr(section, f.name)}


def save_figures(tuning: Tuning) -> dict[str, str]:
    """Optuna's matplotlib figures of the study (file names by kind; one that cannot be drawn yet,
    e.g. importances before two trials completed, is left out)."""
    from optuna.visualization import matplotlib as vis

    in_points = {"target": lambda t: 100 * t.value, "target_name": "val mIoU %"}
    draw = {"history": lambda: vis.plot_optimization_history(tuning.study, **in_points),
            # importances read the study's direction (maximize) only without a target
            "importances": lambda: vis.plot_param_importances(tuning.study),
            "intermediate": lambda: vis.plot_intermediate_values(tuning.study)}
    if len(tuning.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        draw.pop("importances")  # Optuna's estimate compares finished trials (one alone: all equal)
        print("[segstudy] no importances figure yet: it needs 2 complete trials")
    saved = {}
    for kind, plot in draw.items():
        try:
            with warnings.catch_warnings():  # Optuna's matplotlib plots are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            print(f"[segstudy] no {kind} figure yet: {exc}")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figures.save(figure, tuning.out / FIGURES[kind])
        plt.close(figure)
        saved[kind] = FIGURES[kind]
    return saved


def report(cfg: Config) -> Part:
    """Notebook 08's tuning section: each study of this profile (trials by state, the best trial),
    with its figures."""
    found = results_files.tunes(cfg)
    if not found:
        return Part(caption=f"No tuning study was run with this profile (notebook 06, or segstudy tune "
                            f"--profile {cfg.profile} --trials N).")
    rows, images = [], []
    for file, d in found:
        best = d.get("best") or {}
        rows.append({"study": d["study"], "model": d["signature"]["model"],
                     "epochs per trial": d["signature"]["epochs"], "trials": d["trials"],
                     **{state.lower(): d["states"].get(state, 0) for state in ("COMPLETE", "PRUNED", "FAIL")},
                     "best mIoU %": 100 * best["val_miou"] if best else None,
                     "best parameters": ", ".join(best.get("set", [])), "trial seconds": d["seconds_trials"]})
        images += [file.parent / name for name in d["figures"].values() if (file.parent / name).is_file()]
    caption = ("Each study's trials (complete, pruned by the median/Hyperband pruner, failed) and its best "
               "parameters; best.yaml beside each study.json holds them as a profile fragment.")
    return Part(pd.DataFrame(rows).set_index("study").round(2), [f for f, _ in found], caption=caption, images=images)
