"""A training run, after torchvision's segmentation references (the step itself: engine.optimization):
epochs of a seeded sample order, validation, checkpoints holding everything needed to continue
exactly, also part-way through an epoch (train.checkpoint_every), reuse of a finished run and
continuation of an interrupted one (engine.run_folder), and DDP under torchrun (engine.launch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from segstudy.config import Config
from segstudy.data.cityscapes import SegmentationFolder
from segstudy.data.datasets import (
    EpochOrder,
    SeededSamples,
    build_dataset,
    build_loader,
    check_files,
    check_labels,
    epoch_size,
    parts,
    prepare_data,
    seed_everything,
    training_datasets,
    training_set,
)
from segstudy.data.labels import NUM_CLASSES
from segstudy.data.shared_memory import check_shared_memory
from segstudy.engine import launch, measure, provenance, run_folder, timings
from segstudy.engine.device import autocast_dtype, init_distributed, resolve_device
from segstudy.engine.evaluation import confusion_over, eval_loader
from segstudy.engine.optimization import (
    DivergenceGuard,
    build_criterion,
    build_optimizer,
    poly_schedule,
    train_one_epoch,
)
from segstudy.errors import UserError
from segstudy.files import atomic_path, write_json
from segstudy.models.checkpoint import (
    check_meta,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from segstudy.models.networks import backbone_init, build_model
from segstudy.tracking import Tracker


def _reused_result(run_dir: Path, cfg: Config, mcfg) -> dict | None:
    """run_folder.reusable, said on the terminal."""
    result, why_not = run_folder.reusable(run_dir, cfg, mcfg)
    if why_not:
        print(f"[segstudy] the run in {run_dir} cannot be reused ({why_not}): training again; "
              f"it stays where it is until the new run finishes")
    elif result:
        print(f"[segstudy] reusing the run in {run_dir} (set train.reuse: false to retrain)")
    return result


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
    train_loader: object  # one for every epoch (EpochOrder.set_epoch)
    val_loader: object
    criterion: Callable
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    rank_batch: int  # data.batch_size is the global batch: each of the `world` processes takes its share
    meta: dict
    epoch: int = 0  # epochs finished (the next one to run)
    step: int = 0
    best_miou: float = -1.0
    history: list = dataclasses.field(default_factory=list)
    guard: DivergenceGuard = dataclasses.field(default_factory=DivergenceGuard)
    partial: dict = dataclasses.field(default_factory=dict)  # the epoch in progress: batches, loss sum, ...
    per_image: np.ndarray | None = None  # the last validation's confusion matrix of each image
    previews: list[np.ndarray] | None = None  # its predictions of the first images (one process only)
    clock: tuple[str, float, int] | None = None  # (run key, start time, first step) for the ETA line

    @property
    def main(self) -> bool:
        return self.rank == 0


def _build_run(cfg: Config, mcfg, device: torch.device) -> TrainingRun:
    tcfg = cfg.train
    rank, world = init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(tcfg.amp, device)
    fixed_shape_kernels(device)
    if rank == 0:
        check_shared_memory(cfg)  # for this machine's train.gpus processes, before any worker starts
        prepare_data(cfg, training_datasets(cfg))
    if world > 1:
        dist.barrier()
    train_ds, val_ds = checked_data(cfg)
    seed_everything(cfg.seed)
    criterion = build_criterion(cfg, parts(train_ds)[0])  # wce's class weights: data.dataset's frequencies
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(mcfg)).to(device)
    if world > 1 and device.type == "cuda":
        # 2 images per GPU give poor BatchNorm statistics: normalise over the global batch, as
        # segmentation recipes do (torch's SyncBatchNorm runs on GPUs only; CPU ranks keep their own)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    if cfg.data.batch_size % world:
        raise UserError(f"data.batch_size = {cfg.data.batch_size} is the global batch, shared by {world} processes; "
                        f"make it a multiple of {world}")
    rank_batch = cfg.data.batch_size // world
    steps_per_epoch = epoch_size(train_ds) // world // rank_batch // tcfg.grad_accum
    if steps_per_epoch < 1:
        raise UserError(f"data.batch_size x train.grad_accum = {cfg.data.batch_size * tcfg.grad_accum} is larger "
                        f"than the {epoch_size(train_ds)} training images; lower them")
    schedule = poly_schedule(tcfg.epochs * steps_per_epoch, tcfg.warmup_iters, tcfg.poly_power)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    meta = {"model": mcfg.name, "num_classes": NUM_CLASSES, "model_config": dataclasses.asdict(mcfg),
            "backbone_init": backbone_init(model)}
    val_loader = eval_loader(val_ds, cfg, device, rank, world)
    # built once: its workers persist across epochs (EpochOrder.set_epoch changes what they load)
    train_loader = build_loader(SeededSamples(train_ds), rank_batch, train=True, seed=cfg.seed,
                                num_workers=cfg.data.num_workers, device=device.type,
                                sampler=EpochOrder(train_ds, cfg.seed, rank, world))
    return TrainingRun(cfg, mcfg, device, rank, world, amp_dtype, train_ds, train_loader, val_loader, criterion,
                       model, model, optimizer, scheduler, scaler, steps_per_epoch, rank_batch, meta)


def checked_data(cfg: Config) -> tuple[Dataset, SegmentationFolder]:
    """cfg's training set and validation split, every file's header read and every label decoded once
    (remembered per file list), so a bad file stops a training before it starts, not an epoch in."""
    train_ds = training_set(cfg)
    val_ds = build_dataset(cfg.data, cfg.data.val_split)
    for part, split in [(p, cfg.data.train_split) for p in parts(train_ds)] + [(val_ds, cfg.data.val_split)]:
        check_files(part, split)
        check_labels(part, split, Path(cfg.output_root) / "cache")
    return train_ds, val_ds


def fixed_shape_kernels(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the fastest:
    training crops and validation sizes are fixed, so the search pays off from the second step."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _resume(run: TrainingRun, latest: Path) -> None:
    """Model, optimizer, scheduler, scaler, RNG, epoch, step and history from `latest` (a file that
    run_folder.unfinished found)."""
    ckpt = load_checkpoint(latest)
    check_meta(ckpt, run.mcfg.name, NUM_CLASSES, latest)
    load_model_state(run.model, ckpt["model"], latest)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["lr_scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    run.epoch, run.step, run.best_miou = ckpt["epoch"], ckpt["step"], ckpt["best_miou"]
    run.partial = json.loads(ckpt.get("partial", "{}"))
    # a record written where train.max_steps stopped the run is replaced by the real one
    run.history = [r for r in json.loads(ckpt["history"]) if not r.get("capped")]
    run.guard = DivergenceGuard(ckpt.get("guard_first"))
    within = f", batch {run.partial['batches']} of that epoch" if run.partial.get("batches") else ""
    print(f"[segstudy] resumed {run.mcfg.name} from {latest} at epoch {run.epoch + 1}{within} (step {run.step})")


def _wrap(run: TrainingRun) -> None:
    """DDP across processes, then torch.compile, around the model the checkpoints hold."""
    net = nn.parallel.DistributedDataParallel(run.model) if run.world > 1 else run.model
    run.net = torch.compile(net) if run.cfg.train.compile else net


def _tracker(run: TrainingRun) -> Tracker:
    cfg, name = run.cfg, run.mcfg.name
    tracking = cfg.tracking if run.main else dataclasses.replace(cfg.tracking, backend="none")
    params = cfg.to_dict() | {"model": run.meta["model_config"]}
    return Tracker(tracking, cfg.output_root, f"{cfg.profile}-{name}", params,
                   tags={"profile": cfg.profile, "model": name, "loss": cfg.loss.name,
                         "backbone_init": run.meta["backbone_init"]}
                   | ({"sweep": cfg.tracking.sweep} if cfg.tracking.sweep else {})
                   | provenance.as_tags(provenance.stamp(cfg)))


def _run_epoch(run: TrainingRun, tracker: Tracker, work_dir: Path, progress: bool) -> bool:
    """Epoch run.epoch from where it stands (run.partial) to its end, or to train.max_steps (True);
    the full state is saved every train.checkpoint_every steps."""
    cfg, tcfg, epoch = run.cfg, run.cfg.train, run.epoch
    done = run.partial.get("batches", 0)
    if not done:
        torch.manual_seed(cfg.seed + epoch)  # each epoch's randomness depends on (seed, epoch) only
    run.train_loader.sampler.set_epoch(epoch, start=done * run.rank_batch)  # before iter(): workers prefetch
    total = run.steps_per_epoch * tcfg.grad_accum
    bar = tqdm(total=run.steps_per_epoch, initial=done // tcfg.grad_accum, mininterval=2.0,
               desc=f"{run.mcfg.name} epoch {epoch + 1}/{tcfg.epochs}", disable=not (progress and run.main))
    run.partial = {"batches": 0, "loss_sum": 0.0, "images": 0, "seconds": 0.0} | run.partial
    clock = [time.perf_counter()]

    def on_step(loss: float, images: int, loss_sum: float, batches: int) -> bool:
        run.step += 1
        now, part = time.perf_counter(), run.partial
        part |= {"batches": part["batches"] + batches, "loss_sum": part["loss_sum"] + loss_sum,
                 "images": part["images"] + images * run.world, "seconds": part["seconds"] + now - clock[0]}
        clock[0] = now
        lr = run.scheduler.get_last_lr()[0]
        loss = _mean_over_ranks(loss, run.world)
        bar.update()
        speed = run.partial["images"] / run.partial["seconds"]
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
        tracker.log_step({"train_loss": loss, "lr": lr}, run.step)
        if run.main and tcfg.checkpoint_every and run.step % tcfg.checkpoint_every == 0 and \
                run.partial["batches"] < total:
            _save_state(run, work_dir)
        return bool(tcfg.max_steps) and run.step >= tcfg.max_steps

    try:
        _, _, capped = train_one_epoch(
            run.net, run.criterion, run.optimizer, run.scheduler, run.scaler, run.train_loader, run.device,
            amp_dtype=run.amp_dtype, channels_last=tcfg.channels_last, grad_accum=tcfg.grad_accum,
            max_batches=total - done, on_step=on_step, guard=run.guard)
    except FloatingPointError as exc:
        latest = work_dir / run_folder.LATEST
        raise UserError(f"the loss diverged ({exc}) at step {run.step + 1} (epoch {epoch + 1}) of {run.mcfg.name}; "
                        f"training stopped, the last good checkpoint is kept "
                        f"({latest if latest.is_file() else 'none yet'}); lower train.lr or "
                        f"use train.amp: none") from None
    bar.close()
    return capped


def _mean_over_ranks(value: float, world: int) -> float:
    """The global batch's loss under DDP (each rank computes its share's), as one process reports it."""
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item() / world


def _validate_epoch(run: TrainingRun, tracker: Tracker) -> dict:
    run.previews = [] if run.world == 1 else None  # under DDP this rank's first images are not the set's
    cm = confusion_over(run.model, run.val_loader, run.device, run.amp_dtype, run.cfg.train.channels_last,
                        per_image=True, previews=run.previews)
    metrics = cm.compute()
    run.per_image = cm.per_image  # saved with the best checkpoint: the verdicts bootstrap over images
    tracker.log_metrics({"val_miou": metrics["miou"], "val_pixel_acc": metrics["pixel_acc"]}
                        | {f"val_iou_{k}": v for k, v in metrics["iou"].items()}, run.step)
    return {"val_miou": metrics["miou"], "val_pixel_acc": metrics["pixel_acc"], "val_iou": metrics["iou"]}


def _save_state(run: TrainingRun, run_dir: Path, record: dict | None = None) -> None:
    """latest (the full state to resume from, always) and best (weights, when validation improved)."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "lr_scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
             "epoch": run.epoch, "step": run.step, "rng": rng_state(), "meta": run.meta,
             "history": json.dumps(run.history), "best_miou": run.best_miou,
             "partial": json.dumps(run.partial), "guard_first": run.guard.first}
    if record and record.get("val_miou", -1) > run.best_miou:
        run.best_miou = state["best_miou"] = record["val_miou"]
        # weights only: what predict, serving and the later notebooks load (a third of the full state)
        save_checkpoint({k: state[k] for k in ("model", "meta", "epoch", "step", "best_miou", "history")},
                        run_dir / run_folder.BEST)
        if run.per_image is not None:
            with atomic_path(run_dir / run_folder.CONFUSIONS) as tmp, tmp.open("wb") as f:
                np.save(f, run.per_image)
        if run.previews:
            with atomic_path(run_dir / run_folder.PREVIEWS) as tmp, tmp.open("wb") as f:
                np.savez_compressed(f, *run.previews)
    save_checkpoint(state, run_dir / run_folder.LATEST)


