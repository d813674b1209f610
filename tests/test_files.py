"""segstudy.files: the one atomic write (results, settings, checkpoints, ONNX and int8 files)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from segstudy import files


def test_atomic_write_replaces_only_on_success_and_follows_the_umask(tmp_path):
    target = tmp_path / "sub" / "results.json"
    files.write_json(target, {"miou": 0.5})
    old = os.umask(0o022)
    try:
        files.write_json(target, {"miou": 0.6})
    finally:
        os.umask(old)
    assert json.loads(target.read_text()) == {"miou": 0.6}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by a serving pod under another uid
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"miou": 0.6}
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_stale_temporaries_of_dead_writers_go_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"model.{dead}.tmp.onnx"
    other_file = tmp_path / f"other.{dead}.tmp.onnx"
    live = tmp_path / f"model.{os.getppid()}.tmp.onnx"
    for p in (stale, other_file, live):
        p.write_bytes(b"x")
    files.write_text(tmp_path / "model.onnx", "done")
    assert not stale.exists() and other_file.exists() and live.exists()
    files.remove_stale_temporaries(tmp_path)
    assert not other_file.exists() and live.exists()
