"""benchmarks/gpu_check.py on CPU: --tiny --ddp always runs every check of the GPU run on the same code paths
(the models, fused optimizer, DataLoader workers over generated PNGs, evaluation, the 2-rank training under
torchrun with gloo) and writes the JSON and the table the GPU run will; --device cuda without a GPU stops with
one line and exit status 2. What only a GPU runs (TF32, pinned memory, NCCL, SyncBatchNorm) is asked for by
the same code: the TF32 switch and the two-GPU rule are checked here in the process."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from segstudy.config import MODELS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _script():
    """The script as a module (registered first: its dataclasses look their module up)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=400,
                          env=os.environ | env)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_tiny_cpu_run_checks_every_path(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = _run("--device", "cpu", "--tiny", "--ddp", "always", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith("torch ")  # the machine comes first
    result = json.loads(out.read_text())
    assert {"machine", "provenance", "settings", "rows", "checks", "passed", "elapsed_s"} <= result.keys()
    rows = {row["check"]: row for row in result["rows"]}
    # one row per model at the profile's precision, the profile's model in float32 (CPUs have no TF32), ...
    variant = "bf16+channels_last"
    assert list(rows) == [*(f"train {m} {variant}" for m in MODELS), "train unet fp32", "loader", "eval", "ddp",
                          "within budget"]
    assert result["checks"] == {name: "PASS" for name in rows} and result["passed"]
    for name in MODELS:
        row = rows[f"train {name} {variant}"]
        assert _positive(row["img_per_s"]) and row["measured_steps"] == 2 and not row["stopped_early"], row
    assert _positive(rows["train unet fp32"]["bf16_over_fp32"])
    s = result["settings"]
    assert (s["profile"], s["optimizer"], s["amp"], s["channels_last"]) == ("full", "sgd", "bf16", True)
    fed = rows["loader"]  # the DataLoader with a worker process over the generated PNG files
    assert fed["iterations"] == 3 and fed["workers"] == 1 and fed["images"] == 4 and _positive(fed["img_per_s"])
    assert fed["pinned_memory"] is False  # pinned only for CUDA, as training asks for it
    assert all(math.isfinite(v) for v in fed["losses"]) and isinstance(fed["loss_fell"], bool)
    ev = rows["eval"]  # the generated images at their full size (data.base_size)
    assert ev["images"] == 2 and ev["size"] == "256x128" and 0 <= ev["miou"] <= 1 and _positive(ev["seconds_per_image"])
    ddp = rows["ddp"]
    assert (ddp["ranks"], ddp["backend"], ddp["steps"], ddp["sync_batchnorm"]) == (2, "gloo", 3, False)
    assert len(ddp["losses"]) >= 1 and all(math.isfinite(v) for v in ddp["losses"])
    lines = r.stdout.splitlines()
    assert lines[-2] == "verdict: PASS: 8 of 8 checks passed", r.stdout
    assert any(line.split()[:3] == ["train", "custom", variant] and "img/s" in line for line in lines)


def test_cuda_without_gpu_exits_2_with_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = _run("--device", "cuda", "--out", str(out), CUDA_VISIBLE_DEVICES="")  # no GPU, even on a GPU machine
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--device cpu --tiny" in lines[0], r.stderr
    assert not out.exists()


def test_tf32_row_turns_tf32_on_and_restores_the_setting():
    gpu_check = _script()
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with gpu_check.tf32(torch.device("cuda")) as name:
        assert name == "tf32" and (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with gpu_check.tf32(torch.device("cpu")) as name:
        assert name == "fp32"  # the same row on a CPU is plain float32


def test_ddp_runs_when_two_gpus_are_visible(monkeypatch):
    gpu_check, cuda, cpu = _script(), torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu_check.ddp_wanted("auto", cuda) and not gpu_check.ddp_wanted("never", cuda)
    assert not gpu_check.ddp_wanted("auto", cpu) and gpu_check.ddp_wanted("always", cpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not gpu_check.ddp_wanted("auto", cuda)