def _report(run: TrainingRun, record: dict) -> None:
    print(f"[segstudy] {run.mcfg.name} epoch {record['epoch']}: loss {record['train_loss']:.3f}"
          + (f", val mIoU {record['val_miou'] * 100:.2f}" if "val_miou" in record else "")
          + f", {record['img_per_s']:.1f} img/s")
    if run.clock:
        key, start, first = run.clock
        tcfg = run.cfg.train
        total = min(tcfg.epochs * run.steps_per_epoch, tcfg.max_steps or math.inf)
        print(f"[segstudy] {timings.progress_line(run.cfg, key, run.step, total, time.perf_counter() - start, first)}",
              flush=True)


def train(cfg: Config, model_name: str | None = None, resume: bool = False, run_dir: str | Path | None = None,
          progress: bool = True, keep_weights: bool = True,
          on_validation: Callable[[int, dict], None] | None = None) -> dict:
    """Train cfg.model (or `model_name`) on cfg.data; returns the run's result (also result.json),
    whose checkpoint_best the caller may register (deploy.registry).

    With train.reuse, a finished run trained with the same settings is returned as it is. An
    unfinished one (killed, preempted, Ctrl-C) continues from its last checkpoint without being
    asked; `resume` insists on it. With train.gpus > 1 (and not already under torchrun) the training
    runs in torchrun's processes (engine.launch). One process at a time trains into a run folder, and
    a retry replaces a finished run only when it finishes too (engine.run_folder). A finished run
    keeps checkpoint_best.pt (weights), or nothing with keep_weights=False.

    `on_validation(epoch, record)` is called after each validation, once that epoch's checkpoint is
    saved (a tuner's pruner reads record["val_miou"]); an exception it raises (optuna.TrialPruned) stops
    the training and leaves an unfinished run folder that the same settings would continue.
    """
    mcfg = dataclasses.replace(cfg.model, name=model_name or cfg.model.name)
    run_dir = Path(run_dir) if run_dir else run_folder.run_dir(cfg, mcfg.name)
    settings = run_folder.settings(cfg, mcfg)
    if not resume and (saved := _reused_result(run_dir, cfg, mcfg)):
        return saved
    if launch.wanted(cfg):
        return launch.torchrun(cfg, mcfg.name, run_dir, keep_weights)
    run = _build_run(cfg, mcfg, resolve_device(cfg.device))
    run.meta["settings"] = settings
    with run_folder.lock(run_dir) if run.main else contextlib.nullcontext():
        continued = run_folder.unfinished(run_dir, settings, insist=resume)
        work_dir = continued or (run_folder.work_folder(run_dir) if run.main else run_dir)
        if run.main:
            run_folder.write_settings(work_dir, settings)
        if continued:
            _resume(run, continued / run_folder.LATEST)
        _wrap(run)
        tracker = _tracker(run)
        run.clock = (timings.run_key(cfg, run_dir), time.perf_counter(), run.step)
        finished = _epochs(run, tracker, work_dir, progress, on_validation)
        result = _finish(run, tracker, run_dir if finished else work_dir, finished)
        if run.main:
            if finished:
                _drop_training_state(work_dir, keep_weights, result)
            _write_result(result, work_dir)
            if finished:
                run_folder.promote(work_dir, run_dir)
            timings.record_finished(cfg, run.clock[0], time.perf_counter() - run.clock[1])
    return result


