"""A training's run folder (outputs/<profile>/runs/<model>/): one process at a time, and a finished
run is never lost to an unfinished one.

- `lock` takes an exclusive flock on `<run>.lock` beside the folder; a second process gets a clear
  error naming the PID that holds it. The kernel drops the lock when its process dies, even by
  SIGKILL, so a crash never leaves a stale lock behind.
- A fresh training next to a finished run writes into `<run>.next` and `promote` swaps it in only
  when it finishes: the finished run becomes `<run>.previous`. A failed or interrupted retry leaves
  the finished run where it was.
- Each training writes the settings it was started with (`settings.json`): an unfinished run of the
  same settings is continued (`unfinished`), a finished one reused; other settings start over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from segstudy.config import Config
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.errors import UserError
from segstudy.files import remove_stale_temporaries, write_json
from segstudy.models.networks import weights_on_disk

# the layout, spelled here only: outputs/<profile>/runs/<name>/ holding these files
RUNS = "runs"
BEST = "checkpoint_best.pt"  # the best validation's weights: what predict, serving and the later notebooks load
LATEST = "checkpoint_latest.pt"  # the whole state to continue from (until the run finishes)
CONFUSIONS = "val_confusions.npy"  # [images, 19, 20]: each validation image's confusion matrix, best epoch
PREVIEWS = "val_previews.npz"  # the best epoch's predictions of the first validation images (uint8 train ids)


def key(name: str) -> str:
    """A training's run key, its folder relative to outputs/<profile>/: runs/<name>."""
    return f"{RUNS}/{name}"


def run_dir(cfg: Config, name: str) -> Path:
    """outputs/<profile>/runs/<name>/: the folder of training `name` (a model, custom+bdd100k, ...)."""
    return cfg.output_dir / key(name)


def best(cfg: Config, name: str) -> Path:
    """The best weights of training `name`."""
    return run_dir(cfg, name) / BEST


def _read_json(path: Path) -> dict | None:
    """A run folder's JSON file; None when it is absent or unreadable (a write cut short)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def read_result(run_dir: Path) -> dict | None:
    """A run folder's result.json, finished or not; None when absent or unreadable."""
    return _read_json(run_dir / "result.json")


def finished_result(run_dir: Path) -> dict | None:
    """The result.json of a run whose training finished; None for an unfinished or absent run."""
    result = read_result(run_dir)
    return result if result and result.get("finished") else None


def finished(run_dir: Path) -> bool:
    return finished_result(run_dir) is not None


def capped_result(run_dir: Path, max_steps: int) -> dict | None:
    """The result.json of a run that train.max_steps = `max_steps` stopped (validated, usable)."""
    result = read_result(run_dir)
    return result if result and max_steps and result.get("capped_at_step") == max_steps else None


# what does not change the trained weights: how fast, where, how often saved, when to stop, which
# folder the ImageNet file is read from
_NOT_SETTINGS = {"data.num_workers", "data.cache_mb", "train.reuse", "train.max_steps", "train.checkpoint_every",
                 "train.compile", "train.gpus", "model.weights_dir"}


def settings(cfg: Config, model_config) -> dict:
    """The keys that decide a training's weights, flat (`train.lr`: 0.02): the same settings give
    the same run, so it may be reused or continued."""
    sections = {"data": cfg.data, "model": model_config, "train": cfg.train, "loss": cfg.loss}
    flat = {"seed": cfg.seed}
    for name, section in sections.items():
        flat |= {f"{name}.{key}": value for key, value in dataclasses.asdict(section).items()}
    # train.amp "auto" means bf16 on one machine and fp32 on another: the weights follow what it chose
    flat["train.precision"] = str(autocast_dtype(cfg.train.amp, resolve_device(cfg.device)) or torch.float32)
    if cfg.data.mix_with:  # the mixed datasets' folders and sizes; a single-dataset run records no mix keys,
        # so its settings stay those of runs made before mixing existed (and are reused)
        flat |= {f"cross.{name}": dataclasses.asdict(getattr(cfg.cross, name)) for name in cfg.data.mix_with}
    else:
        flat = {key: value for key, value in flat.items() if key not in ("data.mix_with", "data.sampling")}
    return {key: value for key, value in flat.items() if key not in _NOT_SETTINGS}


NO_SETTINGS = "no readable settings recorded (an older run, or a write cut short)"


