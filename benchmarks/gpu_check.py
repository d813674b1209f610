"""GPU check: what one GPU does with the study's full-profile model, in at most 5 minutes.

    python benchmarks/gpu_check.py [--device cuda] [--batch 8] [--iters 200] [--height 512 --width 1024]
        [--full-height 1024 --full-width 2048] [--amp auto] [--budget 285] [--out outputs/gpu_check.json]
    python benchmarks/gpu_check.py --device cpu --tiny   # the same code path in seconds (tests/test_gpu_check.py)

Model: DeepLabV3-ResNet50, output stride 8, aux head, random weights (nothing is downloaded). Prints the
machine first (GPU, memory, compute capability, torch, CUDA, driver, CPU), then measures:

  1. training throughput (images/s; SGD, cross-entropy + 0.5 aux) on random batches of --batch crops of
     --height x --width, (a) fp32 and (b) AMP (bf16 where the GPU has it natively, else fp16 with a
     GradScaler) + channels_last, side by side in this process; warm-up steps excluded, each variant's
     peak GPU memory, the ratio b/a and the approximate TFLOP/s it reaches;
  2. --iters iterations of training at full resolution (--full-height x --full-width) on a handful of
     generated Cityscapes-layout images (segstudy.data.synthetic_dataset), AMP + channels_last: the mean
     loss of the first 10 iterations against the last 10, which must have fallen;
  3. one evaluation of that model at full resolution on generated validation images: mIoU (the package's
     confusion matrix) and seconds per image.

Time: each phase has a share of --budget (default 285 s, counted after the imports, which take 5-15 s: the
whole run stays within 5 minutes) and stops early when it is spent, saying so; a watchdog ends the process
at --budget whatever happens (it prints "Timeout" and where the process was). The figures go to --out
(rewritten after each phase, so a cut-short run keeps what it measured) and to a short table. Exit status:
0 when every check passed, 1 when one failed, 2 when --device is cuda and there is no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import gc
import itertools
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from segstudy.config import Config, LossConfig, SynthConfig, TrainConfig
from segstudy.data.cityscapes import CityscapesSegmentation
from segstudy.data.labels import NUM_CLASSES
from segstudy.data.synthetic_dataset import generate
from segstudy.data.transforms import eval_preset
from segstudy.engine import measure, provenance
from segstudy.engine.evaluation import confusion_over
from segstudy.engine.metrics import ConfusionMatrix
from segstudy.engine.optimization import param_groups, poly_schedule, train_one_epoch
from segstudy.models.losses import build_loss, with_aux
from segstudy.models.networks import build_model

REPO = Path(__file__).resolve().parents[1]
FULL = {"model": {"name": "deeplabv3_resnet50", "output_stride": 8, "aux_loss": True},
        "batch": 8, "iters": 200, "height": 512, "width": 1024, "full_height": 1024, "full_width": 2048,
        "warmup": 5, "steps": 20, "train_images": 8, "val_images": 3, "generate_workers": 4}
# --tiny: every phase on CPU in seconds, with a U-Net of width 8 (0.5 M parameters) for the model
TINY = {"model": {"name": "unet", "unet_base": 8},
        "batch": 2, "iters": 3, "height": 64, "width": 128, "full_height": 128, "full_width": 256,
        "warmup": 1, "steps": 2, "train_images": 2, "val_images": 1, "generate_workers": 1}
# Share of --budget per phase; the other 15% is start-up: CUDA, model builds, FLOP count, generated data.
SHARES = {"fp32": 0.175, "amp_channels_last": 0.175, "full_res_training": 0.40, "full_res_eval": 0.10}
GiB = 2**30


class Budget:
    """--budget seconds from the start; a phase gets its share, capped by what is left of the whole."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def deadline(self, share: float) -> float:
        # 5% stays in reserve for the last step of a phase, the JSON and the table: the watchdog fires at 100%
        return min(time.perf_counter() + share * self.seconds, self.start + 0.95 * self.seconds)


