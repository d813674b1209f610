from __future__ import annotations

import pytest

from segstudy.config import PROJECT_ROOT, available_profiles, load_config
from segstudy.errors import UserError


def test_profiles_load_into_typed_config(monkeypatch):
    monkeypatch.setenv("CITYSCAPES_ROOT", "/data/cityscapes")
    assert {"smoke", "demo", "full"} <= set(available_profiles())
    for name in ("smoke", "demo", "full"):
        cfg = load_config(name)
        assert cfg.profile == name
        assert isinstance(cfg.data.crop_size, list) and len(cfg.data.crop_size) == 2
    full = load_config("full")
    assert full.data.root == "/data/cityscapes" and full.data.crop_size == [512, 1024]
    demo = load_config("demo")
    assert demo.data.root == str(PROJECT_ROOT / "outputs" / "data" / "synth-demo")
    assert demo.output_dir == PROJECT_ROOT / "outputs" / "demo"


def test_overrides():
    cfg = load_config("smoke", {"data.batch_size": 3, "synth.train": 5})
    assert cfg.data.batch_size == 3 and cfg.synth.train == 5
    cfg = load_config("smoke", ["data.scale_range=[0.75, 1.5]", "seed=7"])
    assert cfg.data.scale_range == [0.75, 1.5] and cfg.seed == 7


def test_unknown_profile():
    with pytest.raises(UserError, match="unknown profile 'nope'.*available profiles: .*demo"):
        load_config("nope")


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  rooot: /x\n")
    with pytest.raises(UserError, match=r"unknown key 'data.rooot'; valid keys .* root"):
        load_config(bad)
    with pytest.raises(UserError, match="unknown key 'nonsense'"):
        load_config("smoke", {"nonsense": 1})


def test_wrong_type_and_missing_env(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="'data.batch_size' = 'eight' must be of type int"):
        load_config("smoke", {"data.batch_size": "eight"})
    monkeypatch.delenv("CITYSCAPES_ROOT", raising=False)
    with pytest.raises(UserError, match="CITYSCAPES_ROOT, which is not set"):
        load_config("full")
