"""The device and precision the engine picks on GPUs this machine does not have: torch's CUDA queries
monkeypatched, the NVIDIA driver a fake `nvidia-smi` first on PATH."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from segstudy.engine import device
from segstudy.engine.device import autocast_dtype, cpu_trains_bf16_faster, resolve_device
from segstudy.errors import UserError
from tests.test_environment import ROOT, fake_nvidia_smi, fake_venv

CUDA = torch.device("cuda")


def test_auto_precision_takes_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype("auto", CUDA) == torch.float16  # a V100 or T4: bf16 only emulated, fp16 + GradScaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("auto", CUDA) == torch.bfloat16  # Ampere and newer
    assert autocast_dtype("bf16", CUDA) == torch.bfloat16 and autocast_dtype("fp16", CUDA) == torch.float16


@pytest.mark.parametrize(("vendor", "flags", "bf16"), [
    ("GenuineIntel", {"avx512_bf16": True, "amx_bf16": True}, True),    # Xeon with AMX
    ("GenuineIntel", {"avx512_bf16": True, "amx_bf16": False}, False),  # Xeon with AVX-512 BF16, no AMX
    ("AuthenticAMD", {"avx512_bf16": True, "amx_bf16": False}, True),   # Zen 4, Zen 5
    ("AuthenticAMD", {"avx512_bf16": False, "amx_bf16": False}, False),  # Zen 3: AVX2 only
])
def test_auto_precision_on_a_cpu_is_bf16_on_the_kinds_where_it_trains_faster(monkeypatch, vendor, flags, bf16):
    info = {"cpu": "test", "vendor": vendor, "threads": 2, **flags}
    assert cpu_trains_bf16_faster(info) is bf16
    monkeypatch.setattr(device, "cpu_info", lambda: info)
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if bf16 else None)
    assert autocast_dtype("none", torch.device("cpu")) is None


@pytest.fixture
def gpu_box(monkeypatch, tmp_path):
    """A machine whose torch sees no GPU, with nvidia-smi reporting `driver` (None: no driver)."""
    def with_driver(driver: str | None, torch_cuda: str | None) -> None:
        monkeypatch.delenv("SEGSTUDY_NVIDIA_SMI", raising=False)
        monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path, driver)}:{os.environ['PATH']}")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    return with_driver


def _no_cuda(name: str = "cuda") -> str:
    with pytest.raises(UserError) as caught:
        resolve_device(name)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"device = '{name}' but torch can use no CUDA GPU: ")
    return message


def test_a_cuda_build_newer_than_the_driver_names_both_and_the_build_to_install(gpu_box, tmp_path):
    gpu_box("570.86.15", "13.0")
    message = _no_cuda()
    assert "is built for CUDA 13.0, which needs NVIDIA driver >= 580, and this one is 570.86.15" in message
    command = re.search(r"from the repository root: (SEGSTUDY_TORCH=cu126 \./scripts/setup_env\.sh) ", message)[1]
    venv, log = fake_venv(tmp_path, "default")  # the advice as typed: it swaps the build
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "SEGSTUDY_TORCH")}
    env |= {"SEGSTUDY_VENV": str(venv), "SEGSTUDY_TORCH_INDEX_URL": "http://127.0.0.1:9/whl"}
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "/whl/cu126 torch==2.14.1" in log.read_text() and (venv / ".segstudy-installed").read_text() == "cu126\n"


def test_a_cpu_build_on_a_gpu_machine_names_the_build_for_its_driver(gpu_box):
    gpu_box("580.95.05", None)
    message = _no_cuda("cuda:1")
    assert f"torch {torch.__version__} is a CPU build, and this machine has NVIDIA driver 580.95.05" in message
    assert "SEGSTUDY_TORCH=default ./scripts/setup_env.sh" in message


def test_a_driver_too_old_for_every_build_is_told_to_update(gpu_box):
    gpu_box("470.82.01", "13.0")
    assert "update the driver to >= 525.60.13, then reinstall" in _no_cuda()


def test_no_driver_and_hidden_gpus_are_told_apart(gpu_box, monkeypatch):
    gpu_box(None, "13.0")
    assert "nvidia-smi reports no NVIDIA driver or GPU here (in Docker: docker run --gpus all)" in _no_cuda()
    gpu_box("580.95.05", "13.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "runs this torch's CUDA 13.0, yet torch finds no GPU (CUDA_VISIBLE_DEVICES='')" in _no_cuda()
