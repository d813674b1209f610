"""Training and evaluation, after torchvision's segmentation references: plain functions,
SGD (or AdamW) with warm-up + poly LR stepped every iteration, aux loss at 0.5, backbone and
heads in separate parameter groups (aux head at 10x lr), checkpoints holding everything needed
to resume exactly, and DDP under torchrun.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from segstudy.config import Config
from segstudy.data.datasets import build_dataset, build_loader, check_files, prepare_data, seed_everything
from segstudy.data.labels import NUM_CLASSES
from segstudy.engine import measure, provenance, run_folder
from segstudy.engine.device import autocast_dtype, init_distributed, resolve_device
from segstudy.engine.evaluation import confusion_over, validate
from segstudy.errors import UserError
from segstudy.models.checkpoint import (
    check_meta,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from segstudy.models.losses import build_loss, class_weights, count_pixels, with_aux
from segstudy.models.networks import build_model
from segstudy.tracking import Tracker


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


class DivergenceGuard:
    """A loss that is NaN/inf, or 1000x the run's first loss, has diverged: a checkpoint written
    after it would keep weights that are already ruined."""

    def __init__(self, first: float | None = None, factor: float = 1e3):
        self.first, self.factor = first, factor

    def __call__(self, loss: float) -> None:
        if self.first is None and math.isfinite(loss):
            self.first = loss
        if not math.isfinite(loss) or loss > self.factor * max(self.first, 1e-3):
            raise FloatingPointError(f"{loss:.3g}")


def train_one_epoch(net: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, loader, device: torch.device, *, amp_dtype: torch.dtype | None,
                    channels_last: bool, grad_accum: int, max_batches: int,
                    on_step: Callable[[float, int], bool],
                    guard: Callable[[float], None] | None = None) -> tuple[float, int, bool]:
    """One pass over `loader` (at most `max_batches`), stepping optimiser and LR every `grad_accum`
    batches. `on_step(loss, images seen)` runs after each optimiser step; True stops the epoch.
    Returns (mean loss, images seen on this rank, stopped). A diverged loss (`guard`, by default a
    NaN/inf check) raises FloatingPointError before it reaches the weights."""
    guard = guard or DivergenceGuard()
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
        value = loss.item()
        guard(value)
        scaler.scale(loss / grad_accum).backward()
        seen += image.shape[0]
        total += value
        batches += 1
        if (i + 1) % grad_accum == 0:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if on_step(loss.item(), seen):
                return total / batches, seen, True
    return total / max(batches, 1), seen, False


def _reused_result(run_dir: Path) -> dict | None:
    if result := run_folder.finished_result(run_dir):
        print(f"[segstudy] reusing the finished run in {run_dir} (set train.reuse: false to retrain)")
        return result | {"reused": True}
    return None


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    tcfg = cfg.train
    groups = param_groups(model, tcfg.lr)
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    raise UserError(f"train.optimizer = '{tcfg.optimizer}'; choose sgd or adamw")


@dataclasses.dataclass
class TrainingRun:
    """One training's moving parts, built by `_build_run` in the order the seed expects."""

    cfg: Config
    mcfg: object
    device: torch.device
    rank: int
    world: int
    amp_dtype: torch.dtype | None
    train_ds: object
    val_loader: object
    train_sampler: DistributedSampler | None
    criterion: Callable
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    meta: dict
    epoch: int = 0  # epochs finished (the next one to run)
    step: int = 0
    best_miou: float = -1.0
    history: list = dataclasses.field(default_factory=list)
    guard: DivergenceGuard = dataclasses.field(default_factory=DivergenceGuard)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _build_run(cfg: Config, mcfg, device: torch.device) -> TrainingRun:
    tcfg = cfg.train
    rank, world = init_distributed(device)
    amp_dtype = autocast_dtype(tcfg.amp, device)
    if rank == 0:
        prepare_data(cfg)
    if world > 1:
        dist.barrier()
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_ds = build_dataset(cfg.data, cfg.data.val_split)
    check_files(train_ds, cfg.data.train_split)
    check_files(val_ds, cfg.data.val_split)
    seed_everything(cfg.seed)
    criterion = build_criterion(cfg, train_ds)
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg)).to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    train_sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    val_sampler = DistributedSampler(val_ds, world, rank, shuffle=False) if world > 1 else None
    per_rank_batches = (len(train_sampler) if train_sampler else len(train_ds)) // cfg.data.batch_size
    steps_per_epoch = per_rank_batches // tcfg.grad_accum
    if steps_per_epoch < 1:
        raise UserError(f"data.batch_size x train.grad_accum = {cfg.data.batch_size * tcfg.grad_accum} is larger "
                        f"than the {len(train_ds)} training images; lower them")
    schedule = poly_schedule(tcfg.epochs * steps_per_epoch, tcfg.warmup_iters, tcfg.poly_power)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    meta = {"model": mcfg.name, "num_classes": NUM_CLASSES, "model_config": dataclasses.asdict(mcfg)}
    val_loader = build_loader(val_ds, cfg.data.batch_size, train=False, seed=cfg.seed,
                              num_workers=cfg.data.num_workers, device=device.type, sampler=val_sampler)
    return TrainingRun(cfg, mcfg, device, rank, world, amp_dtype, train_ds, val_loader, train_sampler, criterion,
                       model, model, optimizer, scheduler, scaler, steps_per_epoch, meta)


