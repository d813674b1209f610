"""Writing a file so that no reader ever sees half of it: the one atomic write of segstudy.

The new content goes to `<stem>.<pid>.tmp<suffix>` beside the file (the same filesystem, so the
rename is atomic; the pid keeps two writers apart; the suffix keeps tools that look at it happy),
then replaces the file. It is created like any file, so its mode follows the umask (a
`tempfile.mkstemp` file would stay 0600: unreadable to a serving pod or a colleague).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from segstudy.errors import UserError

_TEMPORARY = re.compile(r"^(?P<stem>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[^.]+)?$")


def temporary(path: Path) -> Path:
    """The temporary name this process writes `path` under."""
    return path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield the temporary path; it replaces `path` only if the block succeeds, else it is removed.
    A full disk becomes one line naming the path and the space needed (`needed` bytes, when the
    caller knows them); the file it would have replaced is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if not disk_full(exc):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        raise no_space(path, needed or written) from None
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(exc: BaseException) -> bool:
    """An OSError ENOSPC/EDQUOT, or torch.save's RuntimeError for the same (its zip writer reports a
    short write as "unexpected pos" or "file write failed")."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "unexpected pos" in text or "file write failed" in text or "No space left" in text


def no_space(path: Path, needed: int) -> UserError:
    """The one line for a full disk: the path, what it needs, what is free, the fix."""
    free = shutil.disk_usage(path.parent).free
    need = (f"at least {needed / 2**20:.1f} MB" if needed >= 2**20 else f"at least {needed / 2**10:.1f} KB") \
        if needed else "more space"
    return UserError(f"no space left to write {path}: it needs {need}, {free / 2**20:.1f} MB are free there; "
                     f"free some space (or set output_root to a disk with room) and run the same command again "
                     f"(nothing partial was written)")


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, payload: object, **dumps) -> Path:
    """JSON (indent 2 unless given) written atomically."""
    return write_text(path, json.dumps(payload, **({"indent": 2} | dumps)))


@contextmanager
def exclusive_lock(path: Path, waiting: str = "") -> Iterator[None]:
    """An exclusive flock on `path` (made when missing) for the block; another process waits for it,
    printing `waiting` first when given. The kernel drops the lock when its holder dies, so a crash
    never leaves a stale one. (run_folder.lock refuses instead of waiting: a second training.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> None:
    """Delete the temporaries (of `name`, or of every file) left in `folder` by writers that were
    killed: their PID is gone."""
    want = None if name is None else (Path(name).stem, Path(name).suffix)
    for tmp in Path(folder).glob("*.tmp*"):
        match = _TEMPORARY.match(tmp.name)
        if not match or (want and (match["stem"], match["suffix"] or "") != want):
            continue
        if not process_alive(int(match["pid"])):
            tmp.unlink(missing_ok=True)
