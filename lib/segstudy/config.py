"""Parameters flow one way: a YAML profile in params/ -> one typed `Config` -> functions.

A profile is `params/<name>.yaml` (or any YAML path); `extends: <profile>` starts from another
profile's keys. Relative paths inside it are relative to the YAML file's own folder. `${VAR}` is
expanded from the environment. Everything is checked at load, before any work: an unknown key, a
wrong type, a value outside its choices (CHOICES) or range (RANGES) is an error naming the key, the
value and what is valid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segstudy.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PARAMS_DIR = Path(os.environ.get("SEGSTUDY_PARAMS_DIR", PROJECT_ROOT / "params"))

# The valid choices. config is the lowest layer and imports none of the modules that act on them;
# where such a module keeps its own tuple, tests/test_config.py checks that the two agree.
DATASETS = ("cityscapes", "bdd100k")  # data/datasets.py
MODELS = ("unet", "deeplabv3_resnet50", "custom")  # models/networks.py
OUTPUT_STRIDES = (8, 16, 32)  # models/networks.py (DeepLabV3: 8 or 16)
PRETRAINED = ("auto", "true", "false")  # models/networks.py
OPTIMIZERS = ("sgd", "adamw")  # engine/optimization.py
AMP_MODES = ("auto", "none", "bf16", "fp16")  # engine/device.py
LOSSES = ("ce", "wce", "dice", "ce_dice", "focal", "lovasz")  # models/losses.py
WEIGHTINGS = ("inverse", "median", "enet")  # models/losses.py
PRUNE_SCOPES = ("layerwise", "global", "lamp")  # compress/prune.py
IMPORTANCES = ("l1", "group_norm", "taylor", "random")  # compress/prune.py
TRACKING_BACKENDS = ("mlflow", "wandb", "none")  # tracking.py
OBSERVERS = ("histogram", "minmax")  # compress/quantize.py
ORT_ACTIVATIONS = ("uint8", "int8")  # compress/onnx_export.py
QAT_MODES = ("auto", "always", "never")  # studies/quantization.py
DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # engine/device.py


def _path(default: str) -> Any:
    return field(default=default, metadata={"path": True})


@dataclass
class SynthConfig:
    """The generated Cityscapes-layout dataset (`segstudy synth`)."""

    train: int = 120
    val: int = 30
    height: int = 256
    width: int = 512
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "cityscapes"  # cityscapes | bdd100k
    root: str = _path("../outputs/data/synth-demo")
    generate: bool = True  # when `root` does not exist, write the synthetic dataset there
    train_split: str = "train"
    val_split: str = "val"
    base_size: int = 128  # shorter image side for evaluation; training scales around it
    crop_size: list[int] = field(default_factory=lambda: [128, 256])  # (h, w) training crop
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: float = 0.5
    color_jitter: float = 0.2
    batch_size: int = 8
    num_workers: int = 1
    max_images: int = 0  # 0: every image of a split; N: the first N (quick experiments)
    cache_mb: int = 0  # decoded images kept in memory per process (0: decode every time)


@dataclass
class ExploreConfig:
    """Notebook 00."""

    grid_images: int = 6
    max_images: int = 0  # 0: statistics over the whole split


@dataclass
class ModelConfig:
    name: str = "custom"  # unet | deeplabv3_resnet50 | custom
    pretrained: str | bool = "auto"  # auto | true | false (ImageNet ResNet-50 backbone)
    output_stride: int = 16  # 8 | 16 (| 32 for custom)
    aux_loss: bool = False  # DeepLabV3 auxiliary FCN head on layer3
    unet_base: int = 64  # U-Net first-level width (64 in the paper)
    head_channels: int = 256  # custom: width of the conv-BN-ReLU head
    head_layers: int = 2  # custom: number of conv-BN-ReLU layers
    # a folder holding torchvision's resnet50-0676ba61.pth, for boxes without network; empty: the
    # torch hub cache, else a download
    weights_dir: str = _path("")


@dataclass
class TrainConfig:
    epochs: int = 10
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 0  # linear warm-up, then poly decay, stepped every iteration
    poly_power: float = 0.9
    aux_weight: float = 0.5
    amp: str = "none"  # auto | none | bf16 | fp16 (fp16 only on CUDA; auto: bf16 where native)
    channels_last: bool = False
    grad_accum: int = 1
    compile: bool = False
    val_every: int = 1  # epochs
    reuse: bool = True  # a finished run's checkpoint is reused instead of training again
    max_steps: int = 0  # stop after this many optimiser steps in total, validated and usable (0: no limit)
    checkpoint_every: int = 0  # also save the resumable state every N optimiser steps (0: at each epoch's end)
    gpus: int = 1  # > 1: each training runs under torchrun DDP on that many GPUs (same global batch)


@dataclass
class LossConfig:
    name: str = "ce"  # ce | wce | dice | ce_dice | focal | lovasz
    weighting: str = "median"  # wce: inverse | median | enet
    dice_smooth: float = 1.0
    ce_weight: float = 1.0  # ce_dice
    dice_weight: float = 1.0  # ce_dice
    focal_gamma: float = 2.0


@dataclass
class CompareConfig:
    """Notebooks 01 and 02: the models each trains under one schedule (and `segstudy plan` counts)."""

    baselines: list[str] = field(default_factory=lambda: ["unet", "deeplabv3_resnet50"])  # notebook 01
    custom: list[str] = field(default_factory=lambda: ["custom"])  # notebook 02


@dataclass
class LossStudyConfig:
    """Notebook 03: every loss x every seed, one schedule."""

    names: list[str] = field(default_factory=lambda: ["ce", "wce", "dice", "ce_dice"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # shifted by `seed` (loss_comparison.run_seeds)
    epochs: int = 0  # 0: train.epochs
    model: str = "custom"  # the model every loss trains (the demo takes the cheap U-Net to afford 3 seeds)


@dataclass
class PruneConfig:
    """Notebook 04: pruning the trained custom model, then recovering its accuracy."""

    sparsities: list[float] = field(default_factory=lambda: [0.3, 0.55, 0.7, 0.9])  # unstructured levels
    scopes: list[str] = field(default_factory=lambda: ["layerwise", "global", "lamp"])
    finetune_sparsity: float = 0.55  # the unstructured level that is also fine-tuned (masks kept)
    finetune_scopes: list[str] = field(default_factory=lambda: ["layerwise", "lamp"])
    unstructured_epochs: float = 1.0
    # the masked model keeps the dense solution: a gentle lr keeps it (1e-3 lost 2 points in the demo)
    unstructured_lr: float = 0.0001
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.5])  # structured channel ratios
    importances: list[str] = field(default_factory=lambda: ["l1", "group_norm", "taylor"])
    importance: str = "group_norm"  # the one used for the ratio sweep and the recovery
    layer_ratios: dict[str, float] = field(default_factory=dict)  # per-module overrides, e.g. head: 0.6
    ratio: float = 0.35  # the structured ratio that is fine-tuned (plain and with KD) and saved
    steps: int = 1  # iterative pruning: prune ratio/steps, fine-tune, repeat
    epochs: float = 4.0  # fine-tune epochs in total (split over the steps)
    lr: float = 0.001
    kd_weight: float = 0.7  # share of the distillation term in the loss
    kd_temperature: float = 2.0
    # notebook 04's targets for the recovered structured model and the fine-tuned unstructured level
    target_speedup: float = 2.0  # at least this many times faster than dense
    target_loss: float = 2.0  # at most this many mIoU points lost
    target_kept: float = 0.95  # unstructured: this share of dense mIoU kept


@dataclass
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | wandb | none
    experiment: str = "segstudy"
    uri: str = ""  # MLflow tracking URI; empty: sqlite:///<output_root>/mlflow.db
    log_model: bool = True  # log the final model as an MLflow model
    register: bool = True  # and register it in the MLflow model registry
    # log a request example with every logged model; MLflow then serves it once to check it (a
    # forward pass at data.base_size, 3-19 s at 1024 on 2 cores), and only warns when that fails
    input_example: bool = True
    sweep: str = ""  # set by `segstudy sweep`: every run of a sweep carries this tag


@dataclass
class BenchConfig:
    """Batch-1 latency: every model at height x width, `iters` timings after `warmup` runs."""

    height: int = 512
    width: int = 1024
    warmup: int = 2
    iters: int = 5
    # timings per model when it is timed in turn with the dense model for a speed-up verdict: one
    # forward pass varies by about +-8% on a 2-core VM: 5 left a 0.92-1.17x interval around a 1.03x
    # speed-up, across the verdict's 1.1x bar; 15 narrow it about 1.7x (docs/results.md)
    speedup_iters: int = 15


@dataclass
class QuantConfig:
    """Notebook 05: int8 post-training quantization (torch FX, ONNX Runtime), QAT, bf16."""

    calib_images: int = 32  # N training images (eval transforms) that set the int8 ranges
    calib_sweep: list[int] = field(default_factory=lambda: [2, 8, 32])  # mIoU vs N (nested subsets)
    observer: str = "histogram"  # FX activation observer: histogram (x86 default) | minmax
    ort_activation: str = "uint8"  # ONNX Runtime activations: uint8 (fast path on x86) | int8
    qat: str = "auto"  # auto: only when PTQ loses more than max_loss points | always | never
    max_loss: float = 1.0  # mIoU points PTQ may lose before QAT runs (auto)
    qat_epochs: float = 0.25  # QAT fine-tune length in epochs (fractions allowed)
    qat_lr: float = 0.0  # 0: train.lr / 10
    threads: int = 2  # torch and ONNX Runtime threads for every measurement (0: torch's default)
    compare_images: int = 4  # validation images for the logits / argmax agreement checks
    other_models: list[str] = field(default_factory=lambda: ["deeplabv3_resnet50"])  # also PTQ'd (notebook 01's)


@dataclass
class ReportConfig:
    """The thresholds of the report's verdicts (notebook 06)."""

    # "keeps accuracy": the whole interval of the mIoU change (points) lies above -keep_loss
    keep_loss: float = 1.0
    # the recommendation: the fastest model whose mIoU interval reaches within `tolerance` points of
    # the lower end of the most accurate model's interval
    tolerance: float = 1.0
    # "buys speed": the whole speed-up interval above this; timing noise alone moves a ratio by a few %
    speed_floor: float = 1.1