def changed_settings(saved: dict | None, current: dict) -> str:
    """The settings that differ, in words ("train.lr 0.01 -> 0.02"); empty when the same. A run
    without readable settings differs: nothing shows it was trained the same way."""
    if not isinstance(saved, dict):
        return NO_SETTINGS
    keys = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    return ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys[:4]) + \
        (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def reusable(run_dir: Path, cfg: Config, model_config) -> tuple[dict | None, str]:
    """The one rule for returning a run instead of training (training, the plan and the loss study
    call it): with train.reuse a finished run, and whatever train.reuse one that the same
    train.max_steps stopped (continuing it would train nothing), in both cases only when its recorded
    settings are those of (cfg, model_config). (result marked "reused", "") or (None, why not; ""
    when there is no such run)."""
    result = (cfg.train.reuse and finished_result(run_dir)) or capped_result(run_dir, cfg.train.max_steps)
    if not result:
        return None, ""
    if changed := changed_settings(result.get("settings"), settings(cfg, model_config)):
        return None, changed
    if weights := _imagenet_now(result, model_config):
        return None, f"it started from random init, and the ImageNet weights are on this machine now ({weights})"
    return result | {"reused": True}, ""


def _imagenet_now(result: dict, model_config) -> Path | None:
    """With model.pretrained auto, a run that fell back to random init (no weights then) would train
    differently now that the weights file is there: its settings are the same, its start is not."""
    if result.get("backbone_init") != "random" or str(model_config.pretrained).lower() != "auto":
        return None
    return weights_on_disk(model_config.weights_dir)


def write_settings(work_dir: Path, values: dict) -> None:
    write_json(work_dir / "settings.json", values, indent=1, sort_keys=True)


def unfinished(run_dir: Path, values: dict, insist: bool = False) -> Path | None:
    """The folder of an interrupted training of these settings, to continue from its latest
    checkpoint: run_dir, or `<run>.next` beside a finished run. `insist` (--resume): one must exist."""
    for folder in (run_dir, staging(run_dir)):
        if not (folder / "checkpoint_latest.pt").is_file() or finished(folder):
            continue
        if changed := changed_settings(_read_json(folder / "settings.json"), values):
            if insist:
                raise UserError(f"the run in {folder} was started with other settings ({changed}); resuming "
                                f"would mix two recipes: drop --resume to start over, or set them back")
            print(f"[segstudy] the unfinished run in {folder} has other settings ({changed}): starting over")
            continue
        remove_stale_temporaries(folder)
        return folder
    if insist:
        why = (" finished, so it keeps no state to resume from (its weights are checkpoint_best.pt); to train "
               "longer, retrain with more train.epochs") if finished(run_dir) else " has no checkpoint_latest.pt"
        raise UserError(f"nothing to resume: the run in {run_dir}{why}")
    return None


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold `<run_dir>.lock` for the duration; refuse if another process holds it."""
    path = run_dir.with_name(run_dir.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"the run folder {run_dir} is in use by PID {holder} (another training of the same "
                            f"model and output_root); wait for it to end, or give this one another output_root "
                            f"or run_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def staging(run_dir: Path) -> Path:
    """`<run>.next`: where a retry beside a finished run trains until it finishes."""
    return run_dir.with_name(run_dir.name + ".next")


def work_folder(run_dir: Path) -> Path:
    """Where a training that starts over writes: `<run>.next` beside a finished run (emptied first:
    it only ever holds an unfinished retry), else an empty run_dir (an unfinished run of other
    settings found there moves to `<run>.previous`)."""
    if finished(run_dir):
        target = staging(run_dir)
        if target.exists():
            shutil.rmtree(target)
    else:
        target = run_dir
        if run_dir.is_dir() and any(run_dir.iterdir()):
            _keep_as_previous(run_dir)
    target.mkdir(parents=True, exist_ok=True)
    return target


def _keep_as_previous(run_dir: Path) -> None:
    previous = run_dir.with_name(run_dir.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    run_dir.rename(previous)
    print(f"[segstudy] the earlier unfinished run is kept in {previous}")


def promote(work_dir: Path, run_dir: Path) -> None:
    """Swap a finished retry in: run_dir -> <run>.previous, <run>.next -> run_dir."""
    if work_dir == run_dir:
        return
    _keep_as_previous(run_dir)
    work_dir.rename(run_dir)
    print(f"[segstudy] the new run replaced the one in {run_dir}")
