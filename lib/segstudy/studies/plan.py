"""The run's budget before it starts: every training and fine-tune the notebooks will run for a
profile, every step that trains nothing but takes time (scoring models on a val split, int8
calibration, latency timings: engine.timings.Step), and how long each should take (`segstudy plan`,
and the top of `segstudy run`): the seconds of one training step, validation image or step pass come
from plan_costs (a timed warm-up on the profile's device, else measured FLOPs at a stated rate), this
module adds them up over the rows and prints the table.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from segstudy.config import Config
from segstudy.config_profiles import derive
from segstudy.data.datasets import build_dataset, data_config, dataset_names, synth_config
from segstudy.engine import measure, run_folder
from segstudy.engine.device import resolve_device
from segstudy.engine.finetuning import iterations as finetune_iterations
from segstudy.engine.timings import Step, duration, step_key
from segstudy.engine.training import planned_batches, validation_passes
from segstudy.errors import UserError
from segstudy.studies import (
    cross_dataset,
    loss_comparison,
    model_comparison,
    plan_costs,
    pruning_sweeps,
    quantization,
    quantization_steps,
    tune_space,
)

# Effective TFLOPS of one 80 GB A100/H100-class GPU with bf16 AMP, until a GPU measures it: what an
# A100 80GB reaches training ResNet-50 with AMP in NVIDIA's published benchmark (DeepLearningExamples,
# 2470 img/s x 3 x 8.18 GFLOPs = 61 TFLOPS, a fifth of its 312 TFLOPS bf16 peak); an H100 is faster.
DEFAULT_TFLOPS = 60.0
# A warm-up that would cost more than this share of the run it plans (the CPU rehearsal: 2 steps per
# training at full size) is skipped for the FLOPs estimate.
WARMUP_SHARE = 0.05
# The fp32 eager rate (batch 1, 2048x1024) of the CPU of a typical 1-GPU box, until the plan runs on
# that box and times its own CPU (plan_costs.cpu_tflops): 16 cores (the H100 machines lent to this
# project have 16; 1-GPU cloud VMs 12-26 vCPUs) at 62 GFLOPS each, the low end of the 60-100 GFLOPS
# per core that 12-20 s per 2048x1024 image on 2 Zen 4 cores gives (2.37 TFLOPs an image;
# evaluation.from_training).
DEFAULT_CPU_TFLOPS = 1.0
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
    val_images: int = 0  # images of one validation pass when not data.dataset's val split (the tuning study)


Row = PlannedTraining | Step  # a row of the plan: a training, or a step that trains nothing


@dataclasses.dataclass
class SecondsEstimate:
    """The estimated seconds of each row of a plan (`estimate`), and how they were obtained."""

    seconds: list[float]  # one per planned row (0 for a reused one)
    source: str  # how the seconds were obtained, in words (the CPU steps' too)
    images: tuple[int, int]  # (train, val)
    images_source: str
    cpu_source: str = ""  # how the CPU steps' seconds were obtained (the end of `source`)

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


def _train_row(cfg: Config, notebook: str, key: str, batches_per_epoch: int) -> PlannedTraining:
    """engine.training.train of cfg.model with `cfg` (as the notebook builds it) into outputs/<profile>/<key>."""
    return PlannedTraining(notebook, key, cfg.model.name, cfg.loss.name, cfg.seed, "train", cfg.train.epochs,
                           planned_batches(cfg.train, batches_per_epoch), validation_passes(cfg.train),
                           _reused(cfg, cfg.output_dir / key))


def _loss_row(cfg: Config, name: str, seed: int, batches_per_epoch: int) -> PlannedTraining:
    """One run of notebook 03's grid; reused when it is notebook 01/02's training (loss_comparison.twin_key)."""
    row = _train_row(loss_comparison.run_config(cfg, name, seed), "03_loss_comparison",
                     loss_comparison.run_key(cfg, name, seed), batches_per_epoch)
    twin = loss_comparison.twin_key(cfg, name, seed) if cfg.train.reuse else None
    return dataclasses.replace(row, reused=True, note=f"the same training as {twin}") if twin else row


def _finetune_row(cfg: Config, notebook: str, name: str, kind: str, epochs: float, batches_per_epoch: int,
                  calls: int = 1, note: str = "") -> PlannedTraining:
    """engine.finetuning.finetune, `calls` times for `epochs` in all (one validation after each)."""
    iterations = calls * finetune_iterations(epochs / calls, batches_per_epoch)
    return PlannedTraining(notebook, step_key(notebook, name), "custom", cfg.loss.name, cfg.seed, kind, epochs,
                           iterations, calls, note=note)


def _pruning(cfg: Config, batches_per_epoch: int) -> list[PlannedTraining]:
    return [_finetune_row(cfg, pruning_sweeps.NOTEBOOK, name, kind, epochs, batches_per_epoch, calls=calls, note=note)
            for name, kind, epochs, calls, note in pruning_sweeps.finetunes(cfg)]


def _cross(cfg: Config, batches_per_epoch: int) -> list[Row]:
    """Notebook 02's mixed trainings (as many iterations as alone), then one pass of every model over each
    other dataset's val split (on the device, in the training's precision)."""
    nb, mixed = cross_dataset.NOTEBOOK, cross_dataset.mixed_config(cfg)
    rows: list[Row] = [_train_row(derive(mixed, {"model.name": m}), nb,
                                  run_folder.key(cross_dataset.mixed_name(cfg, m)), batches_per_epoch)
                       for m in cfg.cross.models if cfg.cross.mix]
    models = [(m, m) for m in cfg.compare.baselines + cfg.compare.custom]
    models += [(cross_dataset.mixed_name(cfg, m), m) for m in cfg.cross.models if cfg.cross.mix]
    for name in dataset_names(cfg)[1:]:
        val = split_sizes(cfg, name)[1]
        rows += [cross_dataset.scoring_step(cfg, key, model, name, val) for key, model in models]
    return rows


def trainings(cfg: Config, notebooks: list[str] | None = None) -> list[Row]:
    """Every training and fine-tune notebooks 01-05 run with `cfg`, and every step of theirs that trains
    nothing (Step rows), in the order they run (only those of `notebooks`, stems such as
    01_baselines, when given)."""
    train_images, val_images, _ = split_sizes(cfg)
    batches_per_epoch = max(1, train_images // cfg.data.batch_size)
    rows: list[Row] = []
    for nb, models in model_comparison.notebook_models(cfg).items():
        rows += [_train_row(derive(cfg, {"model.name": m}), nb,
                            run_folder.key(m), batches_per_epoch) for m in models]
        rows += model_comparison.latency_steps(cfg, nb, models)
    rows += _cross(cfg, batches_per_epoch)
    rows += [_loss_row(cfg, name, seed, batches_per_epoch)
             for name in cfg.loss_study.names for seed in loss_comparison.run_seeds(cfg)]
    rows += _pruning(cfg, batches_per_epoch) + pruning_sweeps.steps(cfg, val_images)
    if cfg.quant.qat != "never":
        rows.append(_finetune_row(cfg, quantization.NOTEBOOK, quantization.QAT, "QAT", cfg.quant.qat_epochs,
                                  batches_per_epoch, note=quantization_steps.qat_note(cfg)))
    rows += quantization_steps.steps(cfg, val_images)
    return [r for r in rows if notebooks is None or r.notebook in notebooks]


def _training_seconds(row: PlannedTraining, c: plan_costs.Costs, val_images: int, gpus: int) -> float:
    if row.reused:
        return 0.0
    step = c.fp32_step * plan_costs.FAKE_QUANT_SLOWDOWN if row.kind == "QAT" else c.step
    if row.kind == "KD fine-tune":
        step += c.teacher
    seconds = row.iterations * step + row.val_passes * (row.val_images or val_images) * c.val_image
    return seconds / gpus if row.kind == "train" else seconds  # DDP, assumed to scale perfectly


def _device(cfg: Config) -> torch.device | None:
    try:
        return resolve_device(cfg.device)
    except UserError:
        return None  # e.g. device: cuda on a machine without a GPU


def _cpu_rate(cfg: Config, on_machine: bool) -> tuple[float, str]:
    """The CPU steps' fp32 eager TFLOPS, timed here when the profile runs on this machine, and in words."""
    costs = ", ".join(f"{k} {v:g}" for k, v in plan_costs.CPU_COST.items() if k != "fp32")
    how = f"CPU steps: measured FLOPs x each engine's cost per pass against fp32 eager ({costs}) at "
    if not on_machine:
        return DEFAULT_CPU_TFLOPS, how + (f"an assumed {DEFAULT_CPU_TFLOPS:g} fp32 TFLOPS (a 1-GPU box's CPU, 16 "
                                          f"cores: plan.DEFAULT_CPU_TFLOPS)")
    tflops = plan_costs.cpu_tflops(cfg)
    return tflops, how + (f"{tflops:.2g} fp32 TFLOPS timed on this CPU ({measure.cpu_info()['cpu']}, quant.threads "
                          f"{cfg.quant.threads or 'all'}: one forward of the custom model at half the bench size)")