def _drop_training_state(work_dir: Path, keep_weights: bool, result: dict) -> None:
    """A finished run needs no optimizer state; without keep_weights, no weights either."""
    (work_dir / run_folder.LATEST).unlink(missing_ok=True)
    if not keep_weights:
        (work_dir / run_folder.BEST).unlink(missing_ok=True)
        result["checkpoint_best"] = None


def validates_after(epoch: int, tcfg, capped: bool = False) -> bool:
    """Whether training validates after epoch `epoch` (1-based): every train.val_every epochs, after
    the last one, and when train.max_steps stops it."""
    return capped or epoch % tcfg.val_every == 0 or epoch == tcfg.epochs


def validation_passes(tcfg) -> int:
    """How many times a whole training validates (the plan counts them)."""
    return sum(validates_after(epoch, tcfg) for epoch in range(1, tcfg.epochs + 1))


def planned_batches(tcfg, batches_per_epoch: int) -> int:
    """The batches a whole training runs: its epochs, or fewer when train.max_steps (optimiser
    steps, each train.grad_accum batches) stops it."""
    batches = tcfg.epochs * batches_per_epoch
    return min(batches, tcfg.max_steps * tcfg.grad_accum) if tcfg.max_steps else batches


def _epochs(run: TrainingRun, tracker: Tracker, work_dir: Path, progress: bool,
            on_validation: Callable[[int, dict], None] | None = None) -> bool:
    """The epoch loop; True when the schedule finished, False when train.max_steps stopped it (after
    a validation and a checkpoint, so the run is usable). A failure marks the MLflow run FAILED."""
    tcfg = run.cfg.train
    status, capped = "FAILED", False
    try:
        while run.epoch < tcfg.epochs and not capped:
            capped = _run_epoch(run, tracker, work_dir, progress)
            record = _close_epoch(run, capped)
            if validates_after(record["epoch"], tcfg, capped):
                record |= _validate_epoch(run, tracker)
            run.history.append(record)
            if run.main:
                _save_state(run, work_dir, record)
                _report(run, record)
                if on_validation and "val_miou" in record:
                    on_validation(math.ceil(record["epoch"]), record)
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            tracker.finish("FAILED")
    return run.epoch >= tcfg.epochs


