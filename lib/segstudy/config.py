"""The typed `Config` a profile becomes (config_profiles.load_config): its sections, each field with its
default and its rules, and the valid choices.

Each field declares its rules with its type; pydantic checks them at load (config_schema.py): a value
outside its choices (CHOICES) or range (RANGES) is an error naming the key, the value and what is valid.
A path field (config_paths.path_field) is resolved against the profile file's folder.
"""

from __future__ import annotations

import dataclasses
import decimal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from segstudy import config_schema as schema
from segstudy.config_paths import path_field
from segstudy.config_schema import Check, Choice, Float, Length, MinMax, Range, Section, Spelled

# The valid choices, defined here only: config is the lowest layer, and the modules that act on them
# import them from here (the comment names the module).
DATASETS = ("cityscapes", "bdd100k", "nuimages")  # data/datasets.py
SAMPLINGS = ("equal", "proportional")  # data/datasets.py (a training on several datasets)
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
DISTRIBUTIONS = ("float", "log_float", "int", "categorical")  # studies/tuning.py
PRUNERS = ("median", "hyperband", "none")  # studies/tuning.py


def _list(*items: Any) -> Any:
    return field(default_factory=lambda: list(items))


# Each field declares its rules with its type (config_schema.py); CHOICES, RANGES and LENGTHS are read from them.
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
PROBABILITY = Range(0, 1)
SHARE = Range(0, 1, high_open=True, note="the fraction removed: 0.35 removes 35%")
SEED = Range(0, 2**32 - 1)  # numpy's seed range
YAML_BOOLEAN = Spelled(f"(?i){'|'.join((*PRETRAINED, 'yes', 'no', '1', '0'))}", PRETRAINED)
Count = Annotated[int, AT_LEAST_ONE]
Natural = Annotated[int, NON_NEGATIVE]
Seeds = Annotated[list[int], SEED, Length(None, "seeds, e.g. [0, 1]")]
Models = Annotated[list[str], Choice(MODELS), Length(None, f"models from {', '.join(MODELS)}")]
Losses = Annotated[list[str], Choice(LOSSES), Length(None, f"losses from {', '.join(LOSSES)}")]


@dataclass
class SynthConfig(Section):
    """The generated Cityscapes-layout dataset (`segstudy synth`)."""

    train: Count = 120
    val: Count = 30
    height: Annotated[int, Range(32)] = 256
    width: Annotated[int, Range(32)] = 512
    seed: Annotated[int, SEED] = 0


@dataclass
class DataConfig(Section):
    dataset: Annotated[str, Choice(DATASETS)] = "cityscapes"
    root: str = path_field("../outputs/data/synth-demo")
    generate: bool = True  # when `root` does not exist, write the synthetic dataset there
    train_split: str = "train"
    val_split: str = "val"
    base_size: Count = 128  # shorter image side for evaluation; training scales around it
    crop_size: Annotated[list[int], AT_LEAST_ONE, Length(2, "[height, width], e.g. [128, 256]")] = _list(128, 256)
    scale_range: Annotated[list[Float], POSITIVE, Length(2, "[min, max], e.g. [0.5, 2.0]"), MinMax()] = _list(0.5, 2.0)
    hflip: Annotated[Float, PROBABILITY] = 0.5
    color_jitter: Annotated[Float, NON_NEGATIVE] = 0.2
    batch_size: Count = 8
    num_workers: Natural = 1
    max_images: Annotated[int, Range(0, note="0: every image")] = 0  # N: the first N (quick experiments)
    cache_mb: Natural = 0  # decoded images kept in memory per process (0: decode every time)
    # other datasets (cross.<name>) whose training images join this one's in a training's batches
    mix_with: Annotated[list[str], Choice(DATASETS)] = _list()
    sampling: Annotated[str, Choice(SAMPLINGS)] = "equal"  # equal: the same share of each dataset per epoch


@dataclass
class OtherDataset(Section):
    """One more dataset of the profile (cross.<reader name>): every model is scored on its val split."""

    root: str = path_field("", unset_later=True)  # empty: not part of this profile
    generate: bool = False  # when `root` does not exist, write the generated set of this layout there
    height: Natural = 0  # the generated images' size (0: synth's)
    width: Natural = 0
    train: Natural = 0  # generated images per split (0: synth's)
    val: Natural = 0


