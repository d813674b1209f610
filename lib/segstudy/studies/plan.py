"""The run's budget before it starts: every training and fine-tune the notebooks will run for a
profile, and how long each should take (`segstudy plan`, and the top of `segstudy run`).

The estimate comes from a short timed warm-up on the profile's device when it is there (each
distinct model built once, random weights: 1 warm-up and 2 timed training steps at the crop size
and batch, a forward at the evaluation size), else from measured FLOPs and a stated throughput:
x3 for forward + backward, x batch, at `assume_tflops` effective TFLOPS. Evaluation-only work
(notebook 04's and 05's validation of every variant, CPU latencies) is not counted, except notebook
02's scoring of every model on each other dataset's val split (a row each, kind "evaluate").
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from segstudy.config import Config
from segstudy.data.datasets import build_dataset, data_config, dataset_names, synth_config
from segstudy.data.labels import NUM_CLASSES
from segstudy.engine import measure, run_folder
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.engine.finetuning import iterations as finetune_iterations
from segstudy.engine.timings import duration, finetune_key
from segstudy.engine.training import planned_batches, validation_passes
from segstudy.errors import UserError
from segstudy.models.networks import build_model
from segstudy.studies import cross_dataset, loss_comparison, pruning_sweeps, quantization, tuning

# Effective TFLOPS of one 80 GB A100/H100-class GPU with bf16 AMP, until a GPU measures it: what an
# A100 80GB reaches training ResNet-50 with AMP in NVIDIA's published benchmark (DeepLearningExamples,
# 2470 img/s x 3 x 8.18 GFLOPs = 61 TFLOPS, a fifth of its 312 TFLOPS bf16 peak); an H100 is faster.
DEFAULT_TFLOPS = 60.0
FP32_SLOWDOWN = 2.0  # QAT runs in fp32 (TF32 peak is half of bf16's on A100/H100) ...
FAKE_QUANT_SLOWDOWN = 2.0  # ... with fake-quant observers on every layer (assumed, not measured)
# A warm-up that would cost more than this share of the run it plans (the CPU rehearsal: 2 steps per
# training at full size) is skipped for the FLOPs estimate.
WARMUP_SHARE = 0.05
CPU_EFFICIENCY = 0.3  # convolution training's share of a CPU's matrix-multiply rate (assumed)
# The published split sizes, used when the dataset is not on this machine.
# nuImages v1.0: its key frames (67,279 train, 16,445 val), the 2D annotated part of NuScenes.
SPLIT_SIZES = {"cityscapes": (2975, 500), "bdd100k": (7000, 1000), "nuimages": (67279, 16445)}


@dataclasses.dataclass(frozen=True)
class PlannedTraining:
    """One training or fine-tune of the run. `iterations`: batches of data.batch_size it trains on
    (forward + backward each); `val_passes`: full passes over the validation split."""

    notebook: str
    key: str  # run key (engine.timings): runs/unet, runs/custom-ce-seed0, 04_pruning_sweeps/structured-KD
    model: str
    loss: str
    seed: int
    kind: str  # train | fine-tune | KD fine-tune | QAT
    epochs: float
    iterations: int
    val_passes: int
    reused: bool = False  # a finished run train.reuse will return instead of training
    note: str = ""
    val_images: int = 0  # images of one validation pass when not data.dataset's val split (kind "evaluate")


@dataclasses.dataclass
class Estimate:
    seconds: list[float]  # one per planned training (0 for a reused one)
    source: str  # how the seconds were obtained, in words
    images: tuple[int, int]  # (train, val)
    images_source: str

    @property
    def total(self) -> float:
        return sum(self.seconds)


def split_sizes(cfg: Config, name: str | None = None) -> tuple[int, int, str]:
    """(train images, val images, where the counts come from) of dataset `name` (data.dataset): the
    dataset when it is on this machine; the generated set's size when the profile generates it; else
    the published sizes."""
    name = name or cfg.data.dataset
    try:
        data = data_config(cfg, name)
    except UserError as exc:  # a root naming an unset variable: the published sizes
        train, val = SPLIT_SIZES[name]
        return train, val, f"the published {name} split sizes ({str(exc).split(';')[0]})"
    cap = data.max_images or math.inf
    if Path(data.root).is_dir():
        try:
            n = [len(build_dataset(data, s, raw=True)) for s in (data.train_split, data.val_split)]
            return n[0], n[1], f"counted in {data.root}"
        except (UserError, OSError):
            pass  # an incomplete folder: fall through to the sizes it should have
    if data.generate:
        synth = synth_config(cfg, data.dataset)
        return min(synth.train, cap), min(synth.val, cap), "the generated set's size, generated on first use"
    train, val = SPLIT_SIZES[data.dataset]
    return (min(train, cap), min(val, cap),
            f"the published {data.dataset} split sizes: {data.root} is not on this machine")


def _reused(cfg: Config, run_dir: Path) -> bool:
    """Whether train() will return this run folder's result (run_folder.reusable, training's rule)."""
    try:
        return run_folder.reusable(run_dir, cfg, cfg.model)[0] is not None
    except UserError:  # its settings name a device this machine lacks: it will not run here as it is
        return False


def _train_row(cfg: Config, notebook: str, key: str, steps_per_epoch: int) -> PlannedTraining:
    """engine.training.train of cfg.model with `cfg` (as the notebook builds it) into outputs/<profile>/<key>."""
    return PlannedTraining(notebook, key, cfg.model.name, cfg.loss.name, cfg.seed, "train", cfg.train.epochs,
                           planned_batches(cfg.train, steps_per_epoch), validation_passes(cfg.train),
                           _reused(cfg, cfg.output_dir / key))


def _loss_row(cfg: Config, name: str, seed: int, steps_per_epoch: int) -> PlannedTraining:
    """One run of notebook 03's grid; reused when it is notebook 01/02's training (loss_comparison.twin_key)."""
    row = _train_row(loss_comparison.run_config(cfg, name, seed), "03_loss_comparison",
                     loss_comparison.run_key(cfg, name, seed), steps_per_epoch)
    twin = loss_comparison.twin_key(cfg, name, seed) if cfg.train.reuse else None
    return dataclasses.replace(row, reused=True, note=f"the same training as {twin}") if twin else row


def _finetune_row(cfg: Config, notebook: str, name: str, kind: str, epochs: float, steps_per_epoch: int,
                  calls: int = 1, note: str = "") -> PlannedTraining:
    """engine.finetuning.finetune, `calls` times for `epochs` in all (one validation after each)."""
    iterations = calls * finetune_iterations(epochs / calls, steps_per_epoch)
    return PlannedTraining(notebook, finetune_key(notebook, name), "custom", cfg.loss.name, cfg.seed, kind, epochs,
                           iterations, calls, note=note)


def _pruning(cfg: Config, spe: int) -> list[PlannedTraining]:
    return [_finetune_row(cfg, pruning_sweeps.NOTEBOOK, name, kind, epochs, spe, calls=calls, note=note)
            for name, kind, epochs, calls, note in pruning_sweeps.finetunes(cfg)]


def _cross(cfg: Config, spe: int) -> list[PlannedTraining]:
    """Notebook 02's mixed trainings (as many iterations as alone), then one pass of every model over each
    other dataset's val split."""
    nb, mixed = "02_custom_model", cross_dataset.mixed_config(cfg)
    rows = [_train_row(dataclasses.replace(mixed, model=dataclasses.replace(cfg.model, name=m)), nb,
                       f"runs/{cross_dataset.mixed_name(cfg, m)}", spe) for m in cfg.cross.models if cfg.cross.mix]
    models = [(m, m) for m in cfg.compare.baselines + cfg.compare.custom]
    models += [(cross_dataset.mixed_name(cfg, m), m) for m in cfg.cross.models if cfg.cross.mix]
    for name in dataset_names(cfg)[1:]:
        val = split_sizes(cfg, name)[1]
        rows += [PlannedTraining(nb, f"{key} on {name} val", model, "-", cfg.seed, "evaluate", 0, 0, 1,
                                 val_images=val) for key, model in models]
    return rows


