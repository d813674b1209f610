"""GPU check: the full profile's training path on this machine, in about 5 minutes.

    python benchmarks/gpu_check.py [--set KEY=VALUE ...] [--iters 100] [--ddp auto] [--budget 285] [--out FILE]
    python benchmarks/gpu_check.py --device cpu --tiny [--ddp always]   # the same code at tiny size (the tests)

It runs the package's own code on params/full.yaml (data.root: Cityscapes-layout files generated at 2048x1024
into a temporary folder; random weights; no tracking; --set changes any other key): the models of
segstudy.models.networks.build_model, the criterion and the fused optimizer training builds (build_criterion,
build_optimizer), the autocast dtype of train.amp (engine.device.autocast_dtype), train.channels_last, and the
training step (engine.optimization.train_one_epoch), with cudnn.benchmark on as training sets it. One row per check:

  train <model> <amp>+channels_last  every model at the profile's crop and batch, on random batches held on the
                                     device: the model's own speed (img/s, ms/step, peak memory, approximate
                                     TFLOP/s), warm-up steps excluded;
  train <model> tf32                 the profile's model without autocast, TF32 on for float32 convolutions and
                                     matmuls (named so: TF32 is not fp32): what the amp dtype buys, as a ratio;
  loader                             --iters steps of the profile's model fed by the loader training builds
                                     (data.build_loader, EpochOrder, SeededSamples): data.num_workers workers,
                                     pinned memory, PNG decoding and the training preset; its img/s against the
                                     random-batch row says whether the loader keeps up; the loss must fall;
  eval                               that model through the validation loader (engine.evaluation.eval_loader) at
                                     full resolution (data.base_size): mIoU, s/image (decoding not included);
  ddp                                when two GPUs are visible (--ddp auto): engine.training.train with
                                     train.gpus=2, so torchrun, NCCL, SyncBatchNorm and DDP, a few steps and
                                     the validation; skipped with fewer;
  within budget                      the whole run within --budget seconds.

Time: each phase has a share of --budget (default 285 s, counted after the imports, which take 5-15 s) and stops
early when it is spent, saying so; a watchdog ends the process at --budget whatever happens (it prints where the
process was). The figures go to --out (rewritten after each phase) and to the table, which ends with the
verdict line. Exit status: 0 when every check passed, 1 when one failed, 2 when a --set key is wrong or the
device is cuda and torch can use no GPU (one line saying why).
"""

from __future__ import annotations

import argparse
import contextlib
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
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from segstudy.config import MODELS, Config, SynthConfig
from segstudy.config_profiles import derive, load_config, parse_overrides
from segstudy.data.datasets import EpochOrder, SeededSamples, build_dataset, build_loader, training_set
from segstudy.data.labels import NUM_CLASSES
from segstudy.data.synthetic.dataset import generate
from segstudy.engine import measure, provenance
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.engine.evaluation import confusion_over, eval_loader
from segstudy.engine.optimization import build_criterion, build_optimizer, poly_schedule, train_one_epoch
from segstudy.engine.training import fixed_shape_kernels, train
from segstudy.errors import UserError
from segstudy.models.networks import build_model

REPO = Path(__file__).resolve().parents[1]
PROFILE = "full"
# images generated per split, at Cityscapes' size; val = the batch, so the eval runs one full batch as training does
FULL = {"iters": 100, "warmup": 5, "steps": 20, "ddp_steps": 3, "train_images": 8, "height": 1024, "width": 2048,
        "set": {}}
# --tiny: the same phases on CPU in about a minute, every model at a small width (unet for the later phases)
TINY = {"iters": 3, "warmup": 1, "steps": 2, "ddp_steps": 3, "train_images": 4, "height": 128, "width": 256,
        "set": {"device": "cpu", "data.crop_size": [64, 128], "data.base_size": 128, "data.batch_size": 2,
                "data.num_workers": 1, "model.name": "unet", "model.unet_base": 8, "model.head_channels": 32,
                "model.head_layers": 1, "train.amp": "bf16"}}  # bf16: the autocast path runs on CPU too