@dataclass
class CrossConfig(Section):
    """The cross-dataset study (notebook 02): the profile's other datasets, and the models also trained
    on the union of data.dataset's training set and those of `mix` (as many iterations as alone)."""

    cityscapes: OtherDataset = field(default_factory=OtherDataset)
    bdd100k: OtherDataset = field(default_factory=OtherDataset)
    nuimages: OtherDataset = field(default_factory=OtherDataset)
    mix: Annotated[list[str], Choice(DATASETS)] = _list()  # the datasets the mixed models add (the rest: held out)
    models: Annotated[list[str], Choice(MODELS)] = _list("custom")


@dataclass
class ExploreConfig(Section):
    """Notebook 00."""

    grid_images: Count = 6
    max_images: Annotated[int, Range(0, note="0: the whole split")] = 0  # images the statistics read


def _stride_fits(model: ModelConfig) -> str | None:
    if model.name == "deeplabv3_resnet50" and model.output_stride not in (8, 16):
        return f" = {model.output_stride} does not fit model.name = deeplabv3_resnet50, which uses 8 or 16"
    return None


@dataclass
class ModelConfig(Section):
    name: Annotated[str, Choice(MODELS)] = "custom"
    pretrained: Annotated[str | bool, YAML_BOOLEAN] = "auto"  # auto | true | false (ImageNet ResNet-50 backbone)
    output_stride: Annotated[int, Choice(OUTPUT_STRIDES)] = 16  # 8 | 16 (| 32 for custom)
    aux_loss: bool = False  # DeepLabV3 auxiliary FCN head on layer3
    unet_base: Count = 64  # U-Net first-level width (64 in the paper)
    head_channels: Count = 256  # custom: width of the conv-BN-ReLU head
    head_layers: Natural = 2  # custom: number of conv-BN-ReLU layers
    # a folder holding torchvision's resnet50-0676ba61.pth, for boxes without network; empty: the
    # torch hub cache, else a download
    weights_dir: str = path_field("")


@dataclass
class TrainConfig(Section):
    epochs: Count = 10
    optimizer: Annotated[str, Choice(OPTIMIZERS)] = "sgd"
    lr: Annotated[Float, POSITIVE] = 0.01
    momentum: Annotated[Float, Range(0, 1, high_open=True)] = 0.9
    weight_decay: Annotated[Float, NON_NEGATIVE] = 1e-4
    warmup_iters: Natural = 0  # linear warm-up, then poly decay, stepped every iteration
    poly_power: Annotated[Float, NON_NEGATIVE] = 0.9
    aux_weight: Annotated[Float, NON_NEGATIVE] = 0.5
    amp: Annotated[str, Choice(AMP_MODES)] = "none"  # fp16 only on CUDA; auto: bf16 where native
    channels_last: bool = False
    grad_accum: Count = 1
    compile: bool = False
    val_every: Count = 1  # epochs
    reuse: bool = True  # a finished run's checkpoint is reused instead of training again
    max_steps: Annotated[int, Range(0, note="0: no limit")] = 0  # stop after this many optimiser steps, validated
    checkpoint_every: Annotated[int, Range(0, note="0: at each epoch's end")] = 0  # save the resumable state every N
    gpus: Count = 1  # > 1: each training runs under torchrun DDP on that many GPUs (same global batch)


@dataclass
class LossConfig(Section):
    name: Annotated[str, Choice(LOSSES)] = "ce"
    weighting: Annotated[str, Choice(WEIGHTINGS)] = "median"  # wce
    dice_smooth: Annotated[Float, NON_NEGATIVE] = 1.0
    ce_weight: Annotated[Float, NON_NEGATIVE] = 1.0  # ce_dice
    dice_weight: Annotated[Float, NON_NEGATIVE] = 1.0  # ce_dice
    focal_gamma: Annotated[Float, NON_NEGATIVE] = 2.0


@dataclass
class CompareConfig(Section):
    """Notebooks 01 and 02: the models each trains under one schedule (and `segstudy plan` counts)."""

    baselines: Models = _list("unet", "deeplabv3_resnet50")  # notebook 01
    custom: Models = _list("custom")  # notebook 02


@dataclass
class LossStudyConfig(Section):
    """Notebook 03: every loss x every seed, one schedule."""

    names: Losses = _list("ce", "wce", "dice", "ce_dice")
    seeds: Seeds = _list(0, 1, 2)  # shifted by `seed` (loss_comparison.run_seeds)
    epochs: Annotated[int, Range(0, note="0: train.epochs")] = 0
    model: Annotated[str, Choice(MODELS)] = "custom"  # the model every loss trains (the demo: the cheap U-Net)


