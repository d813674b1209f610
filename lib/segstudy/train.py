"""Training and evaluation, after torchvision's segmentation references: plain functions,
SGD (or AdamW) with warm-up + poly LR stepped every iteration, aux loss at 0.5, backbone and
heads in separate parameter groups (aux head at 10x lr), checkpoints holding everything needed
to resume exactly, and DDP under torchrun.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from segstudy import measure
from segstudy.checkpoint import check_meta, load_checkpoint, load_model_state, rng_state, save_checkpoint, set_rng_state
from segstudy.config import Config
from segstudy.datasets import build_dataset, build_loader, prepare_data, seed_everything
from segstudy.errors import UserError
from segstudy.labels import NUM_CLASSES
from segstudy.losses import build_loss, class_weights, count_pixels, with_aux
from segstudy.metrics import ConfusionMatrix
from segstudy.models import build_model
from segstudy.tracking import Tracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device = '{name}' but no CUDA GPU is visible; set device: cpu or auto")
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def build_criterion(cfg: Config, train_ds) -> Callable:
    """cfg.loss on "out" (+ train.aux_weight x on "aux"); class weights for wce are counted once
    per dataset and cached under outputs/cache/."""
    weights = None
    if cfg.loss.name == "wce":
        tag = hashlib.sha1(f"{cfg.data.root}:{cfg.data.train_split}".encode()).hexdigest()[:12]
        counts = count_pixels(train_ds, Path(cfg.output_root) / "cache" / f"pixel_counts_{tag}.json")
        weights = class_weights(counts, cfg.loss.weighting)
    return with_aux(build_loss(cfg.loss, weights), cfg.train.aux_weight)


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    named = dict(model.named_parameters())
    groups = {"backbone": [], "head": [], "aux": []}
    for name, p in named.items():
        if not p.requires_grad:
            continue
        key = "aux" if name.startswith("aux_classifier") else "backbone" if name.startswith("backbone") else "head"
        groups[key].append(p)
    scale = {"backbone": 1.0, "head": 1.0, "aux": 10.0}
    return [{"params": ps, "lr": lr * scale[k], "name": k} for k, ps in groups.items() if ps]


def poly_schedule(total_steps: int, warmup: int, power: float):
    def factor(step: int) -> float:
        if step < warmup:
            return 0.001 + (1 - 0.001) * step / warmup
        return max(0.0, 1 - (step - warmup) / max(1, total_steps - warmup)) ** power
    return factor


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the hardware has it natively (CUDA, or a CPU with AVX-512 BF16 / AMX),
    else fp16 on older GPUs and full precision on CPUs without bf16, where bf16 is slower."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        info = measure.cpu_info()
        return torch.bfloat16 if info["avx512_bf16"] or info["amx_bf16"] else None
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("train.amp = fp16 needs a CUDA GPU; use bf16 on CPU or none")
        return torch.float16
    raise UserError(f"train.amp = '{amp}'; choose auto, none, bf16 or fp16")


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, progress: bool = False) -> ConfusionMatrix:
    model.eval()
    cm = ConfusionMatrix(NUM_CLASSES, device=device)
    for image, target in tqdm(loader, desc="val", leave=False, disable=not progress, mininterval=2.0):
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(image)["out"]
        cm.update(target, logits.argmax(1))
    cm.reduce_from_all_processes()
    return cm


def train_one_epoch(net: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, loader, device: torch.device, *, amp_dtype: torch.dtype | None,
                    channels_last: bool, grad_accum: int, max_batches: int,
                    on_step: Callable[[float, int], bool]) -> tuple[float, int, bool]:
    """One pass over `loader` (at most `max_batches`), stepping optimiser and LR every `grad_accum`
    batches. `on_step(loss, images seen)` runs after each optimiser step; True stops the epoch.
    Returns (mean loss, images seen on this rank, stopped). A NaN/inf loss raises FloatingPointError
    before it reaches the weights."""
    net.train()
    seen, total, batches = 0, 0.0, 0
    for i, (image, target) in enumerate(loader):
        if i >= max_batches:
            break
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(net(image), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(loss.item())
        scaler.scale(loss / grad_accum).backward()
        seen += image.shape[0]
        total += loss.item()
        batches += 1
        if (i + 1) % grad_accum == 0:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if on_step(loss.item(), seen):
                return total / batches, seen, True
    return total / max(batches, 1), seen, False


def _archive_previous(run_dir: Path) -> None:
    """A fresh run replaces an earlier one only once it has a checkpoint of its own; the earlier
    run is kept as <run_dir>.previous (one generation), so a failed retrain loses nothing."""
    previous = run_dir.with_name(run_dir.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    run_dir.rename(previous)
    run_dir.mkdir(parents=True)
    print(f"[segstudy] the earlier run in {run_dir} was moved to {previous}")


def train(cfg: Config, model_name: str | None = None, resume: bool = False, run_dir: str | Path | None = None,
          progress: bool = True) -> dict:
    """Train cfg.model (or `model_name`) on cfg.data; returns the run's result (also result.json).

    With train.reuse and a finished run in `run_dir`, the saved result is returned instead.
    """
    mcfg = dataclasses.replace(cfg.model, name=model_name or cfg.model.name)
    tcfg = cfg.train
    run_dir = Path(run_dir) if run_dir else cfg.output_dir / "runs" / mcfg.name
    latest, best = run_dir / "checkpoint_latest.pt", run_dir / "checkpoint_best.pt"
    result_file = run_dir / "result.json"
    if tcfg.reuse and not resume and result_file.is_file():
        result = json.loads(result_file.read_text())
        if result.get("finished"):
            print(f"[segstudy] reusing the finished run in {run_dir} (set train.reuse: false to retrain)")
            return result | {"reused": True}

    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    main = rank == 0
    amp_dtype = autocast_dtype(tcfg.amp, device)
    if main:
        prepare_data(cfg)
    if world > 1:
        dist.barrier()
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_ds = build_dataset(cfg.data, cfg.data.val_split)
    seed_everything(cfg.seed)
    criterion = build_criterion(cfg, train_ds)
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg)).to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups(model, tcfg.lr)
    if tcfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    elif tcfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    else:
        raise UserError(f"train.optimizer = '{tcfg.optimizer}'; choose sgd or adamw")
    train_sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    val_sampler = DistributedSampler(val_ds, world, rank, shuffle=False) if world > 1 else None
    per_rank_batches = (len(train_sampler) if train_sampler else len(train_ds)) // cfg.data.batch_size
    steps_per_epoch = per_rank_batches // tcfg.grad_accum
    if steps_per_epoch < 1:
        raise UserError(f"data.batch_size x train.grad_accum = {cfg.data.batch_size * tcfg.grad_accum} is larger "
                        f"than the {len(train_ds)} training images; lower them")
    total_steps = tcfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(total_steps, tcfg.warmup_iters,
                                                                           tcfg.poly_power))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, step, best_miou, history = 0, 0, -1.0, []
    meta = {"model": mcfg.name, "num_classes": NUM_CLASSES, "model_config": dataclasses.asdict(mcfg)}
    if resume:
        ckpt = load_checkpoint(latest)
        check_meta(ckpt, mcfg.name, NUM_CLASSES, latest)
        load_model_state(model, ckpt["model"], latest)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch, step, best_miou = ckpt["epoch"], ckpt["step"], ckpt["best_miou"]
        history = json.loads(ckpt["history"])
        print(f"[segstudy] resumed {mcfg.name} from {latest} at epoch {start_epoch}, step {step}")
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if tcfg.compile:
        net = torch.compile(net)
    val_loader = build_loader(val_ds, cfg.data.batch_size, train=False, seed=cfg.seed,
                              num_workers=cfg.data.num_workers, device=device.type, sampler=val_sampler)

    tracker = Tracker(cfg.tracking if main else dataclasses.replace(cfg.tracking, backend="none"),
                      cfg.output_root, f"{cfg.profile}-{mcfg.name}", cfg.to_dict() | {"model": meta["model_config"]},
                      tags={"profile": cfg.profile, "model": mcfg.name, "loss": cfg.loss.name}
                      | ({"sweep": cfg.tracking.sweep} if cfg.tracking.sweep else {}))
    status, stopped_early, train_seconds, images_seen = "FAILED", False, 0.0, 0
    try:
        for epoch in range(start_epoch, tcfg.epochs):
            torch.manual_seed(cfg.seed + epoch)  # each epoch's randomness depends on (seed, epoch) only
            if train_sampler:
                train_sampler.set_epoch(epoch)
            loader = build_loader(train_ds, cfg.data.batch_size, train=True, seed=cfg.seed + epoch,
                                  num_workers=cfg.data.num_workers, device=device.type, sampler=train_sampler)
            bar = tqdm(total=steps_per_epoch, desc=f"{mcfg.name} epoch {epoch + 1}/{tcfg.epochs}",
                       disable=not (progress and main), mininterval=2.0)
            t0 = time.perf_counter()

            def on_step(loss: float, seen: int, bar=bar, t0=t0) -> bool:
                nonlocal step
                step += 1
                lr = scheduler.get_last_lr()[0]
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{seen * world / (time.perf_counter() - t0):.1f}")
                tracker.log_metrics({"train_loss": loss, "lr": lr}, step)
                return bool(tcfg.max_steps) and step >= tcfg.max_steps

            try:
                mean_loss, seen, stopped_early = train_one_epoch(
                    net, criterion, optimizer, scheduler, scaler, loader, device, amp_dtype=amp_dtype,
                    channels_last=tcfg.channels_last, grad_accum=tcfg.grad_accum,
                    max_batches=steps_per_epoch * tcfg.grad_accum, on_step=on_step)
            except FloatingPointError as exc:
                raise UserError(f"the loss became {exc} at step {step} (epoch {epoch + 1}) of {mcfg.name}; "
                                f"training stopped, the last good checkpoint is kept "
                                f"({latest if latest.is_file() else 'none yet'}); lower train.lr or "
                                f"use train.amp: none") from None
            seen *= world
            bar.close()
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            images_seen += seen
            if stopped_early:
                break  # an interruption: the latest checkpoint stays at the last finished epoch
            record = {"epoch": epoch + 1, "step": step, "train_loss": mean_loss,
                      "img_per_s": seen / epoch_seconds}
            if (epoch + 1) % tcfg.val_every == 0 or epoch + 1 == tcfg.epochs:
                metrics = evaluate(model, val_loader, device, amp_dtype, tcfg.channels_last).compute()
                record |= {"val_miou": metrics["miou"], "val_pixel_acc": metrics["pixel_acc"],
                           "val_iou": metrics["iou"]}
                tracker.log_metrics({"val_miou": metrics["miou"], "val_pixel_acc": metrics["pixel_acc"]}
                                    | {f"val_iou_{k}": v for k, v in metrics["iou"].items()}, step)
            history.append(record)
            if main:
                if not resume and epoch == start_epoch and run_dir.is_dir() and any(run_dir.iterdir()):
                    _archive_previous(run_dir)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch + 1, "step": step, "rng": rng_state(), "meta": meta,
                         "history": json.dumps(history), "best_miou": best_miou}
                if record.get("val_miou", -1) > best_miou:
                    best_miou = state["best_miou"] = record["val_miou"]
                    save_checkpoint(state, best)
                save_checkpoint(state, latest)
            if main:
                print(f"[segstudy] {mcfg.name} epoch {epoch + 1}: loss {record['train_loss']:.3f}"
                      + (f", val mIoU {record['val_miou'] * 100:.2f}" if "val_miou" in record else "")
                      + f", {record['img_per_s']:.1f} img/s")
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            tracker.finish("FAILED")
    result = {"model": mcfg.name, "profile": cfg.profile, "finished": not stopped_early, "steps": step,
              "epochs": len(history), "history": history, "best_miou": best_miou,
              "final": history[-1] if history else {}, "train_seconds": train_seconds,
              "train_img_per_s": images_seen / train_seconds if train_seconds else float("nan"),
              "parameters": measure.parameters(model), "run_dir": str(run_dir),
              "checkpoint_best": str(best), "mlflow_run_id": tracker.run_id}
    if main and not stopped_early:
        size = cfg.data.base_size
        lat = measure.latency(model, size, 2 * size, device, warmup=1, iters=3)
        result["latency_ms_eval_size"] = lat["median_ms"]
        tracker.log_metrics({"latency_ms": lat["median_ms"]}, step)
        result["model_uri"] = tracker.log_model(model, f"segstudy-{mcfg.name}")
    tracker.finish()
    if main:
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(result, indent=2, default=lambda v: None if v != v else v))
    return result




def validate(model: nn.Module, cfg: Config, *, amp: str = "none", channels_last: bool = False) -> dict:
    """Score a model on cfg's validation split (CPU or cfg.device): ConfusionMatrix.compute()."""
    device = resolve_device(cfg.device)
    val_ds = build_dataset(cfg.data, cfg.data.val_split)
    loader = build_loader(val_ds, cfg.data.batch_size, train=False, seed=cfg.seed,
                          num_workers=cfg.data.num_workers, device=device.type)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return evaluate(model, loader, device, autocast_dtype(amp, device), channels_last).compute()


