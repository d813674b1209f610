"""A training's run folder (outputs/<profile>/runs/<model>/): one process at a time, and a finished
run is never lost to an unfinished one.

- `lock` takes an exclusive flock on `<run>.lock` beside the folder; a second process gets a clear
  error naming the PID that holds it. The kernel drops the lock when its process dies, even by
  SIGKILL, so a crash never leaves a stale lock behind.
- A fresh training next to a finished run writes into `<run>.next` and `promote` swaps it in only
  when it finishes: the finished run becomes `<run>.previous`. A failed or interrupted retry leaves
  the finished run where it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from segstudy.errors import UserError
from segstudy.models.checkpoint import remove_stale_temporaries


def finished_result(run_dir: Path) -> dict | None:
    """The result.json of a run whose training finished; None for an unfinished or absent run."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return result if result.get("finished") else None


def finished(run_dir: Path) -> bool:
    return finished_result(run_dir) is not None


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


def work_folder(run_dir: Path, resume: bool) -> Path:
    """Where this training writes: run_dir itself, or `<run>.next` beside a finished run (emptied
    first: it only ever holds an unfinished retry)."""
    if resume or not finished(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        return run_dir
    staging = run_dir.with_name(run_dir.name + ".next")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def promote(work_dir: Path, run_dir: Path) -> None:
    """Swap a finished retry in: run_dir -> <run>.previous, <run>.next -> run_dir."""
    if work_dir == run_dir:
        return
    previous = run_dir.with_name(run_dir.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    run_dir.rename(previous)
    work_dir.rename(run_dir)
    print(f"[segstudy] the new run replaced the one in {run_dir}; the earlier run is kept in {previous}")