def _device_models(plan: list[Row]) -> list[str]:
    """The models whose training or scoring on the device the plan prices."""
    names = [p.model for r in plan if isinstance(r, Step) and not r.on_cpu for p in r.work]
    return list(dict.fromkeys([r.model for r in plan if isinstance(r, PlannedTraining) and not r.reused] + names))


def _warmup_worth_it(cfg: Config, plan: list[Row], models: list[str], val_images: int) -> bool:
    """Whether the warm-up (3 steps and 3 validation images per model) costs at most WARMUP_SHARE of
    the trainings and device steps, both counted in FLOPs."""
    costs = {m: plan_costs.flops_costs(cfg, m, 1.0) for m in models}
    warmup = sum(3 * c.step + 3 * c.val_image for c in costs.values())
    run = sum(_training_seconds(r, costs[r.model], val_images, 1) for r in plan
              if isinstance(r, PlannedTraining) and not r.reused)
    run += sum(plan_costs.device_step_seconds(r, costs, False) for r in plan if isinstance(r, Step) and not r.on_cpu)
    return warmup <= WARMUP_SHARE * run


def estimate(cfg: Config, plan: list[Row], assume_tflops: float | None = None) -> SecondsEstimate:
    """Seconds per planned row. Trainings and device steps: a warm-up on cfg.device when it is available
    and no `assume_tflops` is given, else measured FLOPs at `assume_tflops` (default DEFAULT_TFLOPS).
    CPU steps: measured FLOPs x plan_costs.CPU_COST at this CPU's timed rate when cfg.device is on this
    machine, else at DEFAULT_CPU_TFLOPS."""
    train_images, val_images, images_source = split_sizes(cfg)
    here = _device(cfg)
    device = here if assume_tflops is None else None
    models = _device_models(plan)
    costs, source = {}, ""
    if device is not None and models and _warmup_worth_it(cfg, plan, models, val_images):
        costs, source = plan_costs.from_warmup(cfg, models, device, any(r.kind == "QAT" for r in plan))
    elif device is not None and models:
        source = f"(a warm-up on {device} would cost more than {WARMUP_SHARE:.0%} of this short run) "
    if not costs and device is not None and device.type == "cpu":
        costs, flops_source = plan_costs.from_flops(cfg, models, plan_costs.matmul_tflops(cfg), where="this CPU")
        source += flops_source
    if not costs:
        costs, flops_source = plan_costs.from_flops(cfg, models, assume_tflops or DEFAULT_TFLOPS)
        source += flops_source
    if cfg.train.gpus > 1:
        source += f"; trainings on {cfg.train.gpus} GPUs (DDP), assumed {cfg.train.gpus}x faster"
    on_cpu = any(isinstance(r, Step) and r.on_cpu for r in plan)
    cpu, cpu_source = _cpu_rate(cfg, here is not None) if on_cpu else (DEFAULT_CPU_TFLOPS, "")
    gpu, flops = (here.type if here is not None else "cuda") == "cuda", {}

    def row_seconds(r: Row) -> float:
        if isinstance(r, Step):
            if r.on_cpu:
                return plan_costs.cpu_step_seconds(cfg, r, cpu, flops)
            return plan_costs.device_step_seconds(r, costs, gpu)
        return 0.0 if r.reused else _training_seconds(r, costs[r.model], val_images, cfg.train.gpus)

    seconds = [row_seconds(r) for r in plan]
    source += f"; {cpu_source}" if cpu_source else ""
    return SecondsEstimate(seconds, source, (train_images, val_images), images_source, cpu_source)