# Share of --budget per phase; the rest is start-up: CUDA, the generated files.
SHARES = {"models": 0.32, "loader": 0.22, "eval": 0.06, "ddp": 0.25}
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
    # what float32 convolutions and matmuls run in outside the tf32 row ("tf32", or "ieee"/"none": true fp32)
    return info | {"gpu": p.name, "gpu_memory_GiB": round(p.total_memory / GiB, 1),
                   "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                   "driver": _driver(), "gpu_count": torch.cuda.device_count(),
                   "conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
                   "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision}


def _print_machine(m: dict) -> None:
    if "gpu" in m:
        print(f"GPU: {m['gpu']}, {m['gpu_memory_GiB']} GiB, compute capability {m['compute_capability']}, "
              f"{m['multiprocessors']} SMs, driver {m['driver'] or 'unknown'} ({m['gpu_count']} GPU(s) visible); "
              f"float32 precision: convolutions {m['conv_fp32_precision']}, matmuls {m['matmul_fp32_precision']}")
    print(f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}; device {m['device']}")
    print(f"CPU: {m['cpu']}, {m['cpu_threads']} threads")


@contextlib.contextmanager
def tf32(device: torch.device) -> Iterator[str]:
    """TF32 for float32 convolutions (cuDNN) and matmuls (cuBLAS) inside, restored after; yields the row's
    precision name. torch 2.14's fp32_precision settings: its older allow_tf32 flags cannot be mixed with
    them (reading one after setting the other raises), and machine_info reads these."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32"
    try:
        yield "tf32" if device.type == "cuda" else "fp32"  # CPUs have no TF32: the same row is plain fp32
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def check_config(root: Path, output_root: Path, preset: dict, user: dict) -> Config:
    """params/full.yaml on the generated files: random weights (nothing is downloaded), no tracking, no other
    dataset (their ${VAR} roots may be unset here), then the preset's and the user's --set keys."""
    overrides = {"data.root": str(root), "data.generate": False, "output_root": str(output_root),
                 "model.pretrained": False, "tracking.backend": "none",
                 "cross.bdd100k.root": "", "cross.nuimages.root": ""}
    return load_config(PROFILE, overrides | preset["set"] | user)


def generated_files(root: Path, preset: dict, cfg: Config) -> float:
    """Cityscapes-layout PNGs (leftImg8bit/, gtFine/) from the package's generator; returns the seconds."""
    synth = SynthConfig(train=preset["train_images"], val=cfg.data.batch_size, height=preset["height"],
                        width=preset["width"], seed=cfg.seed)
    return generate(root, synth, workers=1, progress=False)


def build(cfg: Config, name: str, device: torch.device) -> nn.Module:
    """Model `name` as training builds it from the profile's model section, in its memory format."""
    torch.manual_seed(cfg.seed)  # the same random weights on every run
    mcfg = dataclasses.replace(cfg.model, name=name)
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg)).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def steps(model: nn.Module, cfg: Config, criterion: Callable, batches: Iterable, count: int, device: torch.device,
          amp: torch.dtype | None, deadline: float) -> Run:
    """`count` optimiser steps of the training step with the profile's fused optimizer and parameter groups,
    stopping early at `deadline`. fp16 gets a GradScaler, as training builds it."""
    optimizer = build_optimizer(cfg, model)
    # the profile's schedule squeezed to the check's length, its warm-up capped at 5% of it
    schedule = poly_schedule(count, min(cfg.train.warmup_iters, count // 20), cfg.train.poly_power)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
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
                        channels_last=cfg.train.channels_last, grad_accum=cfg.train.grad_accum,
                        max_batches=count * cfg.train.grad_accum, on_step=on_step)
    except FloatingPointError as exc:  # the package's divergence guard: a NaN/inf loss
        run.error = f"the loss diverged ({exc}) after {len(run.losses)} steps"
    run.stopped_early = run.error is None and len(run.losses) < count
    return run


def _speed(run: Run, warmup: int, images_per_step: int) -> dict:
    """img/s and the median ms per step after `warmup` steps (cuDNN times its algorithms in those)."""
    measured = len(run.losses) - warmup
    out = {"warmup_steps": warmup, "measured_steps": max(measured, 0), "stopped_early": run.stopped_early,
           "losses": run.losses}
    if run.error or measured < 1:
        return out | {"img_per_s": None, "error": run.error or "the budget ran out during the warm-up steps"}
    step_s = [b - a for a, b in zip(run.stamps[warmup:], run.stamps[warmup + 1:])]
    return out | {"img_per_s": images_per_step * measured / (run.stamps[-1] - run.stamps[warmup]),
                  "step_ms_median": 1000 * statistics.median(step_s)}


def _guarded(what: str, fn: Callable[..., dict], *args) -> dict:
    """fn(*args), a row's figures, or what stopped it: a failing check is a result, and the next ones still run
    (torch's errors are RuntimeErrors: their traceback goes to stderr, their first line to the row)."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        return {"error": f"{what}: CUDA out of memory; try a smaller batch (--set data.batch_size=4)"}
    except UserError as exc:
        return {"error": f"{what}: {str(exc).strip().splitlines()[-1]}"}
    except RuntimeError as exc:
        traceback.print_exc()
        return {"error": f"{what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}


def model_speed(cfg: Config, preset: dict, name: str, criterion: Callable, device: torch.device,
                amp: torch.dtype | None, deadline: float) -> dict:
    """Training img/s of `name` on one random batch held on the device (the model's speed, not the data's)."""
    b, (h, w), warmup = cfg.data.batch_size, cfg.data.crop_size, preset["warmup"]
    model = build(cfg, name, device)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    x = torch.randn(b, 3, h, w, device=device).contiguous(memory_format=fmt)  # no per-step layout copy
    y = torch.randint(0, NUM_CLASSES, (b, h, w), device=device)
    _reset_peak(device)
    run = steps(model, cfg, criterion, itertools.repeat((x, y)), warmup + preset["steps"], device, amp, deadline)
    row = _speed(run, warmup, b * cfg.train.grad_accum) | {"peak_memory_GiB": _peak_gib(device)}
    if row["img_per_s"]:
        # backward costs about twice the forward pass: training FLOPs ~ 3x forward
        row["train_TFLOP_per_s_approx"] = 3 * measure.flops(model, h, w) * row["img_per_s"] / 1e12
    return row


def phase_models(cfg: Config, preset: dict, criterion: Callable, device: torch.device, amp: torch.dtype | None,
                 budget: Budget) -> list[dict]:
    """Every model at the profile's precision, then the profile's model in TF32 without autocast."""
    share, rows = SHARES["models"] / (len(MODELS) + 1), []
    variant = f"{_dtype_name(amp)}+channels_last" if cfg.train.channels_last else _dtype_name(amp)
    for name in MODELS:
        row = _guarded(name, model_speed, cfg, preset, name, criterion, device, amp, budget.deadline(share))
        rows.append(_row(f"train {name} {variant}", row | {"model": name, "amp": _dtype_name(amp)}))
        _free(device)
    with tf32(device) as precision:
        row = _guarded(precision, model_speed, cfg, preset, cfg.model.name, criterion, device, None,
                       budget.deadline(share))
    amp_row = next(r for r in rows if r["model"] == cfg.model.name)
    ratio = amp_row.get("img_per_s") / row["img_per_s"] if amp_row.get("img_per_s") and row.get("img_per_s") else None
    rows.append(_row(f"train {cfg.model.name} {precision}", row | {"model": cfg.model.name, "amp": precision,
                                                                    f"{_dtype_name(amp)}_over_{precision}": ratio}))
    _free(device)
    return rows


def phase_loader(cfg: Config, preset: dict, model: nn.Module, train_ds, criterion: Callable, device: torch.device,
                 amp: torch.dtype | None, model_row: dict, deadline: float) -> dict:
    """`model` (the profile's) trained from the DataLoader training builds (EpochOrder, SeededSamples, workers,
    pinned memory on CUDA, PNG decoding, the training preset), over the generated files repeated to one
    epoch of the check's length: each worker makes whole batches, so a real epoch (371 batches) keeps every
    worker busy, which an epoch of 8 files (one batch) would not."""
    batch, iters = cfg.data.batch_size, preset["iters"]
    repeats = math.ceil((iters + 1) * batch * cfg.train.grad_accum / len(train_ds))
    epoch = ConcatDataset([train_ds] * repeats)
    loader = build_loader(SeededSamples(epoch), batch, train=True, seed=cfg.seed,
                          num_workers=cfg.data.num_workers, device=device.type, sampler=EpochOrder(epoch, cfg.seed))
    _reset_peak(device)
    warmup = min(preset["warmup"], iters - 1)
    run = steps(model, cfg, criterion, loader, iters, device, amp, deadline)
    row = _speed(run, warmup, batch * cfg.train.grad_accum)
    n, k = len(run.losses), min(10, max(1, len(run.losses) // 2))
    row |= {"iterations": n, "requested_iterations": iters, "workers": cfg.data.num_workers,
            "pinned_memory": loader.pin_memory, "images": len(train_ds), "peak_memory_GiB": _peak_gib(device)}
    if n:
        first, last = statistics.fmean(run.losses[:k]), statistics.fmean(run.losses[-k:])
        row |= {"averaged_over": k, "loss_start": first, "loss_end": last, "loss_fell": last < first}
    if row.get("img_per_s") and model_row.get("img_per_s"):
        row["of_random_batch_speed"] = row["img_per_s"] / model_row["img_per_s"]
    return row


def phase_eval(cfg: Config, model: nn.Module, device: torch.device, amp: torch.dtype | None,
               deadline: float) -> dict:
    """The validation loader training builds (full resolution, data.batch_size); then the model over its
    batches, timed after a warm-up pass (cuDNN picks its kernels for the new shape there)."""
    val_ds = build_dataset(cfg.data, cfg.data.val_split)
    # decoded once by the loader (its workers, pinned memory), then served as they are: the model's time, not PNGs'
    decoded = DataLoader(list(eval_loader(val_ds, cfg, device)), batch_size=None)
    _reset_peak(device)
    confusion_over(model, decoded, device, amp, cfg.train.channels_last)
    _sync(device)
    start = time.perf_counter()
    cm = confusion_over(model, decoded, device, amp, cfg.train.channels_last)
    _sync(device)
    seconds = time.perf_counter() - start
    metrics = cm.compute()
    height, width = next(iter(decoded))[0].shape[-2:]
    return {"images": len(val_ds), "size": f"{width}x{height}", "miou": metrics["miou"],
            "pixel_acc": metrics["pixel_acc"], "seconds_per_image": seconds / len(val_ds),
            "over_budget": time.perf_counter() > deadline, "peak_memory_GiB": _peak_gib(device)}


def ddp_wanted(choice: str, device: torch.device) -> bool:
    """--ddp auto: with two GPUs visible (NCCL needs one per rank); always: also on CPU (gloo, no SyncBN)."""
    if choice == "auto":
        return device.type == "cuda" and torch.cuda.device_count() >= 2
    return choice == "always"


def phase_ddp(cfg: Config, preset: dict, run_dir: Path) -> dict:
    """engine.training.train with train.gpus=2: engine.launch starts torchrun, whose two ranks train with
    NCCL on CUDA (gloo on CPU), SyncBatchNorm (CUDA only) and DDP, for a few steps and their validation."""
    two = derive(cfg, {"train.gpus": 2, "train.max_steps": preset["ddp_steps"]})
    result = train(two, run_dir=run_dir, progress=False, keep_weights=False)
    losses = [r["train_loss"] for r in result["history"]]
    return {"ranks": 2, "backend": "nccl" if cfg.device.startswith("cuda") else "gloo",
            "sync_batchnorm": cfg.device.startswith("cuda"), "steps": result["steps"],
            "requested_steps": preset["ddp_steps"], "losses": losses, "val_miou": result["final"].get("val_miou"),
            "img_per_s": result["train_img_per_s"]}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _status(name: str, row: dict, tiny: bool) -> str:
    """PASS or FAIL of one check from its figures (SKIP rows are made so)."""
    if row.get("error"):
        return "FAIL"
    if name.startswith("train"):
        ok = _finite(row.get("img_per_s")) and all(map(math.isfinite, row["losses"]))
    elif name == "loader":  # 3 iterations prove nothing about learning (--tiny): the fall is printed, not judged
        ok = _finite(row.get("img_per_s")) and all(map(math.isfinite, row["losses"])) and \
            (tiny or bool(row.get("loss_fell")))
    elif name == "eval":
        ok = _finite(row.get("miou"))
    else:  # ddp
        ok = row["steps"] == row["requested_steps"] and all(map(math.isfinite, row["losses"])) and \
            _finite(row["val_miou"])
    return "PASS" if ok else "FAIL"


def _row(name: str, figures: dict, tiny: bool = False) -> dict:
    return {"check": name, "status": _status(name, figures, tiny)} | figures


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def summary(row: dict) -> str:
    """The figures of one row, in a line."""
    if row.get("skipped"):
        return row["skipped"]
    if row.get("error"):
        return row["error"]
    peak = "" if row.get("peak_memory_GiB") is None else f", peak {row['peak_memory_GiB']:.1f} GiB"
    early = " (stopped early: its share of --budget ran out)" if row.get("stopped_early") else ""
    name = row["check"]
    if name.startswith("train"):
        ratio = "".join(f", {k.replace('_over_', f' {v:.2f}x ')}" for k, v in row.items() if "_over_" in k and v)
        tflops = _fmt(row.get("train_TFLOP_per_s_approx"), ".3g", " TFLOP/s")
        return (f"{_fmt(row['img_per_s'], '.2f')} img/s, {_fmt(row.get('step_ms_median'), '.0f')} ms/step{peak}, "
                f"~{tflops}{ratio}{early}")
    if name == "loader":
        share = _fmt(row.get("of_random_batch_speed"), ".2f", " of the random-batch speed")
        return (f"{_fmt(row['img_per_s'], '.2f')} img/s ({share}; workers {row['workers']}, pinned memory "
                f"{'on' if row['pinned_memory'] else 'off'}), loss {_fmt(row.get('loss_start'), '.3f')} -> "
                f"{_fmt(row.get('loss_end'), '.3f')} in {row['iterations']} it{peak}{early}")
    if name == "eval":
        return (f"{row['images']} image(s) at {row['size']}: {row['seconds_per_image']:.3f} s/image, "
                f"mIoU {100 * row['miou']:.2f} %{peak}")
    if name == "within budget":
        return f"{row['elapsed_s']:.0f} s"
    return (f"{row['steps']}/{row['requested_steps']} steps on {row['ranks']} ranks, {row['backend']}, "
            f"SyncBatchNorm {'on' if row['sync_batchnorm'] else 'off (CPU)'}, "
            f"loss {_fmt(row['losses'][-1] if row['losses'] else None, '.3f')}, val mIoU "
            f"{_fmt(100 * row['val_miou'] if _finite(row['val_miou']) else None, '.2f', ' %')}")


def table(result: dict) -> str:
    """A heading, one line per check, the verdict."""
    s, m, rows = result["settings"], result["machine"], result["rows"]
    crop = "x".join(map(str, reversed(s["crop_size"])))
    lines = [f"GPU check on {m.get('gpu') or m['cpu']}: profile {PROFILE}, crop {crop}, batch {s['batch_size']}, "
             f"{s['amp']}, channels_last {s['channels_last']}, fused {s['optimizer']}; "
             f"{result['elapsed_s']:.0f} s of a {s['budget_s']:.0f} s budget"]
    width = max(len(r["check"]) for r in rows)
    lines += [f"  {r['check']:{width}s}  {r['status']:4s}  {summary(r)}" for r in rows]
    failed = [r["check"] for r in rows if r["status"] == "FAIL"]
    skipped = [f"{r['check']} skipped ({r['skipped']})" for r in rows if r["status"] == "SKIP"]
    counted = len(rows) - len(skipped)
    verdict = (f"FAIL: {', '.join(failed)}" if failed else
               f"PASS: {counted} of {counted} checks passed") + "".join(f"; {s}" for s in skipped)
    return "\n".join([*lines, f"verdict: {verdict}"])


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="the device (default: the profile's, cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and steps on the same code paths (CPU test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a key of params/full.yaml, as segstudy's --set (e.g. data.batch_size=4); repeatable")
    p.add_argument("--iters", type=int, help="loader phase iterations (default 100)")
    p.add_argument("--warmup", type=int, help="warm-up steps per timed row, not timed (default 5)")
    p.add_argument("--steps", type=int, help="timed steps per model row (default 20)")
    p.add_argument("--amp", help="train.amp for every row but tf32 (default: the profile's, auto)")
    p.add_argument("--ddp", choices=("auto", "always", "never"), default="auto",
                   help="the 2-rank training: auto with two GPUs visible, always also on CPU (gloo)")
    p.add_argument("--budget", type=float, default=285.0,
                   help="seconds for the whole check after the imports (default 285: 5 minutes in all)")
    p.add_argument("--out", type=Path, help="JSON file (default outputs/gpu_check.json, _tiny with --tiny)")
    args = p.parse_args(argv)
    preset = dict(TINY if args.tiny else FULL)
    preset.update({k: v for k in ("iters", "warmup", "steps") if (v := getattr(args, k)) is not None})
    if min(preset["iters"], preset["steps"]) < 1 or preset["warmup"] < 0 or preset["iters"] < 2:
        p.error("--iters must be at least 2, --steps at least 1 and --warmup at least 0")
    args.user = parse_overrides(args.set) | {k: v for k, v in (("device", args.device), ("train.amp", args.amp)) if v}
    args.out = args.out or REPO / "outputs" / ("gpu_check_tiny.json" if args.tiny else "gpu_check.json")
    return args, preset


def run_phases(cfg: Config, preset: dict, args: argparse.Namespace, tmp: Path, budget: Budget, result: dict) -> None:
    """The phases in turn; the JSON is rewritten after each."""
    device, rows = resolve_device(cfg.device), result["rows"]
    amp = autocast_dtype(cfg.train.amp, device)
    train_ds = training_set(cfg)
    criterion = build_criterion(cfg, train_ds)
    print(f"[1/3] every model at {cfg.data.crop_size[1]}x{cfg.data.crop_size[0]}, batch {cfg.data.batch_size}, "
          f"{_dtype_name(amp)}, then {cfg.model.name} in TF32 ({preset['warmup']} warm-up + {preset['steps']} steps)")
    rows += phase_models(cfg, preset, criterion, device, amp, budget)
    _write(args.out, result | {"elapsed_s": budget.elapsed()})
    print(f"[2/3] {preset['iters']} iterations of {cfg.model.name} from the DataLoader ({cfg.data.num_workers} "
          f"workers) over {len(train_ds)} generated {preset['width']}x{preset['height']} images, then evaluation")
    model, model_row = build(cfg, cfg.model.name, device), next(r for r in rows if r["model"] == cfg.model.name)
    rows.append(_row("loader", _guarded("loader", phase_loader, cfg, preset, model, train_ds, criterion, device, amp,
                                        model_row, budget.deadline(SHARES["loader"])), args.tiny))
    _write(args.out, result | {"elapsed_s": budget.elapsed()})
    evaluated = {"error": "not run: the loader phase failed"} if rows[-1].get("error") else \
        _guarded("eval", phase_eval, cfg, model, device, amp, budget.deadline(SHARES["eval"]))
    rows.append(_row("eval", evaluated))
    del model
    _free(device)
    _write(args.out, result | {"elapsed_s": budget.elapsed()})
    rows.append(ddp_row(cfg, preset, args.ddp, device, tmp / "runs" / "ddp"))


def ddp_row(cfg: Config, preset: dict, choice: str, device: torch.device, run_dir: Path) -> dict:
    if not ddp_wanted(choice, device):
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        return {"check": "ddp", "status": "SKIP",
                "skipped": f"{gpus} GPU(s) visible, 2 needed" if choice == "auto" else "--ddp never"}
    print("[3/3] 2-rank training under torchrun (engine.launch)")
    return _row("ddp", _guarded("ddp", phase_ddp, cfg, preset, run_dir))


def main(argv: list[str] | None = None) -> int:
    args, preset = parse(argv)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        try:
            cfg = check_config(Path(tmp) / "cityscapes", Path(tmp) / "outputs", preset, args.user)
        except UserError as exc:
            print(f"gpu_check: error: {exc}", file=sys.stderr)
            return 2
        try:
            device = resolve_device(cfg.device)
        except UserError as exc:  # no usable GPU: why, and the fix (engine.device)
            print(f"gpu_check: error: {exc}; to run the check's code on CPU: --device cpu --tiny", file=sys.stderr)
            return 2
        return check(cfg, preset, args, device, Path(tmp))


def check(cfg: Config, preset: dict, args: argparse.Namespace, device: torch.device, tmp: Path) -> int:
    faulthandler.dump_traceback_later(args.budget, exit=True)  # the hard limit: a hung step cannot outlive --budget
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens when the output is piped
    budget = Budget(args.budget)
    fixed_shape_kernels(device)  # cudnn.benchmark on CUDA, as training sets it
    stamp = {k: v for k, v in provenance.stamp(cfg).items() if k not in ("profile", "overrides")}
    result = {"machine": machine_info(device), "provenance": stamp, "rows": [],
              "settings": {"profile": PROFILE, "overrides": {k: str(v) for k, v in cfg.overrides.items()},
                           "crop_size": cfg.data.crop_size, "batch_size": cfg.data.batch_size,
                           "amp": _dtype_name(autocast_dtype(cfg.train.amp, device)),
                           "channels_last": cfg.train.channels_last, "optimizer": cfg.train.optimizer,
                           "tiny": args.tiny, "ddp": args.ddp, "budget_s": args.budget, **preset}}
    _print_machine(result["machine"])
    seconds = generated_files(Path(cfg.data.root), preset, cfg)
    result["settings"]["generation_s"] = seconds
    print(f"generated {preset['train_images']} + {cfg.data.batch_size} images at {preset['width']}x"
          f"{preset['height']} in {seconds:.0f} s; budget {args.budget:.0f} s: each phase stops early at its share")
    run_phases(cfg, preset, args, tmp, budget, result)
    result["rows"].append({"check": "within budget", "elapsed_s": budget.elapsed(),
                           "status": "PASS" if budget.elapsed() <= args.budget else "FAIL"})
    faulthandler.cancel_dump_traceback_later()
    result["elapsed_s"] = budget.elapsed()
    result["checks"] = {r["check"]: r["status"] for r in result["rows"]}
    result["passed"] = "FAIL" not in result["checks"].values()
    _write(args.out, result)
    print(table(result))
    print("wrote", args.out)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