def _close_epoch(run: TrainingRun, capped: bool) -> dict:
    """The record of the epoch just run; one stopped by train.max_steps part-way is marked `capped`
    and its partial sums stay in run.partial, so a longer run continues the same epoch."""
    part, total = run.partial, run.steps_per_epoch * run.cfg.train.grad_accum
    loss = _mean_over_ranks(part["loss_sum"] / max(part["batches"], 1), run.world)
    record = {"epoch": run.epoch + 1, "step": run.step, "train_loss": loss, "seconds": part["seconds"],
              "images": part["images"], "img_per_s": part["images"] / max(part["seconds"], 1e-9)}
    if capped and part["batches"] < total:
        return record | {"epoch": run.epoch + part["batches"] / total, "capped": True}
    run.epoch, run.partial = run.epoch + 1, {}
    return record


def _finish(run: TrainingRun, tracker: Tracker, run_dir: Path, finished: bool) -> dict:
    """The run's result (latency is measured once per model, by the studies, at bench size)."""
    history = run.history
    train_seconds = sum(r.get("seconds", 0.0) for r in history)
    images_seen = sum(r.get("images", 0) for r in history)
    confusions = run_dir / run_folder.CONFUSIONS
    result = {"model": run.mcfg.name, "profile": run.cfg.profile, "finished": finished, "steps": run.step,
              "capped_at_step": None if finished else run.cfg.train.max_steps, "settings": run.meta["settings"],
              "epochs": len(history), "history": history, "best_miou": run.best_miou,
              "final": history[-1] if history else {}, "train_seconds": train_seconds,
              "train_img_per_s": images_seen / train_seconds if train_seconds else float("nan"),
              "parameters": measure.parameters(run.model), "run_dir": str(run_dir),
              "checkpoint_best": str(run_dir / run_folder.BEST), "mlflow_run_id": tracker.run_id,
              "val_confusions": str(confusions) if confusions.is_file() else None,
              "backbone_init": run.meta["backbone_init"]}
    tracker.finish()
    return result


def _write_result(result: dict, work_dir: Path) -> None:
    write_json(work_dir / "result.json", result, default=lambda v: None if v != v else v)