@dataclass
class Config:
    profile: str = "demo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    output_root: str = _path("../outputs")
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    loss_study: LossStudyConfig = field(default_factory=LossStudyConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    overrides: dict[str, Any] = field(default_factory=dict)  # set by load_config: what --set changed

    @property
    def output_dir(self) -> Path:
        """outputs/<profile>/: everything this profile's run writes."""
        return Path(self.output_root) / self.profile

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def resolve_profile(profile: str | os.PathLike) -> Path:
    """A profile name (`demo`) or a path to a YAML file -> the YAML file."""
    text = str(profile)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise UserError(f"params file {path} does not exist; pass a profile name "
                            f"({', '.join(available_profiles())}) or an existing YAML file")
        return path
    path = PARAMS_DIR / f"{text}.yaml"
    if not path.is_file():
        raise UserError(f"unknown profile '{text}': there is no {path}; "
                        f"available profiles: {', '.join(available_profiles())}")
    return path


def load_config(profile: str | os.PathLike = "demo",
                overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load a profile and apply overrides (`{"data.root": "/x"}` or `["data.root=/x"]`)."""
    path = resolve_profile(profile)
    raw = _read_profile(path)
    raw.setdefault("profile", path.stem)
    parsed = _parse_overrides(overrides)
    for key, value in parsed.items():
        _set_dotted(raw, key, value, path)
    cfg = _build(Config, raw, path, prefix="")
    validate(cfg, _origin(path, set(parsed)))
    _resolve_paths(cfg, base=path.parent.resolve())
    cfg.overrides = parsed
    return cfg


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def _read_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The profile's keys over those of the profile it `extends` (a name in params/ or a YAML path
    relative to it), so a variant such as rehearsal.yaml states only what it changes. Relative paths
    in the merged keys are then read from the extending file's folder."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise UserError(f"{path}: 'extends' goes round in a circle ({chain}); remove one of them")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"{path}: 'extends' = {parent!r} must be a profile name such as full")
    base = path.parent / parent if parent.endswith((".yaml", ".yml")) else parent
    try:
        parent_path = resolve_profile(base)
    except UserError as exc:
        raise UserError(f"{path}: extends '{parent}', but {exc}") from None
    return _merge(_read_profile(parent_path, (*seen, path.resolve())), raw)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def _parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value, e.g. data.batch_size=4")
        key, value = item.split("=", 1)
        parsed[key.strip()] = _parse_value(key.strip(), value)
    return parsed


def _parse_value(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"--set {key}={text}: {text!r} is not a valid value ({problem}); write it like "
                        f"{key}={_example(key)}, close any [ or {{, and quote text holding : # [ ] {{ }}") from None


def _example(key: str) -> str:
    """The default of a dotted key as YAML (`[128, 256]`), to show how a value is written."""
    try:
        value = functools.reduce(getattr, key.split("."), Config())
    except AttributeError:
        return "VALUE"
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def _set_dotted(raw: dict, key: str, value: Any, path: Path) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{key}': '{part}' in {path} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: dict, path: Path, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise UserError(f"{path}: unknown key '{prefix}{unknown[0]}'; valid keys at {where}: "
                        f"{', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{path}: '{prefix}{name}' must be a section (a mapping)")
            kwargs[name] = _build(hint, value, path, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{prefix}{name}", path)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, key: str, path: Path) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _check_type(value, option, key, path)
            except UserError:
                continue
        raise UserError(f"{path}: '{key}' = {value!r} must be one of {hint}")
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"{path}: '{key}' = {value!r} must be a list of {item_type.__name__}")
        return [_check_type(v, item_type, key, path) for v in value]
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise UserError(f"{path}: '{key}' = {value!r} must be a mapping of {key_type.__name__} to "
                            f"{value_type.__name__}")
        return {_check_type(k, key_type, key, path): _check_type(v, value_type, f"{key}.{k}", path)
                for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot, no exponent sign) as a string
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise UserError(f"{path}: '{key}' = {value!r} must be of type {hint.__name__}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_UNSET_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def _resolve_paths(obj: Any, base: Path) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _resolve_paths(value, base)
        elif f.metadata.get("path") and isinstance(value, str) and value:  # empty: unused, not the folder
            expanded = os.path.expandvars(value)
            missing = _UNSET_VAR.search(expanded)
            if missing:
                raise UserError(f"'{f.name}' = {value!r} uses the environment variable "
                                f"{missing.group(1)}, which is not set; export it "
                                f"(e.g. export {missing.group(1)}=/data/cityscapes)")
            setattr(obj, f.name, str((base / Path(expanded).expanduser()).resolve()))


# --- choices and ranges, checked at load -------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """Numbers from `low` (to `high`; None: no upper bound), each end closed unless marked open."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        above = value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                    f"{')' if self.high_open else ']'}")
        return f"{text} ({self.note})" if self.note else text


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
PROBABILITY = Range(0, 1)
SHARE = Range(0, 1, high_open=True, note="the fraction removed: 0.35 removes 35%")
SEED = Range(0, 2**32 - 1)  # numpy's seed range

# A list's items and a mapping's values are each checked.
CHOICES: dict[str, tuple] = {
    "data.dataset": DATASETS,
    "model.name": MODELS,
    "model.output_stride": OUTPUT_STRIDES,
    "train.optimizer": OPTIMIZERS,
    "train.amp": AMP_MODES,
    "loss.name": LOSSES,
    "loss.weighting": WEIGHTINGS,
    "loss_study.names": LOSSES,
    "loss_study.model": MODELS,
    "compare.baselines": MODELS,
    "compare.custom": MODELS,
    "prune.scopes": PRUNE_SCOPES,
    "prune.finetune_scopes": PRUNE_SCOPES,
    "prune.importances": IMPORTANCES,
    "prune.importance": IMPORTANCES,
    "tracking.backend": TRACKING_BACKENDS,
    "quant.observer": OBSERVERS,
    "quant.ort_activation": ORT_ACTIVATIONS,
    "quant.qat": QAT_MODES,
    "quant.other_models": MODELS,
}

RANGES: dict[str, Range] = {
    "seed": SEED,
    "data.base_size": AT_LEAST_ONE,
    "data.crop_size": AT_LEAST_ONE,
    "data.scale_range": POSITIVE,
    "data.hflip": PROBABILITY,
    "data.color_jitter": NON_NEGATIVE,
    "data.batch_size": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "data.cache_mb": NON_NEGATIVE,
    "data.max_images": Range(0, note="0: every image"),
    "synth.train": AT_LEAST_ONE,
    "synth.val": AT_LEAST_ONE,
    "synth.height": Range(32),
    "synth.width": Range(32),
    "synth.seed": SEED,
    "explore.grid_images": AT_LEAST_ONE,
    "explore.max_images": Range(0, note="0: the whole split"),
    "model.unet_base": AT_LEAST_ONE,
    "model.head_channels": AT_LEAST_ONE,
    "model.head_layers": NON_NEGATIVE,
    "train.epochs": AT_LEAST_ONE,
    "train.lr": POSITIVE,
    "train.momentum": Range(0, 1, high_open=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.warmup_iters": NON_NEGATIVE,
    "train.poly_power": NON_NEGATIVE,
    "train.aux_weight": NON_NEGATIVE,
    "train.grad_accum": AT_LEAST_ONE,
    "train.val_every": AT_LEAST_ONE,
    "train.max_steps": Range(0, note="0: no limit"),
    "train.checkpoint_every": Range(0, note="0: at each epoch's end"),
    "train.gpus": AT_LEAST_ONE,
    "loss.dice_smooth": NON_NEGATIVE,
    "loss.ce_weight": NON_NEGATIVE,
    "loss.dice_weight": NON_NEGATIVE,
    "loss.focal_gamma": NON_NEGATIVE,
    "loss_study.seeds": SEED,
    "loss_study.epochs": Range(0, note="0: train.epochs"),
    "prune.sparsities": SHARE,
    "prune.finetune_sparsity": SHARE,
    "prune.unstructured_epochs": Range(0, note="0: no fine-tune"),
    "prune.unstructured_lr": POSITIVE,
    "prune.ratios": SHARE,
    "prune.layer_ratios": SHARE,
    "prune.ratio": SHARE,
    "prune.steps": AT_LEAST_ONE,
    "prune.epochs": POSITIVE,
    "prune.lr": POSITIVE,
    "prune.kd_weight": PROBABILITY,
    "prune.kd_temperature": POSITIVE,
    "prune.target_speedup": POSITIVE,
    "prune.target_loss": NON_NEGATIVE,
    "prune.target_kept": PROBABILITY,
    "bench.height": AT_LEAST_ONE,
    "bench.width": AT_LEAST_ONE,
    "bench.warmup": NON_NEGATIVE,
    "bench.iters": AT_LEAST_ONE,
    "bench.speedup_iters": AT_LEAST_ONE,
    "quant.calib_images": AT_LEAST_ONE,
    "quant.calib_sweep": AT_LEAST_ONE,
    "quant.max_loss": NON_NEGATIVE,
    "quant.qat_epochs": POSITIVE,
    "quant.qat_lr": Range(0, note="0: train.lr / 10"),
    "quant.threads": Range(0, note="0: torch's default"),
    "quant.compare_images": AT_LEAST_ONE,
    "report.keep_loss": NON_NEGATIVE,
    "report.tolerance": NON_NEGATIVE,
    "report.speed_floor": Range(1, note="a ratio: 1.1 asks for at least 10% faster"),
}

# list keys -> (how many items, what they are); None: any number but at least one
LENGTHS: dict[str, tuple[int | None, str]] = {
    "data.crop_size": (2, "[height, width], e.g. [128, 256]"),
    "data.scale_range": (2, "[min, max], e.g. [0.5, 2.0]"),
    "loss_study.names": (None, f"losses from {', '.join(LOSSES)}"),
    "loss_study.seeds": (None, "seeds, e.g. [0, 1]"),
    "quant.calib_sweep": (None, "calibration image counts, e.g. [2, 8, 32]"),
    "compare.baselines": (None, f"models from {', '.join(MODELS)}"),
    "compare.custom": (None, f"models from {', '.join(MODELS)}"),
}

Where = Callable[[str], str]


def _origin(path: Path, overridden: set[str]) -> Where:
    """key -> where its value came from, for the messages."""
    def where(key: str) -> str:
        if any(key == k or key.startswith(f"{k}.") for k in overridden):
            return "set by --set/overrides"
        return f"set in {path}"
    return where


def validate(cfg: Config, where: Where = lambda key: "set in the config") -> None:
    """Every choice, range and list length, so a bad value fails at load and not minutes into a run."""
    for key, choices in CHOICES.items():
        for label, item in _members(key, _get(cfg, key)):
            if item not in choices:
                raise UserError(f"{label} is unknown; choose one of {', '.join(map(str, choices))}; {where(key)}")
    for key, valid in RANGES.items():
        for label, item in _members(key, _get(cfg, key)):
            if item not in valid:
                raise UserError(f"{label} must be {valid}; {where(key)}")
    for key, (count, what) in LENGTHS.items():
        value = _get(cfg, key)
        if (count is not None and len(value) != count) or not value:
            need = f"{count} items" if count else "at least one item"
            raise UserError(f"{key} = {value!r} must have {need}: {what}; {where(key)}")
    _check_special(cfg, where)


def _check_special(cfg: Config, where: Where) -> None:
    low, high = cfg.data.scale_range
    if low > high:
        raise UserError(f"data.scale_range = {cfg.data.scale_range!r} must be [min, max] with min <= max; "
                        f"{where('data.scale_range')}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise UserError(f"device = {cfg.device!r} is unknown; choose one of {', '.join(DEVICES)}; {where('device')}")
    if str(cfg.model.pretrained).lower() not in (*PRETRAINED, "yes", "no", "1", "0"):
        raise UserError(f"model.pretrained = {cfg.model.pretrained!r} is unknown; choose one of "
                        f"{', '.join(PRETRAINED)}; {where('model.pretrained')}")
    if cfg.model.name == "deeplabv3_resnet50" and cfg.model.output_stride not in (8, 16):
        raise UserError(f"model.output_stride = {cfg.model.output_stride} does not fit model.name = "
                        f"deeplabv3_resnet50, which uses 8 or 16; {where('model.output_stride')}")


def _get(cfg: Config, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _members(key: str, value: Any) -> list[tuple[str, Any]]:
    """(how a message names it, value) for a scalar, each item of a list, each value of a mapping."""
    if isinstance(value, list):
        return [(f"{key} = {value!r}: {item!r}", item) for item in value]
    if isinstance(value, dict):
        return [(f"{key}.{name} = {item!r}", item) for name, item in value.items()]
    return [(f"{key} = {value!r}", value)]
