"""Shared fixtures: one tiny generated Cityscapes-layout dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from segstudy.config import SynthConfig
from segstudy.data.synthetic.dataset import generate

os.environ.setdefault("MPLBACKEND", "Agg")
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # ./run_tests.sh runs one pytest-xdist worker per logical CPU: each worker's torch, and the processes it
    # starts, take their share of the cores instead of all of them (oversubscribed threads spin-wait)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # imported above, before the variable was set
TINY = SynthConfig(train=8, val=6, height=64, width=128, seed=3)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth-tiny"
    generate(root, TINY, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory, tiny_root) -> dict:
    """One custom model trained for an epoch on the tiny data (predict and serving tests).

    Returns train()'s result with "cfg", the smoke config it was trained with."""
    from segstudy.config_profiles import load_config
    from segstudy.engine.training import train

    out = tmp_path_factory.mktemp("smoke-model")
    cfg = load_config("smoke", {"data.root": str(tiny_root), "data.generate": False, "output_root": str(out),
                                "train.epochs": 1})
    return train(cfg, progress=False) | {"cfg": cfg}


@pytest.fixture(autouse=True)
def _own_mlflow_tracking_uri():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which every later subprocess of the
    test session would inherit (and segstudy honours: tracking.mlflow_uri), whichever fixture or test
    called it: each test starts without another's database."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
