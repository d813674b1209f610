from __future__ import annotations

import ast
import dataclasses
import re
import typing

import pytest
import yaml

from segstudy import config
from segstudy.config import CHOICES, RANGES, Config
from segstudy.config_paths import PROJECT_ROOT
from segstudy.config_profiles import available_profiles, derive, load_config, parse_overrides
from segstudy.errors import UserError

PACKAGE = PROJECT_ROOT / "lib" / "segstudy"


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
    with pytest.raises(UserError, match="^--set/overrides: unknown key 'nonsense'"):  # not smoke.yaml's
        load_config("smoke", {"nonsense": 1})
    for retired in ("prune.target_loss", "quant.max_loss"):  # removed 2026-12-07 (docs/changes.md)
        with pytest.raises(UserError, match=rf"^--set/overrides: '{retired}' is no longer a key: report.keep_loss "
                                            r"holds that threshold now; set that instead"):
            load_config("smoke", {retired: 2.0})
    old = tmp_path / "old.yaml"
    old.write_text("extends: smoke\nquant:\n  max_loss: 0.5\n")
    with pytest.raises(UserError, match=rf"^{old}: 'quant.max_loss' is no longer a key"):
        load_config(old)


def test_wrong_type_and_missing_env(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="'data.batch_size' = 'eight' must be of type int"):
        load_config("smoke", {"data.batch_size": "eight"})
    monkeypatch.delenv("CITYSCAPES_ROOT", raising=False)
    with pytest.raises(UserError, match="CITYSCAPES_ROOT, which is not set"):
        load_config("full")


# --- choices and ranges, checked at load (the issue's cases first) ------------------------------

@pytest.mark.parametrize("override, message", [
    ("loss_study.names=[ce, diec]", r"loss_study.names = \['ce', 'diec'\]: 'diec' is unknown; "
                                    r"choose one of ce, wce, dice, ce_dice, focal, lovasz; set by --set"),
    ("prune.ratio=1.5", r"prune.ratio = 1.5 must be in \[0, 1\)"),
    ("train.lr=-1", r"train.lr = -1.0 must be > 0"),
    ("data.batch_size=0", r"data.batch_size = 0 must be >= 1"),
    ("data.crop_size=[0,0]", r"data.crop_size = \[0, 0\]: 0 must be >= 1"),
])
def test_issue_values_fail_at_load_naming_key_value_and_valid_ones(override, message):
    with pytest.raises(UserError, match=message):
        load_config("smoke", [override])


def test_malformed_set_value_names_the_key_and_the_fix():
    with pytest.raises(UserError, match=r"--set train.epochs=\[1: '\[1' is not a valid value .*"
                                        r"write it like train.epochs=10, close any \["):
        load_config("smoke", ["train.epochs=[1"])
    with pytest.raises(UserError, match=r"write it like data.crop_size=\[128, 256\]"):
        parse_overrides(["data.crop_size=[64, 128"])  # what `segstudy run` parses before anything runs


def test_scientific_notation_is_a_float(tmp_path):
    cfg = load_config("smoke", ["train.lr=1e-4", "prune.layer_ratios={head: 5e-1}"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.prune.layer_ratios == {"head": 0.5}
    assert yaml.safe_load("1e-4") == "1e-4"  # YAML 1.1: why the loader converts it
    profile = tmp_path / "sci.yaml"
    profile.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-5\nprune:\n  sparsities: [5e-1, 0.7]\n"
                       "tracking:\n  experiment: 1e-4\n")
    cfg = load_config(profile)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.prune.sparsities) == (1e-4, 5e-5, [0.5, 0.7])
    assert cfg.tracking.experiment == "1e-4"  # text fields stay text
    with pytest.raises(UserError, match="'train.epochs' = '1e3' must be of type int"):
        load_config("smoke", ["train.epochs=1e3"])


