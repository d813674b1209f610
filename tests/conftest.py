"""Shared fixtures: one tiny generated Cityscapes-layout dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segstudy.config import SynthConfig
from segstudy.synth import generate

os.environ.setdefault("MPLBACKEND", "Agg")
TINY = SynthConfig(train=8, val=6, height=64, width=128, seed=3)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth-tiny"
    generate(root, TINY, workers=1, progress=False)
    return root
