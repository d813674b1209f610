"""benchmarks/gpu_check.py on CPU: --tiny runs every phase and writes the JSON the GPU run will write;
--device cuda without a GPU stops with one line and exit status 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=os.environ | env)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_tiny_cpu_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = _run("--device", "cpu", "--tiny", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith("torch ")  # the machine comes first
    result = json.loads(out.read_text())
    assert {"machine", "provenance", "settings", "throughput", "full_res_training", "full_res_eval", "checks",
            "passed", "elapsed_s"} <= result.keys()
    assert result["machine"]["cpu"] and result["settings"]["tiny"] is True
    tp = result["throughput"]
    for variant in ("fp32", "amp_channels_last"):
        assert _positive(tp[variant]["img_per_s"]), tp[variant]
        assert tp[variant]["measured_steps"] == 2 and not tp[variant]["stopped_early"]
    assert _positive(tp["speedup_amp_channels_last_over_fp32"]) and _positive(tp["forward_GFLOPs_per_image"])
    train = result["full_res_training"]
    assert train["iterations"] == 3 and len(train["losses"]) == 3 and train["error"] is None
    assert all(math.isfinite(v) for v in (train["loss_start"], train["loss_end"]))
    assert _positive(train["img_per_s"]) and isinstance(train["loss_fell"], bool)
    ev = result["full_res_eval"]
    assert ev["images"] == 1 and 0 <= ev["miou"] <= 1 and _positive(ev["seconds_per_image"])
    assert result["passed"] and all(result["checks"].values())
    assert "check throughput_measured  PASS" in r.stdout


def test_cuda_without_gpu_exits_2_with_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = _run("--device", "cuda", "--out", str(out), CUDA_VISIBLE_DEVICES="")  # no GPU, even on a GPU machine
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--device cpu --tiny" in lines[0], r.stderr
    assert not out.exists()