def _resume(run: TrainingRun, latest: Path) -> None:
    """Model, optimizer, scheduler, scaler, RNG, epoch, step and history from `latest`."""
    if not latest.is_file() and run_folder.finished(latest.parent):
        raise UserError(f"the run in {latest.parent} finished, so it keeps no state to resume from (its weights "
                        f"are checkpoint_best.pt); to train longer, retrain with more train.epochs")
    ckpt = load_checkpoint(latest)
    check_meta(ckpt, run.mcfg.name, NUM_CLASSES, latest)
    load_model_state(run.model, ckpt["model"], latest)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["lr_scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    run.epoch, run.step, run.best_miou = ckpt["epoch"], ckpt["step"], ckpt["best_miou"]
    run.history = json.loads(ckpt["history"])
    run.guard = DivergenceGuard(run.history[0]["train_loss"] if run.history else None)
    print(f"[segstudy] resumed {run.mcfg.name} from {latest} at epoch {run.epoch}, step {run.step}")


def _wrap(run: TrainingRun) -> None:
    """DDP across processes, then torch.compile, around the model the checkpoints hold."""
    net = nn.parallel.DistributedDataParallel(run.model) if run.world > 1 else run.model
    run.net = torch.compile(net) if run.cfg.train.compile else net


def _tracker(run: TrainingRun) -> Tracker:
    cfg, name = run.cfg, run.mcfg.name
    tracking = cfg.tracking if run.main else dataclasses.replace(cfg.tracking, backend="none")
    params = cfg.to_dict() | {"model": run.meta["model_config"]}
    return Tracker(tracking, cfg.output_root, f"{cfg.profile}-{name}", params,
                   tags={"profile": cfg.profile, "model": name, "loss": cfg.loss.name}
                   | ({"sweep": cfg.tracking.sweep} if cfg.tracking.sweep else {})
                   | provenance.as_tags(provenance.stamp(cfg)))


def _run_epoch(run: TrainingRun, tracker: Tracker, latest: Path, progress: bool) -> tuple[float, int, bool, float]:
    """One epoch of `run` (stopping at train.max_steps): (mean loss, images seen, stopped, seconds)."""
    cfg, tcfg, epoch = run.cfg, run.cfg.train, run.epoch
    torch.manual_seed(cfg.seed + epoch)  # each epoch's randomness depends on (seed, epoch) only
    if run.train_sampler:
        run.train_sampler.set_epoch(epoch)
    loader = build_loader(run.train_ds, cfg.data.batch_size, train=True, seed=cfg.seed + epoch,
                          num_workers=cfg.data.num_workers, device=run.device.type, sampler=run.train_sampler)
    bar = tqdm(total=run.steps_per_epoch, desc=f"{run.mcfg.name} epoch {epoch + 1}/{tcfg.epochs}",
               disable=not (progress and run.main), mininterval=2.0)
    t0 = time.perf_counter()

    def on_step(loss: float, seen: int) -> bool:
        run.step += 1
        lr = run.scheduler.get_last_lr()[0]
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                        img_s=f"{seen * run.world / (time.perf_counter() - t0):.1f}")
        tracker.log_metrics({"train_loss": loss, "lr": lr}, run.step)
        return bool(tcfg.max_steps) and run.step >= tcfg.max_steps

    try:
        mean_loss, seen, stopped = train_one_epoch(
            run.net, run.criterion, run.optimizer, run.scheduler, run.scaler, loader, run.device,
            amp_dtype=run.amp_dtype, channels_last=tcfg.channels_last, grad_accum=tcfg.grad_accum,
            max_batches=run.steps_per_epoch * tcfg.grad_accum, on_step=on_step, guard=run.guard)
    except FloatingPointError as exc:
        raise UserError(f"the loss diverged ({exc}) at step {run.step + 1} (epoch {epoch + 1}) of {run.mcfg.name}; "
                        f"training stopped, the last good checkpoint is kept "
                        f"({latest if latest.is_file() else 'none yet'}); lower train.lr or "
                        f"use train.amp: none") from None
    bar.close()
    return mean_loss, seen * run.world, stopped, time.perf_counter() - t0


