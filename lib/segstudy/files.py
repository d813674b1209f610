"""Writing a file so that no reader ever sees half of it: the one atomic write of segstudy.

The new content goes to `<stem>.<pid>.tmp<suffix>` beside the file (the same filesystem, so the
rename is atomic; the pid keeps two writers apart; the suffix keeps tools that look at it happy),
then replaces the file. It is created like any file, so its mode follows the umask (a
`tempfile.mkstemp` file would stay 0600: unreadable to a serving pod or a colleague).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY = re.compile(r"^(?P<stem>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[^.]+)?$")


def temporary(path: Path) -> Path:
    """The temporary name this process writes `path` under."""
    return path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path; it replaces `path` only if the block succeeds, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, payload: object, **dumps) -> Path:
    """JSON (indent 2 unless given) written atomically."""
    return write_text(path, json.dumps(payload, **({"indent": 2} | dumps)))


def _alive(pid: int) -> bool:
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
        if not _alive(int(match["pid"])):
            tmp.unlink(missing_ok=True)
