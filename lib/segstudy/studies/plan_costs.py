"""What the plan prices its rows with: the seconds of one model's training step, KD teacher forward
and validation image on the profile's device (Costs), and of a step's batch-1 passes on the device or
on this CPU; studies.plan adds them up over its rows.

Trainings, and steps on the profile's device: a short timed warm-up on the device when it is there
(each distinct model built once, random weights: 1 warm-up and 2 timed training steps at the crop
size and batch, a forward at the evaluation size), else measured FLOPs and a stated throughput:
x3 for forward + backward, x batch, at `assume_tflops` effective TFLOPS. Steps on the CPU (notebook
05's int8 and ONNX Runtime variants, its calibration, every latency): measured FLOPs x CPU_COST of
their engine, at the fp32 eager rate of one timed forward on this CPU when the profile's device is
on this machine, else at studies.plan.DEFAULT_CPU_TFLOPS.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from segstudy.compress import quantize
from segstudy.config import Config
from segstudy.data.labels import NUM_CLASSES
from segstudy.engine import measure
from segstudy.engine.device import autocast_dtype
from segstudy.engine.timings import Step, eval_size
from segstudy.models.networks import build_model

FP32_SLOWDOWN = 2.0  # QAT runs in fp32 (TF32 peak is half of bf16's on A100/H100) ...
FAKE_QUANT_SLOWDOWN = 2.0  # ... with fake-quant observers on every layer (assumed, not measured)
CPU_EFFICIENCY = 0.3  # convolution training's share of a CPU's matrix-multiply rate (assumed)
# train.amp auto's choice on a CPU is a rule per CPU kind (engine/device.py); the plan's warm-up also times
# the first model in the precision auto did not choose, and advises it where it trains AMP_MARGIN times faster
AMP_MARGIN = 1.15
# Seconds per image of each CPU engine as a multiple of one fp32 eager forward of the same model at the
# same size and thread count: timed side by side in one process for the full profile's custom model on
# a Zen 5 EPYC (int8 torch FX 5.04x faster at 2048x1024, ONNX Runtime int8 5.7x at 512x256, ...; ONNX
# Runtime's calibration: the rehearsal's 40 s per image; OpenVINO int8 0.17 at 1024x512 timed in turn, its
# NNCF calibration 3.8 with the demo's 32 images at 256x128, notebook 05 on the Zen 5, 2026-12-07), each
# figure's size and threads in docs/results.md ("How long will the full profile take").
CPU_COST = {"fp32": 1.0, "bf16": 1.1, "int8 torch FX": 0.2, "ONNX Runtime fp32": 1.3, "int8 ONNX Runtime": 0.17,
            "int8 OpenVINO": 0.17, "calibrate histogram": 1.5, "calibrate minmax": 1.4,
            "calibrate ONNX Runtime": 2.5, "calibrate OpenVINO": 3.8}


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds for one model: a training step (crop x batch, the profile's AMP), the same in fp32
    (QAT), a forward at the crop x batch (a KD teacher) and one validation image."""

    step: float
    fp32_step: float
    teacher: float
    val_image: float


def meta_model(cfg: Config, name: str) -> torch.nn.Module:
    mcfg = dataclasses.replace(cfg.model, name=name, pretrained=False)
    with torch.device("meta"):  # FLOPs need shapes only: no memory, no time
        return build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg))


def flops_costs(cfg: Config, name: str, tflops: float) -> Costs:
    """From measured FLOPs (engine.measure.flops) at `tflops` effective TFLOPS."""
    model, (h, w), batch = meta_model(cfg, name), cfg.data.crop_size, cfg.data.batch_size
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


def from_warmup(cfg: Config, models: list[str], device: torch.device, qat: bool) -> tuple[dict, str]:
    """({model: Costs} timed on `device`, how, in words); ({}, why not) when the warm-up fails there."""
    try:
        costs = {m: warmup_costs(cfg, m, device, fp32=qat and m == "custom") for m in models}
    except RuntimeError as exc:  # out of memory, a missing kernel: plan from FLOPs instead
        return {}, f"(the warm-up on {device} failed: {str(exc).splitlines()[0][:120]}) "
    return costs, (f"a timed warm-up on {device_name(device)} (train.amp {cfg.train.amp}, 2 steps per model "
                   f"after 1); QAT x{FAKE_QUANT_SLOWDOWN:g} for fake quantization (assumed)"
                   + precision_check(cfg, device, models[0], costs[models[0]].step))