@dataclass
class PruneConfig(Section):
    """Notebook 04: pruning the trained custom model, then recovering its accuracy."""

    sparsities: Annotated[list[Float], SHARE] = _list(0.3, 0.55, 0.7, 0.9)  # unstructured levels
    scopes: Annotated[list[str], Choice(PRUNE_SCOPES)] = _list("layerwise", "global", "lamp")
    finetune_sparsity: Annotated[Float, SHARE] = 0.55  # the unstructured level that is also fine-tuned (masks kept)
    finetune_scopes: Annotated[list[str], Choice(PRUNE_SCOPES)] = _list("layerwise", "lamp")
    unstructured_epochs: Annotated[Float, Range(0, note="0: no fine-tune")] = 1.0
    # the masked model keeps the dense solution: a gentle lr keeps it (1e-3 lost 2 points in the demo)
    unstructured_lr: Annotated[Float, POSITIVE] = 0.0001
    ratios: Annotated[list[Float], SHARE] = _list(0.2, 0.4, 0.55)  # structured channel ratios
    importances: Annotated[list[str], Choice(IMPORTANCES)] = _list("l1", "group_norm", "taylor")
    importance: Annotated[str, Choice(IMPORTANCES)] = "group_norm"  # the one used for the ratio sweep and the recovery
    layer_ratios: Annotated[dict[str, Float], SHARE] = field(default_factory=dict)  # per-module, e.g. head: 0.6
    # the structured ratio that is fine-tuned (plain and with KD) and saved: the smallest of the demo's
    # ratios whose whole interval, timed in turn, lies above target_speedup in run after run
    # (docs/results.md, "What does pruning buy?")
    ratio: Annotated[Float, SHARE] = 0.55
    steps: Count = 1  # iterative pruning: prune ratio/steps, fine-tune, repeat
    epochs: Annotated[Float, POSITIVE] = 4.0  # fine-tune epochs in total (split over the steps)
    lr: Annotated[Float, POSITIVE] = 0.001
    kd_weight: Annotated[Float, PROBABILITY] = 0.7  # share of the distillation term in the loss
    kd_temperature: Annotated[Float, POSITIVE] = 2.0
    # notebook 04's targets for the recovered structured model (at most report.keep_loss mIoU points
    # lost) and the fine-tuned unstructured level
    target_speedup: Annotated[Float, POSITIVE] = 3.0  # at least this many times faster than dense
    target_kept: Annotated[Float, PROBABILITY] = 0.95  # unstructured: this share of dense mIoU kept


@dataclass
class TrackingConfig(Section):
    backend: Annotated[str, Choice(TRACKING_BACKENDS)] = "mlflow"
    experiment: str = "segstudy"
    uri: str = ""  # MLflow tracking URI; empty: sqlite:///<output_root>/mlflow.db
    log_model: bool = True  # log the final model as an MLflow model
    register: bool = True  # and register it in the MLflow model registry
    # log a request example with every logged model; MLflow then serves it once to check it (a
    # forward pass at data.base_size, 3-19 s at 1024 on 2 cores), and only warns when that fails
    input_example: bool = True
    sweep: str = ""  # set by `segstudy sweep`: every run of a sweep carries this tag


@dataclass
class BenchConfig(Section):
    """Batch-1 latency: every model at height x width, `iters` timings after `warmup` runs."""

    height: Count = 512
    width: Count = 1024
    warmup: Natural = 2
    iters: Count = 5
    # timings per model when it is timed in turn with the dense model for a speed-up verdict: one
    # forward pass varies by about +-8% on a 2-core VM: 5 left a 0.92-1.17x interval around a 1.03x
    # speed-up, across the verdict's 1.1x bar; 15 narrow it about 1.7x (docs/results.md)
    speedup_iters: Count = 15