# --- printing and recording -----------------------------------------------------------------------

def per_notebook(plan: list[Row], est: SecondsEstimate) -> dict[str, float]:
    out: dict[str, float] = {}
    for row, s in zip(plan, est.seconds):
        out[row.notebook] = out.get(row.notebook, 0.0) + s
    return out


def _work(step: Step) -> str:
    """A step's passes in words: "100 x int8 ONNX Runtime", or "150 passes" when they are of several kinds."""
    if len(step.work) == 1:
        return f"{step.work[0].count} x {step.work[0].engine}"
    return f"{step.passes} passes"


def format_plan(cfg: Config, plan: list[Row], est: SecondsEstimate) -> str:
    """The plan as two tables: each training (its iterations) and each step that trains nothing (its
    passes, where it runs), with their estimated time; per notebook and in all."""
    train, val = est.images
    rows = list(zip(plan, est.seconds))
    trained = [(r, s) for r, s in rows if isinstance(r, PlannedTraining)]
    steps = [(r, s) for r, s in rows if isinstance(r, Step)]
    lines = [f"Plan for profile {cfg.profile}: {len(trained)} trainings and fine-tunes, {len(steps)} steps that train "
             f"nothing; {train} train / {val} val images ({est.images_source}), batch {cfg.data.batch_size}, crops "
             f"{cfg.data.crop_size[0]}x{cfg.data.crop_size[1]}",
             f"{'nb':2} {'training (run key)':40} {'model':18} {'loss':7} {'seed':>4} {'epochs':>6} "
             f"{'iterations':>10} {'val':>4} {'estimate':>8}"]
    for r, s in trained:
        when = "reused" if r.reused else duration(s)
        lines.append(f"{r.notebook[:2]:2} {r.key:40} {r.model:18} {r.loss:7} {r.seed:>4} "
                     f"{r.epochs:>6g} {r.iterations:>10} {r.val_passes:>4} {when:>8}"
                     + (f"  ({r.note})" if r.note else ""))
    if steps:
        lines.append(f"{'nb':2} {'step (key)':64} {'on':6} {'passes (batch 1)':30} {'size':>9} {'estimate':>8}")
    for r, s in steps:
        lines.append(f"{r.notebook[:2]:2} {r.key:64} {'cpu' if r.on_cpu else 'device':6} {_work(r):30} "
                     f"{r.size[1]:>4}x{r.size[0]:<4} {duration(s):>8}" + (f"  ({r.note})" if r.note else ""))
    lines.append("per notebook: " + ", ".join(f"{nb} {duration(s)}" for nb, s in per_notebook(plan, est).items()))
    parts = {"training": sum(s for _, s in trained),
             f"scoring on {cfg.device}": sum(s for r, s in steps if not r.on_cpu),
             "CPU steps (int8 and ONNX Runtime scoring, calibration, latencies)": sum(s for r, s in steps if r.on_cpu)}
    lines.append(f"total: {duration(est.total)} ({est.total:.0f} s): "
                 + ", ".join(f"{duration(s)} of {what}" for what, s in parts.items()))
    lines.append(f"estimated from {est.source}")
    return "\n".join(lines)


