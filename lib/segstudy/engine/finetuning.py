"""Training a model that already exists (pruned, quantization-aware, a dense control) for a
fraction of a schedule, optionally distilled from a teacher; the notebooks' fine-tunes."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm import tqdm

from segstudy.config import Config
from segstudy.data.datasets import build_dataset, build_loader, seed_everything
from segstudy.engine import timings
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.engine.evaluation import validate
from segstudy.engine.optimization import adamw, build_criterion, poly_schedule, train_one_epoch
from segstudy.errors import UserError


def iterations(epochs: float, steps_per_epoch: int) -> int:
    """The optimiser steps of a fine-tune of `epochs` (fractions allowed): at least one."""
    return max(1, round(epochs * steps_per_epoch))


def finetune(model: nn.Module, cfg: Config, epochs: float, *, lr: float | None = None,
             teacher: nn.Module | None = None, kd_temperature: float = 1.0, kd_weight: float = 0.0,
             amp: str | None = None, channels_last: bool | None = None, progress: bool = True,
             desc: str = "finetune", validate_after: bool = True, timing_key: str | None = None) -> dict:
    """Train an existing model in place (pruned, quantization-aware, ...) with cfg's loss for
    `epochs` (fractions allowed), AdamW at `lr` (default cfg.train.lr / 10) with a poly decay, then
    validate (unless `validate_after` is False: "miou" and "iou" are then None, for a caller that
    scores the model itself). With a teacher, the loss is (1 - kd_weight) x task + kd_weight x
    pixel-wise KD. Returns {"miou", "iou", "history", "train_seconds", "img_per_s"}. `timing_key`:
    the plan's key for it (engine.timings.step_key), under which timings.json adds its seconds."""
    from segstudy.models.losses import Distiller, with_kd

    if epochs <= 0:
        raise UserError(f"fine-tune epochs = {epochs}; it must be > 0")
    start = time.perf_counter()
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
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr, cfg.train.weight_decay)
    steps_per_epoch = len(train_ds) // cfg.data.batch_size
    total = iterations(epochs, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(total, 0, cfg.train.poly_power))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    history, step, seconds, seen_all = [], 0, 0.0, 0
    for epoch in range(int(-(-total // steps_per_epoch))):
        torch.manual_seed(cfg.seed + epoch)
        loader = build_loader(train_ds, cfg.data.batch_size, train=True, seed=cfg.seed + epoch,
                              num_workers=cfg.data.num_workers, device=device.type)
        bar = tqdm(total=min(steps_per_epoch, total - step), desc=f"{desc} epoch {epoch + 1}",
                   disable=not progress, mininterval=2.0)

        def on_step(loss: float, seen: int, *_, bar=bar) -> bool:
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
    metrics = {"miou": None, "iou": None}
    if validate_after:
        metrics = validate(model, cfg, amp=cfg.train.amp if amp is None else amp, channels_last=channels_last)
    if timing_key:
        timings.record_finished(cfg, timing_key, time.perf_counter() - start, add=True)
    return {"miou": metrics["miou"], "iou": metrics["iou"], "history": history, "train_seconds": seconds,
            "img_per_s": seen_all / seconds if seconds else float("nan")}