def test_message_says_which_file_the_value_came_from(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("model:\n  name: unett\n")
    with pytest.raises(UserError, match=rf"model.name = 'unett' is unknown; choose one of unet, deeplabv3_resnet50, "
                                        rf"custom; set in {re.escape(str(profile))}"):
        load_config(profile)


@pytest.mark.parametrize("override, message", [
    ("device=gpu", "device = 'gpu' is unknown; choose one of auto, cpu, cuda, cuda:N"),
    ("model.pretrained=maybe", "model.pretrained = 'maybe' is unknown; choose one of auto, true, false"),
    ("model.output_stride=12", "model.output_stride = 12 is unknown; choose one of 8, 16, 32"),
    (["model.name=deeplabv3_resnet50", "model.output_stride=32"], "which uses 8 or 16"),
    ("data.scale_range=[2, 1]", r"min <= max"),
    ("data.crop_size=[64]", r"data.crop_size = \[64\] must have 2 items: \[height, width\]"),
    ("quant.calib_sweep=[]", "must have at least one item"),
    ("loss_study.seeds=[]", "must have at least one item"),
    ("train.lr=.nan", "train.lr = nan must be > 0"),
    ("prune.layer_ratios={head: 1.0}", r"prune.layer_ratios.head = 1.0 must be in \[0, 1\)"),
    ("quant.other_models=[segformer]", "quant.other_models = .* 'segformer' is unknown; choose one of unet"),
])
def test_other_invalid_values(override, message):
    with pytest.raises(UserError, match=message):
        load_config("smoke", override if isinstance(override, list) else [override])


def test_valid_edge_values_load():
    cfg = load_config("smoke", ["device=cuda:1", "model.pretrained=auto", "prune.ratio=0", "data.hflip=1",
                                "loss_study.epochs=0", "quant.threads=0", "model.head_layers=0"])
    assert cfg.device == "cuda:1" and cfg.prune.ratio == 0.0
    derive(Config(), {})  # the defaults are valid


def _outside(valid: config.Range) -> float:
    if valid.high is not None:
        return valid.high + (0 if valid.high_open else 1)
    return valid.low - (0 if valid.low_open else 1)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_rejects_a_value_outside_it(key):
    bad = _outside(RANGES[key])
    value = {list: [bad], dict: {"head": bad}}.get(type(_default(key)), bad)
    with pytest.raises(UserError, match=rf"{re.escape(key)}.* must be {re.escape(str(RANGES[key]))}; set by --set"):
        load_config("smoke", {key: value})


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_rejects_an_unknown_value(key):
    bad = 12 if isinstance(CHOICES[key][0], int) else "nope"
    value = [bad] if isinstance(_default(key), list) else bad
    with pytest.raises(UserError, match=rf"{re.escape(key)} = .* is unknown; choose one of "
                                        rf"{re.escape(', '.join(map(str, CHOICES[key])))}"):
        load_config("smoke", {key: value})


def _default(key: str):
    node = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _leaf_fields(cls: type = Config, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


FREE_TEXT = {"profile", "output_root", "data.root", "data.train_split", "data.val_split", "tracking.experiment",
             "tracking.uri", "tracking.sweep", "model.weights_dir", "cross.cityscapes.root", "cross.bdd100k.root",
             "cross.nuimages.root"}
# a pattern / the YAML booleans / set by load_config / distributions checked by the tune section's Check
SPECIAL = {"device", "model.pretrained", "overrides", "profile_roots", "tune.space"}


def test_every_parameter_has_a_rule():
    leaves = dict(_leaf_fields())
    assert set(CHOICES) | set(RANGES) | set(config.LENGTHS) | FREE_TEXT | SPECIAL <= set(leaves)  # no stale rule
    for key, hint in leaves.items():
        numeric = hint in (int, float) or typing.get_args(hint)[-1:] in ((int,), (float,))
        if numeric:
            assert key in RANGES or key in CHOICES, f"{key} has no range in RANGES"
        elif hint is not bool:
            assert key in CHOICES or key in FREE_TEXT | SPECIAL, f"{key} has no choices in CHOICES"


def _string_literals(module: str) -> set:
    return {n.value for n in ast.walk(ast.parse((PACKAGE / module).read_text())) if isinstance(n, ast.Constant)}


def test_every_choice_has_its_implementation():
    """The choice lists live in config only; the modules import them. What a module maps each choice
    to (a reader, a dilation) or spells out in its code must cover every choice."""
    from segstudy.data.datasets import DATASETS as READERS
    from segstudy.models.networks import _DILATION

    assert tuple(READERS) == config.DATASETS and tuple(_DILATION) == config.OUTPUT_STRIDES
    # choices a module spells out in its code rather than in a tuple: each must be handled there
    for module, choices in [("engine/optimization.py", config.OPTIMIZERS), ("engine/device.py", config.AMP_MODES),
                            ("compress/prune.py", config.PRUNE_SCOPES), ("tracking.py", config.TRACKING_BACKENDS),
                            ("studies/int8_choice.py", config.QAT_MODES),
                            ("models/networks.py", config.PRETRAINED)]:
        assert set(choices) <= _string_literals(module), (module, choices)


def test_a_child_profile_s_tune_space_replaces_the_parent_s_whole(tmp_path):
    """One rule for tune.space (config_profiles.REPLACED_WHOLE): a child profile's space is the space searched,
    as `--set tune.space=...` makes it; every other section still merges key by key."""
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {PROJECT_ROOT / 'params' / 'smoke.yaml'}\n"
                     "train: {epochs: 3}\n"
                     "tune:\n  epochs: 1\n  space:\n"
                     "    data.batch_size: {type: int, low: 2, high: 4, step: 2}\n"
                     "    train.lr: {type: categorical, choices: [0.01, 0.1]}\n")
    cfg = load_config(child)
    assert cfg.tune.space == {"data.batch_size": {"type": "int", "low": 2, "high": 4, "step": 2},
                              "train.lr": {"type": "categorical", "choices": [0.01, 0.1]}}
    assert (cfg.tune.epochs, cfg.tune.model, cfg.train.epochs, cfg.train.lr) == (1, "unet", 3, 0.01)  # merged


def test_set_tune_space_replaces_the_whole_space():
    space = {"data.batch_size": {"type": "int", "low": 2, "high": 4}}
    assert load_config("smoke", {"tune.space": space}).tune.space == space
    assert load_config("smoke", ["tune.space={data.batch_size: {type: int, low: 2, high: 4}}"]).tune.space == space


def test_a_derived_config_is_checked_like_a_loaded_one():
    """config_profiles.derive: the one way a study changes a loaded config (a loss-study run, a tuning trial)."""
    cfg = load_config("smoke", {"train.lr": 0.05})
    run = derive(cfg, {"train.epochs": 3, "loss.name": "dice"})
    assert (run.train.epochs, run.loss.name, run.train.lr, run.data.root) == (3, "dice", 0.05, cfg.data.root)
    assert run.overrides == cfg.overrides and cfg.train.epochs == 2  # cfg itself unchanged
    with pytest.raises(UserError, match=r"train.epochs = 0 must be >= 1; derived \(train.epochs\)"):
        derive(cfg, {"train.epochs": 0})
    with pytest.raises(UserError, match="loss.name"):
        derive(cfg, {"loss.name": "hinge"})