def trainings(cfg: Config, notebooks: list[str] | None = None) -> list[PlannedTraining]:
    """Every training and fine-tune notebooks 01-05 run with `cfg`, in the order they run (only
    those of `notebooks`, stems such as 01_baselines, when given)."""
    train_images, _, _ = split_sizes(cfg)
    spe = max(1, train_images // cfg.data.batch_size)
    notebook_models = {"01_baselines": cfg.compare.baselines, "02_custom_model": cfg.compare.custom}
    rows = [_train_row(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=m)), nb, f"runs/{m}", spe)
            for nb, models in notebook_models.items() for m in models]
    rows += _cross(cfg, spe)
    rows += [_loss_row(cfg, name, seed, spe)
             for name in cfg.loss_study.names for seed in loss_comparison.run_seeds(cfg)]
    rows += _pruning(cfg, spe)
    if cfg.quant.qat != "never":
        note = "only if PTQ loses more than quant.max_loss" if cfg.quant.qat == "auto" else ""
        rows.append(_finetune_row(cfg, quantization.NOTEBOOK, quantization.QAT, "QAT", cfg.quant.qat_epochs, spe,
                                  note=note))
    return [r for r in rows if notebooks is None or r.notebook in notebooks]


# --- the estimate ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds for one model: a training step (crop x batch, the profile's AMP), the same in fp32
    (QAT), a forward at the crop x batch (a KD teacher) and one validation image."""

    step: float
    fp32_step: float
    teacher: float
    val_image: float


def _meta_model(cfg: Config, name: str) -> torch.nn.Module:
    mcfg = dataclasses.replace(cfg.model, name=name, pretrained=False)
    with torch.device("meta"):  # FLOPs need shapes only: no memory, no time
        return build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg))


def flops_costs(cfg: Config, name: str, tflops: float) -> Costs:
    """From measured FLOPs (engine.measure.flops) at `tflops` effective TFLOPS."""
    model, (h, w), batch = _meta_model(cfg, name), cfg.data.crop_size, cfg.data.batch_size
    forward = measure.flops(model, h, w) * batch / (tflops * 1e12)
    step = 3 * forward  # backward costs about twice the forward
    val = measure.flops(model, cfg.data.base_size, 2 * cfg.data.base_size) / (tflops * 1e12)
    return Costs(step, step * FP32_SLOWDOWN, forward, val)


def warmup_costs(cfg: Config, name: str, device: torch.device, fp32: bool = False) -> Costs:
    """Timed on `device`: 1 warm-up + 2 SGD steps at the crop size (engine.measure.train_throughput),
    a batch-1 forward at the evaluation size. The fp32 step (QAT) is timed on a GPU when `fp32`;
    elsewhere it is the AMP step x FP32_SLOWDOWN."""
    mcfg = dataclasses.replace(cfg.model, name=name, pretrained=False)
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg))
    (h, w), batch, cl = cfg.data.crop_size, cfg.data.batch_size, cfg.train.channels_last
    amp = autocast_dtype(cfg.train.amp, device)
    step = batch / measure.train_throughput(model, batch, h, w, steps=2, amp_dtype=amp, channels_last=cl,
                                            device=device)
    fp32_step = step * (FP32_SLOWDOWN if amp is not None else 1.0)
    if fp32 and device.type == "cuda":  # on a CPU, 3 more slow steps for a short QAT: not worth it
        fp32_step = batch / measure.train_throughput(model, batch, h, w, steps=2, device=device)
    val = measure.latency(model, cfg.data.base_size, 2 * cfg.data.base_size, device, warmup=1, iters=2,
                          channels_last=cl, dtype=amp)["median_ms"] / 1000
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the notebooks' kernels train next, on the same GPU
    return Costs(step, fp32_step, step / 3, val)


def _seconds(row: PlannedTraining, c: Costs, val_images: int, gpus: int) -> float:
    if row.reused:
        return 0.0
    step = c.fp32_step * FAKE_QUANT_SLOWDOWN if row.kind == "QAT" else c.step
    if row.kind == "KD fine-tune":
        step += c.teacher
    seconds = row.iterations * step + row.val_passes * (row.val_images or val_images) * c.val_image
    return seconds / gpus if row.kind == "train" else seconds  # DDP, assumed to scale perfectly


def _device(cfg: Config) -> torch.device | None:
    try:
        return resolve_device(cfg.device)
    except UserError:
        return None  # e.g. device: cuda on a machine without a GPU


def _from_warmup(cfg: Config, models: list[str], device: torch.device, qat: bool) -> tuple[dict, str]:
    try:
        costs = {m: warmup_costs(cfg, m, device, fp32=qat and m == "custom") for m in models}
    except RuntimeError as exc:  # out of memory, a missing kernel: plan from FLOPs instead
        return {}, f"(the warm-up on {device} failed: {str(exc).splitlines()[0][:120]}) "
    return costs, (f"a timed warm-up on {_device_name(device)} (train.amp {cfg.train.amp}, 2 steps per model "
                   f"after 1); QAT x{FAKE_QUANT_SLOWDOWN:g} for fake quantization (assumed)")


def _from_flops(cfg: Config, models: list[str], tflops: float, where: str = "") -> tuple[dict, str]:
    rate = (f"{tflops:.2g} effective TFLOPS ({where}: {CPU_EFFICIENCY:.0%} of its timed matrix-multiply rate"
            if where else f"an assumed {tflops:g} effective TFLOPS (one A100/H100-class GPU, bf16 AMP; "
                          f"--assume-tflops to change")
    return {m: flops_costs(cfg, m, tflops) for m in models}, (
        f"measured FLOPs x3 (forward + backward) x batch at {rate}; QAT in fp32 at 1/{FP32_SLOWDOWN:g} of it, "
        f"x{FAKE_QUANT_SLOWDOWN:g} for fake quantization)")


def _cpu_tflops(cfg: Config) -> float:
    """This CPU's rate for a plan too short to afford a warm-up: a timed 1024x1024 matrix multiply (in
    the autocast dtype) x CPU_EFFICIENCY, the share of it convolution training reaches (assumed)."""
    dtype = autocast_dtype(cfg.train.amp, torch.device("cpu")) or torch.float32
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a  # noqa: B018 - the first call pays for thread start-up
    start = time.perf_counter()
    for _ in range(5):
        a @ a  # noqa: B018
    return CPU_EFFICIENCY * 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e12


def _warmup_worth_it(cfg: Config, plan: list[PlannedTraining], models: list[str], val_images: int) -> bool:
    """Whether the warm-up (3 steps and 3 validation images per model) costs at most WARMUP_SHARE of
    the run, both counted in FLOPs."""
    costs = {m: flops_costs(cfg, m, 1.0) for m in models}
    warmup = sum(3 * c.step + 3 * c.val_image for c in costs.values())
    run = sum(_seconds(r, costs[r.model], val_images, 1) for r in plan if not r.reused)
    return warmup <= WARMUP_SHARE * run


def estimate(cfg: Config, plan: list[PlannedTraining], assume_tflops: float | None = None) -> Estimate:
    """Seconds per planned training: a warm-up on cfg.device when it is available and no
    `assume_tflops` is given, else measured FLOPs at `assume_tflops` (default DEFAULT_TFLOPS)."""
    train_images, val_images, images_source = split_sizes(cfg)
    device = _device(cfg) if assume_tflops is None else None
    models = list(dict.fromkeys(r.model for r in plan if not r.reused))
    costs, source = {}, ""
    if device is not None and models and _warmup_worth_it(cfg, plan, models, val_images):
        costs, source = _from_warmup(cfg, models, device, any(r.kind == "QAT" for r in plan))
    elif device is not None and models:
        source = f"(a warm-up on {device} would cost more than {WARMUP_SHARE:.0%} of this short run) "
    if not costs and device is not None and device.type == "cpu":
        costs, flops_source = _from_flops(cfg, models, _cpu_tflops(cfg), where="this CPU")
        source += flops_source
    if not costs:
        costs, flops_source = _from_flops(cfg, models, assume_tflops or DEFAULT_TFLOPS)
        source += flops_source
    if cfg.train.gpus > 1:
        source += f"; trainings on {cfg.train.gpus} GPUs (DDP), assumed {cfg.train.gpus}x faster"
    seconds = [0.0 if r.reused else _seconds(r, costs[r.model], val_images, cfg.train.gpus) for r in plan]
    return Estimate(seconds, source, (train_images, val_images), images_source)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({measure.cpu_info()['cpu']}, {torch.get_num_threads()} threads)"


# --- printing and recording -----------------------------------------------------------------------

def per_notebook(plan: list[PlannedTraining], est: Estimate) -> dict[str, float]:
    out: dict[str, float] = {}
    for row, s in zip(plan, est.seconds):
        out[row.notebook] = out.get(row.notebook, 0.0) + s
    return out


def format_plan(cfg: Config, plan: list[PlannedTraining], est: Estimate) -> str:
    """The plan as a table: each training, its iterations and estimated time; per notebook and in all."""
    train, val = est.images
    lines = [f"Plan for profile {cfg.profile}: {len(plan)} trainings and fine-tunes; {train} train / {val} val images "
             f"({est.images_source}), batch {cfg.data.batch_size}, crops {cfg.data.crop_size[0]}x"
             f"{cfg.data.crop_size[1]}",
             f"{'nb':2} {'training (run key)':40} {'model':18} {'loss':7} {'seed':>4} {'epochs':>6} "
             f"{'iterations':>10} {'val':>4} {'estimate':>8}"]
    for r, s in zip(plan, est.seconds):
        when = "reused" if r.reused else duration(s)
        lines.append(f"{r.notebook[:2]:2} {r.key:40} {r.model:18} {r.loss:7} {r.seed:>4} "
                     f"{r.epochs:>6g} {r.iterations:>10} {r.val_passes:>4} {when:>8}"
                     + (f"  ({r.note})" if r.note else ""))
    lines.append("per notebook: " + ", ".join(f"{nb} {duration(s)}" for nb, s in per_notebook(plan, est).items()))
    lines.append(f"total: {duration(est.total)} of training ({est.total:.0f} s; evaluation-only work in "
                 f"notebooks 04 and 05 not counted)")
    lines.append(f"estimated from {est.source}")
    return "\n".join(lines)


def tuning_study(cfg: Config) -> tuple[Config, PlannedTraining]:
    """Notebook 06's study at its largest (tune.trials trials of tune.model under the tune budget,
    none pruned) and the config its trials train with; sized apart from the notebooks' trainings
    (segstudy tune runs it as often as asked, on as many machines)."""
    trial = tuning.budget_config(cfg)
    train_images, val_images, _ = split_sizes(trial)
    spe = max(1, train_images // trial.data.batch_size)
    n = cfg.tune.trials
    return trial, PlannedTraining("06_tuning", f"tune/{cfg.tune.model}", cfg.tune.model, cfg.loss.name, cfg.seed,
                                  "train", trial.train.epochs, n * planned_batches(trial.train, spe),
                                  n * validation_passes(trial.train), val_images=val_images)


def format_tuning(cfg: Config, row: PlannedTraining, est: Estimate) -> str:
    return (f"tuning study (notebook 06 / segstudy tune), apart from the total above: {cfg.tune.trials} trials of "
            f"{row.model}, {row.epochs:g} epochs each ({row.iterations} iterations, {row.val_passes} validations): "
            f"at most {duration(est.total)} on one device when none is pruned (batch {cfg.data.batch_size}; "
            f"estimated from {est.source})")


def rows(plan: list[PlannedTraining], est: Estimate) -> list[dict]:
    """The plan as timings.json holds it."""
    return [dataclasses.asdict(r) | {"planned_s": round(s, 1)} for r, s in zip(plan, est.seconds)]