@dataclasses.dataclass
class Run:
    """Training steps: each step's loss, a synchronised clock before the first step and after each."""

    losses: list[float]
    stamps: list[float]
    stopped_early: bool
    error: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi (torch does not report it); None without it."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def machine_info(device: torch.device) -> dict:
    cpu = measure.cpu_info()
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cpu": cpu["cpu"], "cpu_threads": cpu["threads"]}
    if device.type != "cuda":
        return info
    p = torch.cuda.get_device_properties(device)
    # "fp32" convolutions run in TF32 on Ampere and later unless this says "ieee": part of what fp32 means here
    return info | {"gpu": p.name, "gpu_memory_GiB": round(p.total_memory / GiB, 1),
                   "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                   "driver": _driver(), "gpu_count": torch.cuda.device_count(),
                   "conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
                   "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision}


def _print_machine(m: dict) -> None:
    if "gpu" in m:
        print(f"GPU: {m['gpu']}, {m['gpu_memory_GiB']} GiB, compute capability {m['compute_capability']}, "
              f"{m['multiprocessors']} SMs, driver {m['driver'] or 'unknown'} ({m['gpu_count']} GPU(s) visible); "
              f"fp32 precision: convolutions {m['conv_fp32_precision']}, matmuls {m['matmul_fp32_precision']}")
    print(f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}; device {m['device']}")
    print(f"CPU: {m['cpu']}, {m['cpu_threads']} threads")


def amp_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The AMP variant's dtype. On CUDA, auto takes bf16 only where it is native (compute capability >= 8):
    the package's autocast_dtype("auto") also accepts the emulated bf16 of older GPUs, which is slow."""
    if choice != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    if device.type != "cuda":
        return torch.bfloat16  # --tiny on CPU: still runs the autocast path
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _model(cfg: dict, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same random weights on every run
    return build_model(num_classes=NUM_CLASSES, pretrained=False, **cfg["model"]).to(device)


def _train(model: nn.Module, batches: Iterable, steps: int, device: torch.device, amp: torch.dtype | None,
           channels_last: bool, deadline: float) -> Run:
    """`steps` SGD steps with the study's training step, optimiser groups, poly schedule and aux loss,
    stopping early at `deadline`. fp16 gets a GradScaler, as in segstudy.engine.training."""
    tcfg = TrainConfig()
    optimizer = torch.optim.SGD(param_groups(model, tcfg.lr), lr=tcfg.lr, momentum=tcfg.momentum,
                                weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(steps, steps // 20, tcfg.poly_power))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    criterion = with_aux(build_loss(LossConfig()), tcfg.aux_weight)
    run = Run([], [], False)

    def on_step(loss: float, *_) -> bool:  # (loss, images seen, ...): only the loss is needed here
        _sync(device)
        run.stamps.append(time.perf_counter())
        run.losses.append(loss)
        return time.perf_counter() > deadline

    _sync(device)
    run.stamps.append(time.perf_counter())
    try:
        train_one_epoch(model, criterion, optimizer, scheduler, scaler, batches, device, amp_dtype=amp,
                        channels_last=channels_last, grad_accum=1, max_batches=steps, on_step=on_step)
    except FloatingPointError as exc:  # the package's divergence guard: a NaN/inf loss
        run.error = f"the loss diverged ({exc}) after {len(run.losses)} steps"
    run.stopped_early = run.error is None and len(run.losses) < steps
    return run


def _guarded(what: str, batch: int, fn: Callable[..., dict], *args) -> dict:
    """fn(*args), a phase's figures, or what stopped it: running out of GPU memory is a result, not a crash."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        return {"error": f"{what}: CUDA out of memory at batch {batch}; lower --batch"}


def throughput(model: nn.Module, cfg: dict, device: torch.device, amp: torch.dtype | None, channels_last: bool,
               deadline: float) -> dict:
    """Images/s of training steps on one random batch (the model's speed, not the data's), warm-up excluded."""
    b, h, w, warmup = cfg["batch"], cfg["height"], cfg["width"], cfg["warmup"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    x = torch.randn(b, 3, h, w, device=device).contiguous(memory_format=fmt)  # no per-step layout copy
    y = torch.randint(0, NUM_CLASSES, (b, h, w), device=device)
    _reset_peak(device)
    run = _train(model, itertools.repeat((x, y)), warmup + cfg["steps"], device, amp, channels_last, deadline)
    measured = len(run.losses) - warmup
    row = {"amp": _dtype_name(amp), "channels_last": channels_last, "warmup_steps": warmup,
           "measured_steps": max(measured, 0), "stopped_early": run.stopped_early, "peak_memory_GiB": _peak_gib(device)}
    if run.error or measured < 1:
        return row | {"img_per_s": None, "error": run.error or "the budget ran out during the warm-up steps"}
    step_s = [b2 - a for a, b2 in zip(run.stamps[warmup:], run.stamps[warmup + 1:])]
    return row | {"img_per_s": b * measured / (run.stamps[-1] - run.stamps[warmup]),
                  "step_ms_median": 1000 * statistics.median(step_s)}


def phase_throughput(cfg: dict, device: torch.device, amp: torch.dtype, budget: Budget) -> dict:
    model = _model(cfg, device)
    flops = measure.flops(model, cfg["height"], cfg["width"])
    out = {"batch": cfg["batch"], "size": f"{cfg['width']}x{cfg['height']}", "forward_GFLOPs_per_image": flops / 1e9}
    for name, dtype, channels_last in (("fp32", None, False), ("amp_channels_last", amp, True)):
        row = _guarded(name, cfg["batch"], throughput, model, cfg, device, dtype, channels_last,
                       budget.deadline(SHARES[name]))
        if row.get("img_per_s"):
            # backward costs about twice the forward pass: training FLOPs ~ 3x forward
            row["train_TFLOP_per_s_approx"] = 3 * flops * row["img_per_s"] / 1e12
        out[name] = row
        _free(device)
        print(_train_row(name, row))
    fp32, fast = out["fp32"].get("img_per_s"), out["amp_channels_last"].get("img_per_s")
    out["speedup_amp_channels_last_over_fp32"] = fast / fp32 if fp32 and fast else None
    return out


def generated_data(cfg: dict, root: Path, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A handful of full-resolution train and val images from the package's generator, held on the device:
    normalised images (N, 3, H, W) and train-id targets (N, H, W)."""
    synth = SynthConfig(train=cfg["train_images"], val=cfg["val_images"], height=cfg["full_height"],
                        width=cfg["full_width"], seed=0)
    generate(root, synth, workers=cfg["generate_workers"], progress=False)
    data = {}
    for split in ("train", "val"):
        pairs = list(CityscapesSegmentation(root, split, transforms=eval_preset(cfg["full_height"])))
        data[split] = (torch.stack([img for img, _ in pairs]).to(device),
                       torch.stack([mask for _, mask in pairs]).to(device))
    return data


def _cycle(images: torch.Tensor, targets: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches taken in turn, round and round the generated images."""
    for start in itertools.count(0, batch):
        idx = torch.arange(start, start + batch, device=images.device) % len(images)
        yield images[idx], targets[idx]


def full_batch(cfg: dict) -> int:
    """As many full-resolution images as --batch crops hold pixels, at least 2: DeepLabV3's image-pooling
    branch has a BatchNorm over a 1x1 map, which cannot train on one image."""
    return max(2, cfg["batch"] * cfg["height"] * cfg["width"] // (cfg["full_height"] * cfg["full_width"]))


def phase_training(model: nn.Module, cfg: dict, data: dict, device: torch.device, amp: torch.dtype,
                   deadline: float) -> dict:
    batch, iters = full_batch(cfg), cfg["iters"]
    model.to(memory_format=torch.channels_last)
    _reset_peak(device)
    run = _train(model, _cycle(*data["train"], batch), iters, device, amp, True, deadline)
    n, k = len(run.losses), min(10, max(1, len(run.losses) // 2))
    out = {"iterations": n, "requested_iterations": iters, "batch": batch, "images": len(data["train"][0]),
           "size": f"{cfg['full_width']}x{cfg['full_height']}", "amp": _dtype_name(amp), "channels_last": True,
           "stopped_early": run.stopped_early, "error": run.error, "losses": run.losses,
           "seconds": run.stamps[-1] - run.stamps[0], "peak_memory_GiB": _peak_gib(device)}
    if n == 0:
        return out | {"loss_fell": False}
    first, last = statistics.fmean(run.losses[:k]), statistics.fmean(run.losses[-k:])
    # the first step is excluded from the speed: cuDNN picks its kernels for the new shape there
    speed = batch * (n - 1) / (run.stamps[-1] - run.stamps[1]) if n > 1 else None
    return out | {"averaged_over": k, "loss_start": first, "loss_end": last, "loss_fell": last < first,
                  "img_per_s": speed}


def phase_eval(model: nn.Module, cfg: dict, data: dict, device: torch.device, amp: torch.dtype,
               deadline: float) -> dict:
    """mIoU and seconds per image (forward + argmax + confusion update; images already on the device)."""
    images, targets = data["val"]
    pairs = [(images[i:i + 1], targets[i:i + 1]) for i in range(len(images))]
    _reset_peak(device)
    confusion_over(model, pairs[:1], device, amp, True)  # warm-up, not timed: cuDNN picks its kernels
    cm, seconds = ConfusionMatrix(NUM_CLASSES, device=device), []
    for pair in pairs:
        if seconds and time.perf_counter() > deadline:
            break
        _sync(device)
        start = time.perf_counter()
        cm.mat += confusion_over(model, [pair], device, amp, True).mat
        _sync(device)
        seconds.append(time.perf_counter() - start)
    metrics = cm.compute()
    return {"images": len(seconds), "of": len(pairs), "size": f"{cfg['full_width']}x{cfg['full_height']}",
            "amp": _dtype_name(amp), "channels_last": True, "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
            "seconds_per_image": statistics.median(seconds), "seconds_per_image_mean": statistics.fmean(seconds),
            "stopped_early": len(seconds) < len(pairs), "peak_memory_GiB": _peak_gib(device)}


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def checks(result: dict, tiny: bool) -> dict[str, bool]:
    p1, p2, p3 = (result.get(k, {}) for k in ("throughput", "full_res_training", "full_res_eval"))
    losses = p2.get("losses") or [float("nan")]
    out = {"throughput_measured": all(_positive(p1.get(v, {}).get("img_per_s")) for v in ("fp32", "amp_channels_last")),
           "loss_finite": all(math.isfinite(v) for v in losses) and not p2.get("error"),
           "loss_fell": bool(p2.get("loss_fell")),
           "eval_miou_finite": math.isfinite(p3.get("miou", float("nan"))),
           "within_budget": result["elapsed_s"] <= result["settings"]["budget_s"]}
    if tiny:
        out.pop("loss_fell")  # 3 iterations prove nothing about learning; it is still printed
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _note(row: dict) -> str:
    if row.get("error"):
        return f"  ({row['error']})"
    return "  (stopped early: its share of --budget ran out)" if row.get("stopped_early") else ""


def _peak(row: dict) -> str:
    return "" if row.get("peak_memory_GiB") is None else f", peak {row['peak_memory_GiB']:.1f} GiB"


def _train_row(label: str, row: dict, extra: str = "") -> str:
    return f"  {label:38s} {_fmt(row.get('img_per_s'), '8.2f')} img/s{_peak(row)}{extra}{_note(row)}"


def table(result: dict) -> str:
    """The figures in a few lines, then PASS/FAIL per check."""
    p1, p2, p3 = (result.get(k, {}) for k in ("throughput", "full_res_training", "full_res_eval"))
    s, m = result["settings"], result["machine"]
    crop = f"{s['batch']} x {s['width']}x{s['height']}"
    speedup = _fmt(p1.get("speedup_amp_channels_last_over_fp32"), ".2f")
    losses = f"loss {_fmt(p2.get('loss_start'), '.3f')} -> {_fmt(p2.get('loss_end'), '.3f')}"
    miou = _fmt(100 * p3["miou"] if "miou" in p3 else None, ".2f")
    rows = [f"GPU check on {m.get('gpu') or m['cpu']}: {result['elapsed_s']:.0f} s of a {s['budget_s']:.0f} s budget",
            _train_row(f"train {crop} fp32", p1.get("fp32", {})),
            _train_row(f"train {crop} {s['amp']}+channels_last", p1.get("amp_channels_last", {}), f", {speedup}x fp32"),
            _train_row(f"train {p2.get('iterations')} it x {p2.get('batch')} at {p2.get('size')}", p2,
                       f", {losses} ({'fell' if p2.get('loss_fell') else 'did NOT fall'})"),
            f"  {'eval ' + str(p3.get('images')) + ' image(s) at ' + str(p3.get('size')):38s} "
            f"{_fmt(p3.get('seconds_per_image'), '8.3f')} s/image{_peak(p3)}, mIoU {miou} %{_note(p3)}"]
    rows += [f"  check {k:20s} {'PASS' if ok else 'FAIL'}" for k, ok in result["checks"].items()]
    return "\n".join(rows)


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small sizes, 3 iterations, a small model (CPU test)")
    p.add_argument("--batch", type=int, help="phase 1 batch, >= 2 (default 8; phase 2: as many pixels, >= 2)")
    p.add_argument("--iters", type=int, help="phase 2 iterations (default 200)")
    p.add_argument("--height", type=int, help="phase 1 crop height (default 512)")
    p.add_argument("--width", type=int, help="phase 1 crop width (default 1024)")
    p.add_argument("--full-height", type=int, help="phases 2 and 3 image height (default 1024)")
    p.add_argument("--full-width", type=int, help="phases 2 and 3 image width (default 2048)")
    p.add_argument("--warmup", type=int, help="phase 1 warm-up steps per variant, not timed (default 5)")
    p.add_argument("--steps", type=int, help="phase 1 timed steps per variant (default 20)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16"), default="auto",
                   help="the AMP variant's dtype; auto: bf16 where native, else fp16 with a GradScaler")
    p.add_argument("--budget", type=float, default=285.0,
                   help="seconds for the whole check after the imports (default 285: 5 minutes in all)")
    p.add_argument("--out", type=Path, help="JSON file (default outputs/gpu_check.json, _tiny with --tiny)")
    args = p.parse_args(argv)
    cfg = dict(TINY if args.tiny else FULL)
    cfg.update({k: v for k in cfg if (v := getattr(args, k, None)) is not None})
    if min(cfg["iters"], cfg["steps"], cfg["warmup"]) < 1:
        p.error("--iters, --steps and --warmup must be at least 1")
    if cfg["batch"] < 2:
        p.error("--batch must be at least 2: DeepLabV3's image-pooling BatchNorm cannot train on one image")
    args.out = args.out or REPO / "outputs" / ("gpu_check_tiny.json" if args.tiny else "gpu_check.json")
    return args, cfg


def run_phases(cfg: dict, device: torch.device, amp: torch.dtype, budget: Budget, result: dict, out: Path) -> None:
    """The three phases in turn; the JSON is rewritten after each."""
    print(f"[1/3] training throughput, batch {cfg['batch']} at {cfg['width']}x{cfg['height']}, fp32 vs "
          f"{_dtype_name(amp)} + channels_last ({cfg['warmup']} warm-up + {cfg['steps']} timed steps each)")
    result["throughput"] = phase_throughput(cfg, device, amp, budget)
    _free(device)  # the phase's model and optimiser state are gone; give their memory back before phase 2
    _write(out, result | {"elapsed_s": budget.elapsed()})
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        data = generated_data(cfg, Path(tmp) / "synth", device)
    model = _model(cfg, device)
    print(f"[2/3] {cfg['iters']} iterations at {cfg['full_width']}x{cfg['full_height']}, batch {full_batch(cfg)}, "
          f"on {len(data['train'][0])} generated images")
    result["full_res_training"] = _guarded("full_res_training", full_batch(cfg), phase_training, model, cfg, data,
                                           device, amp, budget.deadline(SHARES["full_res_training"]))
    _write(out, result | {"elapsed_s": budget.elapsed()})
    print(f"[3/3] evaluation at {cfg['full_width']}x{cfg['full_height']} on {len(data['val'][0])} generated image(s)")
    result["full_res_eval"] = _guarded("full_res_eval", 1, phase_eval, model, cfg, data, device, amp,
                                       budget.deadline(SHARES["full_res_eval"]))


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_check: error: --device {args.device} but torch {torch.__version__} ({build}) sees no CUDA GPU; "
              f"run it on a machine with one, or try --device cpu --tiny", file=sys.stderr)
        return 2
    faulthandler.dump_traceback_later(args.budget, exit=True)  # the hard limit: a hung step cannot outlive --budget
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens when the output is piped
    budget, device = Budget(args.budget), torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms (in the warm-up steps)
    amp = amp_dtype(args.amp, device)
    stamp = {k: v for k, v in provenance.stamp(Config()).items() if k not in ("profile", "overrides")}
    result = {"machine": machine_info(device), "provenance": stamp,
              "settings": cfg | {"amp": _dtype_name(amp), "full_batch": full_batch(cfg), "tiny": args.tiny,
                                 "budget_s": args.budget}}
    _print_machine(result["machine"])
    print(f"budget {args.budget:.0f} s: each phase stops early at its share; a watchdog ends the process at the end")
    run_phases(cfg, device, amp, budget, result, args.out)
    faulthandler.cancel_dump_traceback_later()
    result["elapsed_s"] = budget.elapsed()
    result["checks"] = checks(result, args.tiny)
    result["passed"] = all(result["checks"].values())
    _write(args.out, result)
    print(table(result))
    print("wrote", args.out)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