@dataclass
class QuantConfig(Section):
    """Notebook 05: int8 post-training quantization (torch FX, ONNX Runtime), QAT, bf16."""

    calib_images: Count = 32  # N training images (eval transforms) that set the int8 ranges
    # mIoU vs N (nested subsets)
    calib_sweep: Annotated[list[int], AT_LEAST_ONE, Length(None, "calibration image counts, e.g. [2, 8, 32]")] = _list(
        2, 8, 32)
    observer: Annotated[str, Choice(OBSERVERS)] = "histogram"  # FX activation observer: histogram (x86 default)
    ort_activation: Annotated[str, Choice(ORT_ACTIVATIONS)] = "uint8"  # ONNX Runtime activations (uint8: x86 fast path)
    qat: Annotated[str, Choice(QAT_MODES)] = "auto"  # auto: only when PTQ loses more than report.keep_loss points
    qat_epochs: Annotated[Float, POSITIVE] = 0.25  # QAT fine-tune length in epochs (fractions allowed)
    qat_lr: Annotated[Float, Range(0, note="0: train.lr / 10")] = 0.0
    threads: Annotated[int, Range(0, note="0: torch's default")] = 2  # torch and ONNX Runtime, every measurement
    compare_images: Count = 4  # validation images for the logits / argmax agreement checks
    # val images every variant is scored on (studies.quantization.eval_subset): N evenly spread, the
    # same N for every row so the paired intervals hold; int8 and ONNX Runtime are scored on the CPU
    eval_images: Annotated[int, Range(0, note="0: the whole val split")] = 0
    other_models: Annotated[list[str], Choice(MODELS)] = _list("deeplabv3_resnet50")  # also PTQ'd (notebook 01's)


@dataclass
class ReportConfig(Section):
    """The thresholds of the report's verdicts (notebook 08)."""

    # "keeps accuracy": the whole interval of the mIoU change (points) lies above -keep_loss; also the
    # points an int8 form may lose to be deployed, and PTQ before QAT runs (quant.qat: auto)
    keep_loss: Annotated[Float, NON_NEGATIVE] = 1.0
    # the recommendation: the fastest model whose mIoU interval reaches within `tolerance` points of
    # the lower end of the most accurate model's interval
    tolerance: Annotated[Float, NON_NEGATIVE] = 1.0
    # "buys speed": the whole speed-up interval above this; timing noise alone moves a ratio by a few %
    speed_floor: Annotated[Float, Range(1, note="a ratio: 1.1 asks for at least 10% faster")] = 1.1


def _leaf_type(key: str) -> type | None:
    """The plain type of a dotted Config key (float for train.lr), or None when no such leaf exists."""
    cls: Any = Config
    for part in key.split("."):
        hints = schema._hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints or part in ("overrides", "profile_roots"):
            return None
        cls = hints[part]
    return None if dataclasses.is_dataclass(cls) else cls