def _validate_epoch(run: TrainingRun, tracker: Tracker) -> dict:
    metrics = confusion_over(run.model, run.val_loader, run.device, run.amp_dtype,
                             run.cfg.train.channels_last).compute()
    tracker.log_metrics({"val_miou": metrics["miou"], "val_pixel_acc": metrics["pixel_acc"]}
                        | {f"val_iou_{k}": v for k, v in metrics["iou"].items()}, run.step)
    return {"val_miou": metrics["miou"], "val_pixel_acc": metrics["pixel_acc"], "val_iou": metrics["iou"]}


def _save_epoch(run: TrainingRun, record: dict, run_dir: Path) -> None:
    """latest (the full state to resume from, always) and best (weights, when validation improved)."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "lr_scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
             "epoch": run.epoch, "step": run.step, "rng": rng_state(), "meta": run.meta,
             "history": json.dumps(run.history), "best_miou": run.best_miou}
    if record.get("val_miou", -1) > run.best_miou:
        run.best_miou = state["best_miou"] = record["val_miou"]
        # weights only: what predict, serving and the later notebooks load (a third of the full state)
        save_checkpoint({k: state[k] for k in ("model", "meta", "epoch", "step", "best_miou", "history")},
                        run_dir / "checkpoint_best.pt")
    save_checkpoint(state, run_dir / "checkpoint_latest.pt")


def _report(run: TrainingRun, record: dict) -> None:
    print(f"[segstudy] {run.mcfg.name} epoch {record['epoch']}: loss {record['train_loss']:.3f}"
          + (f", val mIoU {record['val_miou'] * 100:.2f}" if "val_miou" in record else "")
          + f", {record['img_per_s']:.1f} img/s")


def train(cfg: Config, model_name: str | None = None, resume: bool = False, run_dir: str | Path | None = None,
          progress: bool = True, keep_weights: bool = True) -> dict:
    """Train cfg.model (or `model_name`) on cfg.data; returns the run's result (also result.json),
    whose checkpoint_best the caller may register (deploy.registry).

    With train.reuse and a finished run in `run_dir`, the saved result is returned instead. One
    process at a time trains into a run folder, and a retry replaces a finished run only when it
    finishes too (engine.run_folder). A finished run keeps checkpoint_best.pt (weights), or nothing
    with keep_weights=False; the resumable state (checkpoint_latest.pt) only lives while it trains.
    """
    mcfg = dataclasses.replace(cfg.model, name=model_name or cfg.model.name)
    run_dir = Path(run_dir) if run_dir else cfg.output_dir / "runs" / mcfg.name
    if cfg.train.reuse and not resume and (saved := _reused_result(run_dir)):
        return saved
    run = _build_run(cfg, mcfg, resolve_device(cfg.device))
    with run_folder.lock(run_dir) if run.main else contextlib.nullcontext():
        work_dir = run_folder.work_folder(run_dir, resume) if run.main else run_dir
        if resume:
            _resume(run, run_dir / "checkpoint_latest.pt")
        _wrap(run)
        tracker = _tracker(run)
        finished, seconds, images = _epochs(run, tracker, work_dir, resume, progress)
        result = _finish(run, tracker, run_dir if finished else work_dir, finished, seconds, images)
        if run.main:
            if finished:
                _drop_training_state(work_dir, keep_weights, result)
            _write_result(result, work_dir)
            if finished:
                run_folder.promote(work_dir, run_dir)
    return result


def _drop_training_state(work_dir: Path, keep_weights: bool, result: dict) -> None:
    """A finished run needs no optimizer state; without keep_weights, no weights either."""
    (work_dir / "checkpoint_latest.pt").unlink(missing_ok=True)
    if not keep_weights:
        (work_dir / "checkpoint_best.pt").unlink(missing_ok=True)
        result["checkpoint_best"] = None


def _epochs(run: TrainingRun, tracker: Tracker, work_dir: Path, resume: bool,
            progress: bool) -> tuple[bool, float, int]:
    """The epoch loop: (finished, training seconds, images seen). A failure marks the run FAILED."""
    tcfg = run.cfg.train
    status, stopped, train_seconds, images_seen = "FAILED", False, 0.0, 0
    try:
        for epoch in range(run.epoch, tcfg.epochs):
            mean_loss, seen, stopped, seconds = _run_epoch(run, tracker, work_dir / "checkpoint_latest.pt", progress)
            train_seconds, images_seen = train_seconds + seconds, images_seen + seen
            if stopped:
                break  # an interruption: the latest checkpoint stays at the last finished epoch
            run.epoch = epoch + 1
            record = {"epoch": run.epoch, "step": run.step, "train_loss": mean_loss, "img_per_s": seen / seconds}
            if run.epoch % tcfg.val_every == 0 or run.epoch == tcfg.epochs:
                record |= _validate_epoch(run, tracker)
            run.history.append(record)
            if run.main:
                _save_epoch(run, record, work_dir)
                _report(run, record)
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            tracker.finish("FAILED")
    return not stopped, train_seconds, images_seen


def _finish(run: TrainingRun, tracker: Tracker, run_dir: Path, finished: bool, train_seconds: float,
            images_seen: int) -> dict:
    """The run's result; a finished run also gets its latency at the evaluation size."""
    history = run.history
    result = {"model": run.mcfg.name, "profile": run.cfg.profile, "finished": finished, "steps": run.step,
              "epochs": len(history), "history": history, "best_miou": run.best_miou,
              "final": history[-1] if history else {}, "train_seconds": train_seconds,
              "train_img_per_s": images_seen / train_seconds if train_seconds else float("nan"),
              "parameters": measure.parameters(run.model), "run_dir": str(run_dir),
              "checkpoint_best": str(run_dir / "checkpoint_best.pt"), "mlflow_run_id": tracker.run_id}
    if run.main and finished:
        size = run.cfg.data.base_size
        lat = measure.latency(run.model, size, 2 * size, run.device, warmup=1, iters=3)
        result["latency_ms_eval_size"] = lat["median_ms"]
        tracker.log_metrics({"latency_ms": lat["median_ms"]}, run.step)
    tracker.finish()
    return result


def _write_result(result: dict, work_dir: Path) -> None:
    (work_dir / "result.json").write_text(json.dumps(result, indent=2, default=lambda v: None if v != v else v))


def finetune(model: nn.Module, cfg: Config, epochs: float, *, lr: float | None = None,
             teacher: nn.Module | None = None, kd_temperature: float = 1.0, kd_weight: float = 0.0,
             amp: str | None = None, channels_last: bool | None = None, progress: bool = True,
             desc: str = "finetune") -> dict:
    """Train an existing model in place (pruned, quantization-aware, ...) with cfg's loss for
    `epochs` (fractions allowed), AdamW at `lr` (default cfg.train.lr / 10) with a poly decay, then
    validate. With a teacher, the loss is (1 - kd_weight) x task + kd_weight x pixel-wise KD.
    Returns {"miou", "iou", "history", "train_seconds", "img_per_s"}."""
    from segstudy.models.losses import Distiller, with_kd

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