def tuning_study(cfg: Config) -> tuple[Config, PlannedTraining]:
    """Notebook 06's study at its largest (tune.trials trials of tune.model under the tune budget,
    none pruned) and the config its trials train with; sized apart from the notebooks' trainings
    (segstudy tune runs it as often as asked, on as many machines)."""
    trial = tune_space.budget_config(cfg)
    train_images, val_images, _ = split_sizes(trial)
    batches_per_epoch = max(1, train_images // trial.data.batch_size)
    n = cfg.tune.trials
    return trial, PlannedTraining("06_tuning", f"tune/{cfg.tune.model}", cfg.tune.model, cfg.loss.name, cfg.seed,
                                  "train", trial.train.epochs, n * planned_batches(trial.train, batches_per_epoch),
                                  n * validation_passes(trial.train), val_images=val_images)


def format_tuning(cfg: Config, row: PlannedTraining, est: SecondsEstimate) -> str:
    return (f"tuning study (notebook 06 / segstudy tune), apart from the total above: {cfg.tune.trials} trials of "
            f"{row.model}, {row.epochs:g} epochs each ({row.iterations} iterations, {row.val_passes} validations): "
            f"at most {duration(est.total)} on one device when none is pruned (batch {cfg.data.batch_size}; "
            f"estimated from {est.source})")


def rows(plan: list[Row], est: SecondsEstimate) -> list[dict]:
    """The plan as timings.json holds it (a step's actual seconds go to its "steps" section)."""
    return [dataclasses.asdict(r) | {"key": r.key, "planned_s": round(s, 1)} for r, s in zip(plan, est.seconds)]