def precision_check(cfg: Config, device: torch.device | None, name: str, step: float) -> str:
    """On a CPU with train.amp auto: model `name`'s training img/s in bf16 autocast against fp32, the
    precision auto chose from its warm-up `step` (seconds) and the other timed the same way now (random
    weights, the profile's crop and batch), as a phrase for the plan's source; where the other trains
    AMP_MARGIN faster, the phrase and a printed line say which --set to give. Empty elsewhere."""
    if device is None or device.type != "cpu" or cfg.train.amp != "auto":
        return ""
    chosen = autocast_dtype("auto", device)
    mcfg = dataclasses.replace(cfg.model, name=name, pretrained=False)
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg))
    (h, w), batch = cfg.data.crop_size, cfg.data.batch_size
    other = measure.train_throughput(model, batch, h, w, steps=2, amp_dtype=None if chosen else torch.bfloat16,
                                     channels_last=cfg.train.channels_last)
    fp32, bf16 = (other, batch / step) if chosen else (batch / step, other)
    said = (f"; bf16 autocast trained {name} at {bf16 / fp32:.2f}x fp32's img/s on this CPU "
            f"(train.amp auto: {'bf16' if chosen else 'fp32'})")
    advice = ("fp32 trains faster here: --set train.amp=none" if chosen is not None and fp32 > AMP_MARGIN * bf16
              else "bf16 trains faster here: --set train.amp=bf16" if chosen is None and bf16 > AMP_MARGIN * fp32
              else "")
    if advice:
        print(f"[segstudy] train.amp auto chose {'bf16' if chosen else 'fp32'} on this CPU, but {advice}", flush=True)
        return f"{said}: {advice}"
    return said


def from_flops(cfg: Config, models: list[str], tflops: float, where: str = "") -> tuple[dict, str]:
    """({model: Costs} from measured FLOPs at `tflops`, how, in words); `where`: the machine whose rate
    it is (empty: the assumed GPU rate)."""
    rate = (f"{tflops:.2g} effective TFLOPS ({where}: {CPU_EFFICIENCY:.0%} of its timed matrix-multiply rate"
            if where else f"an assumed {tflops:g} effective TFLOPS (one A100/H100-class GPU, bf16 AMP; "
                          f"--assume-tflops to change")
    return {m: flops_costs(cfg, m, tflops) for m in models}, (
        f"measured FLOPs x3 (forward + backward) x batch at {rate}; QAT in fp32 at 1/{FP32_SLOWDOWN:g} of it, "
        f"x{FAKE_QUANT_SLOWDOWN:g} for fake quantization)")


def matmul_tflops(cfg: Config) -> float:
    """This CPU's rate for a plan too short to afford a warm-up: a timed 1024x1024 matrix multiply (in
    the autocast dtype) x CPU_EFFICIENCY, the share of it convolution training reaches (assumed)."""
    dtype = autocast_dtype(cfg.train.amp, torch.device("cpu")) or torch.float32
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a  # noqa: B018 - the first call pays for thread start-up
    start = time.perf_counter()
    for _ in range(5):
        a @ a  # noqa: B018
    return CPU_EFFICIENCY * 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e12


def device_step_seconds(step: Step, costs: dict[str, Costs], gpu: bool) -> float:
    """Passes at the evaluation size on the profile's device, at its seconds per validation image;
    an fp32 pass on a GPU x FP32_SLOWDOWN (the warm-up and the assumed TFLOPS are the AMP rate)."""
    return sum(p.count * costs[p.model].val_image * (FP32_SLOWDOWN if gpu and p.engine == "fp32" else 1.0)
               for p in step.work)


def cpu_step_seconds(cfg: Config, step: Step, tflops: float, flops: dict) -> float:
    """Measured FLOPs of each pass at the step's size x CPU_COST of its engine, at `tflops` (fp32 eager);
    `flops` caches the counts by (model, size)."""
    total = 0.0
    for p in step.work:
        if (p.model, step.size) not in flops:
            flops[p.model, step.size] = measure.flops(meta_model(cfg, p.model), *step.size)
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


def device_name(device: torch.device) -> str:
    """The device as the estimate's source names it: the GPU's model, or the CPU's and its threads."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({measure.cpu_info()['cpu']}, {torch.get_num_threads()} threads)"
