"""What produced a figure: the commit (and whether the checkout had uncommitted changes), the locked
environment, the software versions, the machine, the profile with its overrides, and when.

Every results file, report.html, index.html and MLflow run carries this stamp.
"""

from __future__ import annotations

import functools
import hashlib
import html
import platform
import subprocess
import time

import torch
import torchvision

from segstudy.config import Config
from segstudy.config_paths import PROJECT_ROOT
from segstudy.engine.measure import cpu_info


@functools.cache
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty); ("unknown", None) outside a git checkout (e.g. a Docker image)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, dirty


@functools.cache
def _environment() -> dict:
    lock = PROJECT_ROOT / "requirements.lock"
    info = cpu_info()
    flags = [f for f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if info.get(f)]
    return {"lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else None,
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpu": info["cpu"], "cpu_flags": flags,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def stamp(cfg: Config, **times: str) -> dict:
    """The stamp for `cfg`'s run; `times` adds e.g. started=..., finished=... (ISO 8601)."""
    commit, dirty = git_state()
    return {"commit": commit, "dirty": dirty, **_environment(), "profile": cfg.profile,
            "overrides": {k: str(v) for k, v in cfg.overrides.items()},
            "written": now(), **times}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def as_tags(s: dict) -> dict[str, str]:
    """MLflow run tags (segstudy.commit, segstudy.dirty, ...)."""
    return {f"segstudy.{k}": (", ".join(map(str, v)) if isinstance(v, list) else str(v))[:500]
            for k, v in s.items() if k not in ("written",)}


def as_html(s: dict) -> str:
    """A small block that names what produced the page."""
    dirty = " with uncommitted changes" if s["dirty"] else ("" if s["dirty"] is False else "")
    overrides = ", ".join(f"{k}={v}" for k, v in s["overrides"].items()) or "none"
    machine = f"{s['cpu']} ({', '.join(s['cpu_flags']) or 'no AVX2'})" + (f", GPU {s['gpu']}" if s["gpu"] else "")
    when = " to ".join(s[k] for k in ("started", "finished") if s.get(k)) or s["written"]
    rows = [("commit", f"{s['commit']}{dirty}"), ("environment", f"requirements.lock {s['lock_sha256']}, Python "
            f"{s['python']}, torch {s['torch']}, torchvision {s['torchvision']}"), ("machine", machine),
            ("profile", f"{s['profile']}, overrides: {overrides}"), ("run", when)]
    cells = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return (f'<div class="segstudy-provenance" style="font-size:85%;color:#444;border:1px solid #ddd;'
            f'padding:4px 10px;margin:8px 0"><table>{cells}</table></div>')
