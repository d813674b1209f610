"""The run's budget before it starts: every training and fine-tune the notebooks will run for a
profile, every step that trains nothing but takes time (scoring models on a val split, int8
calibration, latency timings: engine.timings.Step), and how long each should take (`segstudy plan`,
and the top of `segstudy run`).

Trainings, and steps on the profile's device: a short timed warm-up on the device when it is there
(each distinct model built once, random weights: 1 warm-up and 2 timed training steps at the crop
size and batch, a forward at the evaluation size), else measured FLOPs and a stated throughput:
x3 for forward + backward, x batch, at `assume_tflops` effective TFLOPS. Steps on the CPU (notebook
05's int8 and ONNX Runtime variants, its calibration, every latency): measured FLOPs x CPU_COST of
their engine, at the fp32 eager rate of one timed forward on this CPU when the profile's device is
on this machine, else at DEFAULT_CPU_TFLOPS.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from segstudy.compress import quantize
from segstudy.config import Config, derive
from segstudy.data.datasets import build_dataset, data_config, dataset_names, synth_config
from segstudy.data.labels import NUM_CLASSES
from segstudy.engine import measure, run_folder
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.engine.finetuning import iterations as finetune_iterations
from segstudy.engine.timings import Step, duration, eval_size, step_key
from segstudy.engine.training import planned_batches, validation_passes
from segstudy.errors import UserError
from segstudy.models.networks import build_model
from segstudy.studies import cross_dataset, loss_comparison, model_comparison, pruning_sweeps, quantization, tuning

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
# The fp32 eager rate (batch 1, 2048x1024) of the CPU of a typical 1-GPU box, until the plan runs on
# that box and times its own CPU (cpu_tflops): 16 cores (the H100 machines lent to this project have
# 16; 1-GPU cloud VMs 12-26 vCPUs) at 62 GFLOPS each, the low end of the 60-100 GFLOPS per core that
# 12-20 s per 2048x1024 image on 2 Zen 4 cores gives (2.37 TFLOPs an image; evaluation.from_training).
DEFAULT_CPU_TFLOPS = 1.0
# Seconds per image of each CPU engine as a multiple of one fp32 eager forward of the same model at the
# same size and thread count: timed side by side in one process for the full profile's custom model on
# a Zen 5 EPYC (int8 torch FX 5.04x faster at 2048x1024, ONNX Runtime int8 5.7x at 512x256, ...; ONNX
# Runtime's calibration: the rehearsal's 40 s per image), each figure's size and threads in
# docs/results.md ("How long will the full profile take").
CPU_COST = {"fp32": 1.0, "bf16": 1.1, "int8 torch FX": 0.2, "ONNX Runtime fp32": 1.3, "int8 ONNX Runtime": 0.17,
            "calibrate histogram": 1.5, "calibrate minmax": 1.4, "calibrate ONNX Runtime": 2.5}
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
class Estimate:
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
    return PlannedTraining(notebook, step_key(notebook, name), "custom", cfg.loss.name, cfg.seed, kind, epochs,
                           iterations, calls, note=note)


def _pruning(cfg: Config, spe: int) -> list[PlannedTraining]:
    return [_finetune_row(cfg, pruning_sweeps.NOTEBOOK, name, kind, epochs, spe, calls=calls, note=note)
            for name, kind, epochs, calls, note in pruning_sweeps.finetunes(cfg)]


def _cross(cfg: Config, spe: int) -> list[Row]:
    """Notebook 02's mixed trainings (as many iterations as alone), then one pass of every model over each
    other dataset's val split (on the device, in the training's precision)."""
    nb, mixed = cross_dataset.NOTEBOOK, cross_dataset.mixed_config(cfg)
    rows: list[Row] = [_train_row(derive(mixed, {"model.name": m}), nb,
                                  run_folder.key(cross_dataset.mixed_name(cfg, m)), spe)
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
    spe = max(1, train_images // cfg.data.batch_size)
    rows: list[Row] = []
    for nb, models in model_comparison.notebook_models(cfg).items():
        rows += [_train_row(derive(cfg, {"model.name": m}), nb,
                            run_folder.key(m), spe) for m in models]
        rows += model_comparison.latency_steps(cfg, nb, models)
    rows += _cross(cfg, spe)
    rows += [_loss_row(cfg, name, seed, spe)
             for name in cfg.loss_study.names for seed in loss_comparison.run_seeds(cfg)]
    rows += _pruning(cfg, spe) + pruning_sweeps.steps(cfg, val_images)
    if cfg.quant.qat != "never":
        note = "only if PTQ loses more than quant.max_loss" if cfg.quant.qat == "auto" else ""
        rows.append(_finetune_row(cfg, quantization.NOTEBOOK, quantization.QAT, "QAT", cfg.quant.qat_epochs, spe,
                                  note=note))
    rows += quantization.steps(cfg, val_images)
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
    val = measure.flops(model, *eval_size(cfg)) / (tflops * 1e12)
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
    val = measure.latency(model, *eval_size(cfg), device, warmup=1, iters=2,
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


def _device_step_seconds(step: Step, costs: dict[str, Costs], gpu: bool) -> float:
    """Passes at the evaluation size on the profile's device, at its seconds per validation image;
    an fp32 pass on a GPU x FP32_SLOWDOWN (the warm-up and the assumed TFLOPS are the AMP rate)."""
    return sum(p.count * costs[p.model].val_image * (FP32_SLOWDOWN if gpu and p.engine == "fp32" else 1.0)
               for p in step.work)


def _cpu_step_seconds(cfg: Config, step: Step, tflops: float, flops: dict) -> float:
    """Measured FLOPs of each pass at the step's size x CPU_COST of its engine, at `tflops` (fp32 eager);
    `flops` caches the counts by (model, size)."""
    total = 0.0
    for p in step.work:
        if (p.model, step.size) not in flops:
            flops[p.model, step.size] = measure.flops(_meta_model(cfg, p.model), *step.size)
        total += p.count * CPU_COST[p.engine] * flops[p.model, step.size]
    return total / (tflops * 1e12)


def cpu_tflops(cfg: Config) -> float:
    """This CPU's fp32 eager rate: the custom model (random weights) timed once after one warm-up
    pass, batch 1 at half the bench height and width, with quant.threads threads (notebook 05's)."""
    h, w = (max(32, side // 64 * 32) for side in (cfg.bench.height, cfg.bench.width))
    mcfg = dataclasses.replace(cfg.model, name="custom", pretrained=False)
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg))
    before = torch.get_num_threads()
    try:
        quantize.set_threads(cfg.quant.threads)
        seconds = measure.latency(model, h, w, warmup=1, iters=1)["median_ms"] / 1000
    finally:
        torch.set_num_threads(before)
    return measure.flops(model, h, w) / seconds / 1e12


def _cpu_rate(cfg: Config, on_machine: bool) -> tuple[float, str]:
    """The CPU steps' fp32 eager TFLOPS, timed here when the profile runs on this machine, and in words."""
    costs = ", ".join(f"{k} {v:g}" for k, v in CPU_COST.items() if k != "fp32")
    how = f"CPU steps: measured FLOPs x each engine's cost per pass against fp32 eager ({costs}) at "
    if not on_machine:
        return DEFAULT_CPU_TFLOPS, how + (f"an assumed {DEFAULT_CPU_TFLOPS:g} fp32 TFLOPS (a 1-GPU box's CPU, 16 "
                                          f"cores: plan.DEFAULT_CPU_TFLOPS)")
    tflops = cpu_tflops(cfg)
    return tflops, how + (f"{tflops:.2g} fp32 TFLOPS timed on this CPU ({measure.cpu_info()['cpu']}, quant.threads "
                          f"{cfg.quant.threads or 'all'}: one forward of the custom model at half the bench size)")


def _device_models(plan: list[Row]) -> list[str]:
    """The models whose training or scoring on the device the plan prices."""
    names = [p.model for r in plan if isinstance(r, Step) and not r.on_cpu for p in r.work]
    return list(dict.fromkeys([r.model for r in plan if isinstance(r, PlannedTraining) and not r.reused] + names))


def _warmup_worth_it(cfg: Config, plan: list[Row], models: list[str], val_images: int) -> bool:
    """Whether the warm-up (3 steps and 3 validation images per model) costs at most WARMUP_SHARE of
    the trainings and device steps, both counted in FLOPs."""
    costs = {m: flops_costs(cfg, m, 1.0) for m in models}
    warmup = sum(3 * c.step + 3 * c.val_image for c in costs.values())
    run = sum(_seconds(r, costs[r.model], val_images, 1) for r in plan
              if isinstance(r, PlannedTraining) and not r.reused)
    run += sum(_device_step_seconds(r, costs, False) for r in plan if isinstance(r, Step) and not r.on_cpu)
    return warmup <= WARMUP_SHARE * run


def estimate(cfg: Config, plan: list[Row], assume_tflops: float | None = None) -> Estimate:
    """Seconds per planned row. Trainings and device steps: a warm-up on cfg.device when it is available
    and no `assume_tflops` is given, else measured FLOPs at `assume_tflops` (default DEFAULT_TFLOPS).
    CPU steps: measured FLOPs x CPU_COST at this CPU's timed rate when cfg.device is on this machine,
    else at DEFAULT_CPU_TFLOPS."""
    train_images, val_images, images_source = split_sizes(cfg)
    here = _device(cfg)
    device = here if assume_tflops is None else None
    models = _device_models(plan)
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
    on_cpu = any(isinstance(r, Step) and r.on_cpu for r in plan)
    cpu, cpu_source = _cpu_rate(cfg, here is not None) if on_cpu else (DEFAULT_CPU_TFLOPS, "")
    gpu, flops = (here.type if here is not None else "cuda") == "cuda", {}

    def row_seconds(r: Row) -> float:
        if isinstance(r, Step):
            return _cpu_step_seconds(cfg, r, cpu, flops) if r.on_cpu else _device_step_seconds(r, costs, gpu)
        return 0.0 if r.reused else _seconds(r, costs[r.model], val_images, cfg.train.gpus)

    seconds = [row_seconds(r) for r in plan]
    source += f"; {cpu_source}" if cpu_source else ""
    return Estimate(seconds, source, (train_images, val_images), images_source, cpu_source)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({measure.cpu_info()['cpu']}, {torch.get_num_threads()} threads)"


# --- printing and recording -----------------------------------------------------------------------

def per_notebook(plan: list[Row], est: Estimate) -> dict[str, float]:
    out: dict[str, float] = {}
    for row, s in zip(plan, est.seconds):
        out[row.notebook] = out.get(row.notebook, 0.0) + s
    return out


def _work(step: Step) -> str:
    """A step's passes in words: "100 x int8 ONNX Runtime", or "150 passes" when they are of several kinds."""
    if len(step.work) == 1:
        return f"{step.work[0].count} x {step.work[0].engine}"
    return f"{step.passes} passes"


def format_plan(cfg: Config, plan: list[Row], est: Estimate) -> str:
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


def rows(plan: list[Row], est: Estimate) -> list[dict]:
    """The plan as timings.json holds it (a step's actual seconds go to its "steps" section)."""
    return [dataclasses.asdict(r) | {"key": r.key, "planned_s": round(s, 1)} for r, s in zip(plan, est.seconds)]