def _space_problem(key: str, spec: dict) -> str | None:
    """What is wrong with one distribution of tune.space, after `.<key>`; None when it is usable."""
    kind, kinds = spec.get("type"), ", ".join(DISTRIBUTIONS)
    if kind not in DISTRIBUTIONS:
        return f".type = {kind!r} is unknown; choose one of {kinds}"
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "step"}
    if extra := sorted(set(spec) - allowed):
        return f": '{extra[0]}' is not a key of a {kind} distribution; use {', '.join(sorted(allowed))}"
    leaf = _leaf_type(key)
    if leaf is None:
        return " is not a config key; name one such as train.lr or data.batch_size"
    if kind == "categorical":
        choices = spec.get("choices")
        return None if isinstance(choices, list) and choices else " needs choices: a non-empty list, e.g. [sgd, adamw]"
    if leaf not in (int, float):
        return f" is not a number ({getattr(leaf, '__name__', leaf)}): use type: categorical with choices"
    if kind != "int" and leaf is int:
        return f" is an integer key: use type: int, not {kind}"
    low, high = (schema._yaml_float(spec.get(end)) for end in ("low", "high"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        return f" needs numbers low and high, e.g. {{type: {kind}, low: 1, high: 8}}"
    for end, value in (("low", low), ("high", high)):
        if kind == "int" and not isinstance(value, int):
            return f".{end} = {spec[end]} is not a whole number; an int distribution takes whole low, high and step"
    if low > high or (low == high and kind != "int"):
        return f": [{low}, {high}] is an empty range; make low < high"
    if kind == "log_float" and low <= 0:
        return f": low = {low} cannot be on a log scale; make it > 0 or use type: float"
    return _step_problem(kind, low, high, schema._yaml_float(spec.get("step")))


def _step_problem(kind: str, low: float, high: float, step: Any) -> str | None:
    """A distribution's step, checked here because Optuna refuses a bad one only when a trial samples it
    (after the study began), and moves `high` down to the last whole step with a mere warning."""
    if step is None:
        return None
    if kind == "log_float":
        return ": a log_float takes no step; remove step, or use type: float"
    whole = kind == "int"
    if isinstance(step, bool) or not isinstance(step, int if whole else (int, float)) or step <= 0:
        return f".step = {step!r} must be a {'whole ' if whole else ''}number > 0"
    # in decimal, as written in the YAML (binary floats would find a remainder in 0.3 / 0.1)
    span, size = decimal.Decimal(str(high)) - decimal.Decimal(str(low)), decimal.Decimal(str(step))
    if span and size > span:
        return f".step = {step} is wider than the range [{low}, {high}] (every trial would take {low}); " \
               f"make it at most {span}"
    if rest := span % size:
        last = decimal.Decimal(str(high)) - rest
        return f": [{low}, {high}] is not a whole number of steps of {step} ({high} is never sampled); " \
               f"make high {last.normalize():f} or {(last + size).normalize():f}"
    return None


def _space_fits(tune: TuneConfig) -> str | None:
    for key, spec in tune.space.items():
        if problem := _space_problem(key, spec):
            return f".{key}{problem}"
    return None


@dataclass
class TuneConfig(Section):
    """`segstudy tune` and notebook 06: an Optuna search over `space` (dotted config keys -> a
    distribution: {type: float | log_float | int, low, high[, step]} or {type: categorical, choices}). The
    objective: the best validation mIoU of `model` trained with the profile under a fixed budget (`epochs`,
    `max_steps`, `max_images`), validated after every epoch so the pruner can stop a poor trial early."""

    model: Annotated[str, Choice(MODELS)] = "unet"
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs: Count = 3  # each trial's train.epochs
    max_steps: Annotated[int, Range(0, note="0: the whole epochs")] = 0  # each trial's train.max_steps
    max_images: Annotated[int, Range(0, note="0: data.max_images")] = 0  # each trial's data.max_images
    trials: Count = 8  # notebook 06 runs the study until it holds this many finished trials
    pruner: Annotated[str, Choice(PRUNERS)] = "median"  # fed the validation mIoU after each validation
    startup_trials: Natural = 2  # trials finished before the pruner and TPE act (random sampling until then)
    warmup_epochs: Natural = 0  # validations of a trial the median pruner never prunes at
    heartbeat: Count = 60  # seconds; RDB storages fail a trial whose worker was silent for twice this
    retries: Natural = 2  # times a failed trial's parameters are tried again


@dataclass
class MonitoringConfig(Section):
    """The drift reference stored with every registered model (deploy/drift.py), the server's drift
    windows, and notebook 07."""

    reference_images: Annotated[int, Range(0, note="0: the whole val split")] = 64  # val images, spread evenly
    window: Annotated[int, Range(2)] = 8  # images per drift window
    step: Annotated[int, Range(0, note="0: the window (windows do not overlap)")] = 0  # images between two scores
    # the threshold lets this share of held-out in-domain windows cross it (its (1 - x) quantile)
    false_alarm: Annotated[Float, Range(0, 1, low_open=True, high_open=True)] = 0.05
    calibration_rounds: Count = 400  # held-out windows drawn from the reference images to set the threshold
    study_windows: Count = 6  # notebook 07: windows of each domain (in-domain held-out images, then shifted)


@dataclass
class Config(Section):
    profile: str = "demo"
    seed: Annotated[int, SEED] = 0
    device: Annotated[str, Spelled(r"auto|cpu|cuda(:\d+)?", DEVICES)] = "auto"
    output_root: str = path_field("../outputs")
    data: DataConfig = field(default_factory=DataConfig)
    cross: CrossConfig = field(default_factory=CrossConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    model: Annotated[ModelConfig, Check(_stride_fits, "output_stride")] = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    loss_study: LossStudyConfig = field(default_factory=LossStudyConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tune: Annotated[TuneConfig, Check(_space_fits, "space")] = field(default_factory=TuneConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    overrides: dict[str, Any] = field(default_factory=dict)  # set by load_config: what --set changed
    # set by load_config: each dataset root key (data.root, cross.<name>.root) -> its folder as the profile
    # file gives it, before --set (data/datasets.py generates a missing dataset only there)
    profile_roots: dict[str, str] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        """outputs/<profile>/: everything this profile's run writes."""
        return Path(self.output_root) / self.profile

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Read from the fields' declarations. A list's items and a mapping's values are each checked.
CHOICES: dict[str, tuple] = {key: rule.values for key, rule in schema.rules(Config, Choice).items()}
RANGES: dict[str, Range] = schema.rules(Config, Range)
# list keys -> (how many items, what they are); None: any number but at least one
LENGTHS: dict[str, tuple[int | None, str]] = {key: (r.count, r.what) for key, r in schema.rules(Config, Length).items()}