def finetune(model: nn.Module, cfg: Config, epochs: float, *, lr: float | None = None,
             teacher: nn.Module | None = None, kd_temperature: float = 1.0, kd_weight: float = 0.0,
             amp: str | None = None, channels_last: bool | None = None, progress: bool = True,
             desc: str = "finetune") -> dict:
    """Train an existing model in place (pruned, quantization-aware, ...) with cfg's loss for
    `epochs` (fractions allowed), AdamW at `lr` (default cfg.train.lr / 10) with a poly decay, then
    validate. With a teacher, the loss is (1 - kd_weight) x task + kd_weight x pixel-wise KD.
    Returns {"miou", "iou", "history", "train_seconds", "img_per_s"}."""
    from segstudy.losses import Distiller, with_kd

    if epochs <= 0:
        raise UserError(f"fine-tune epochs = {epochs}; it must be > 0")
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.train.amp if amp is None else amp, device)
    channels_last = cfg.train.channels_last if channels_last is None else channels_last
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    seed_everything(cfg.seed)
    criterion = build_criterion(cfg, train_ds)
    model = model.to(device)
    net: nn.Module = model
    if teacher is not None and kd_weight > 0:
        net = Distiller(model, copy.deepcopy(teacher).to(device))  # the caller's teacher stays untouched
        criterion = with_kd(criterion, kd_temperature, kd_weight)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    lr = lr if lr is not None else cfg.train.lr / 10
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=cfg.train.weight_decay)
    steps_per_epoch = len(train_ds) // cfg.data.batch_size
    total = max(1, round(epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(total, 0, cfg.train.poly_power))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    history, step, seconds, seen_all = [], 0, 0.0, 0
    for epoch in range(int(-(-total // steps_per_epoch))):
        torch.manual_seed(cfg.seed + epoch)
        loader = build_loader(train_ds, cfg.data.batch_size, train=True, seed=cfg.seed + epoch,
                              num_workers=cfg.data.num_workers, device=device.type)
        bar = tqdm(total=min(steps_per_epoch, total - step), desc=f"{desc} epoch {epoch + 1}",
                   disable=not progress, mininterval=2.0)

        def on_step(loss: float, seen: int, bar=bar) -> bool:
            nonlocal step
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            return step >= total

        t0 = time.perf_counter()
        mean_loss, seen, _ = train_one_epoch(net, criterion, optimizer, scheduler, scaler, loader, device,
                                             amp_dtype=amp_dtype, channels_last=channels_last, grad_accum=1,
                                             max_batches=steps_per_epoch, on_step=on_step)
        bar.close()
        seconds += time.perf_counter() - t0
        seen_all += seen
        history.append({"epoch": epoch + 1, "step": step, "train_loss": mean_loss})
    model.eval()
    metrics = validate(model, cfg, amp=cfg.train.amp if amp is None else amp, channels_last=channels_last)
    return {"miou": metrics["miou"], "iou": metrics["iou"], "history": history, "train_seconds": seconds,
            "img_per_s": seen_all / seconds if seconds else float("nan")}
