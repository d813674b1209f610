"""Notebook 04: prune the trained custom model every way, recover accuracy, measure what it buys.

Every row of the study is one model: its method, level, recovery, counted sparsity, val mIoU and
per-class IoU, parameters, FLOPs, latency (batch 1 at the bench size, fp32, this CPU) and size on
disk (plain and gzip-compressed).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from segstudy.compress import prune
from segstudy.config import Config
from segstudy.data.datasets import build_dataset, build_loader
from segstudy.engine import measure, run_folder
from segstudy.engine.evaluation import from_training, validate
from segstudy.engine.finetuning import finetune
from segstudy.engine.timings import Passes, Step, eval_size, step_key
from segstudy.engine.timings import timed as timed_step
from segstudy.errors import UserError
from segstudy.models.checkpoint import load_checkpoint, load_trained, save_model

SAVED = "pruned_structured.pt"  # notebook 05 quantizes this one
NOTEBOOK = "04_pruning_sweeps"  # its fine-tunes' and steps' keys in the plan and timings.json
EVALUATE, LATENCY = "evaluate", "latency"  # its steps (steps())


RECOVERIES = ("fine-tune", "KD")  # how recover() fine-tunes the structured model: plain, then distilled
DENSE_CONTROL = "dense-control"


def unstructured_finetune_scopes(cfg: Config) -> list[str]:
    """The scopes whose prune.finetune_sparsity model is fine-tuned (prune.unstructured_epochs)."""
    p = cfg.prune
    if p.unstructured_epochs <= 0 or not p.finetune_sparsity:
        return []
    return [scope for scope in p.scopes if scope in p.finetune_scopes]


def finetunes(cfg: Config) -> list[tuple[str, str, float, int, str]]:
    """Every fine-tune this notebook runs, in order, as (its name in timings.json, kind, epochs in
    all, fine-tune calls, a note): what `segstudy plan` counts."""
    p = cfg.prune
    rows = [(f"unstructured-{scope}", "fine-tune", p.unstructured_epochs, 1, "")
            for scope in unstructured_finetune_scopes(cfg)]
    kd = "KD fine-tune" if p.kd_weight > 0 else "fine-tune"
    rows += [(f"structured-{r}", kd if r == "KD" else "fine-tune", p.epochs, p.steps,
              "dense cost: an upper bound for the pruned model") for r in RECOVERIES]
    return rows + [(DENSE_CONTROL, "fine-tune", p.epochs, p.steps,
                    "the dense model, trained as long: what recovery is judged against")]


def steps(cfg: Config, val_images: int) -> list[Step]:
    """This notebook's scoring of every model it describes (describe: on the device, in the training's
    precision) and its CPU latencies (fp32, the bench size), for the plan and timings.json, counted as
    its sweeps run them: the dense row; every scope x sparsity, and the fine-tuned scopes; every
    structured ratio, and the other importances at prune.ratio; each recovery; the dense control.
    Latency: the dense row and each ratio alone (bench.iters), the unstructured level beside the dense
    model and the recoveries beside it (bench.speedup_iters)."""
    p, b = cfg.prune, cfg.bench
    others = [i for i in p.importances if not (i == p.importance and p.ratio in p.ratios)]
    described = (1 + len(p.scopes) * len(p.sparsities) + len(unstructured_finetune_scopes(cfg))
                 + len(p.ratios) + len(others) + len(RECOVERIES) + 1)
    alone = (1 + len(p.ratios)) * (b.warmup + b.iters)
    side_by_side = (2 * (p.finetune_sparsity in p.sparsities) + 1 + len(RECOVERIES)) * (b.warmup + b.speedup_iters)
    upper = "pruned models at the dense model's cost, an upper bound"
    scoring, timing = Passes("custom", "amp", described * val_images), Passes("custom", "fp32", alone + side_by_side)
    return [Step(NOTEBOOK, EVALUATE, "evaluate", False, eval_size(cfg), (scoring,),
                 f"{described} models x {val_images} images; {upper}"),
            Step(NOTEBOOK, LATENCY, "latency", True, (b.height, b.width), (timing,), upper)]


def dense_checkpoint(cfg: Config) -> Path:
    return run_folder.best(cfg, "custom")


def load_dense(cfg: Config) -> nn.Module:
    path = dense_checkpoint(cfg)
    if not path.is_file():
        raise UserError(f"notebook 04 prunes the custom model trained by notebook 02, and {path} does not "
                        f"exist; run ./run_all.sh {cfg.profile} --only 02 first")
    return load_trained(path)


def _eval_args(cfg: Config) -> dict:
    return {"amp": cfg.train.amp, "channels_last": cfg.train.channels_last}


def describe(model: nn.Module, cfg: Config, *, latency: bool = True, flops: bool = False,
             reference: nn.Module | None = None, metrics: dict | None = None, timed: dict | None = None,
             **row) -> dict:
    """Measure one model: accuracy on val, sparsity, size, and (optionally) latency and FLOPs.
    The row keeps each validation image's confusion matrix ("per_image", saved apart from the JSON
    by results_files.write_pruning) and every timing ("latency_times_ms"): the verdicts' intervals.
    With a `reference` (the dense model), both are timed side by side, bench.speedup_iters times,
    and the reference's timings kept too ("reference_times_ms"): the speed-up the verdicts read.
    `metrics`: validate()'s answer when it is known already (dense_row); `timed`: the timings when
    taken already, {"model": ..., "reference": ...} from measure.latencies (recover)."""
    model = model.eval()
    if metrics is None:
        with timed_step(cfg, step_key(NOTEBOOK, EVALUATE)):
            metrics = validate(copy.deepcopy(model), cfg, **_eval_args(cfg), per_image=True)
    b, saved = cfg.bench, measure.saved_state(model)
    out = row | {
        "sparsity": prune.sparsity(model)["overall"], "miou": metrics["miou"], "iou": metrics["iou"],
        "params": measure.parameters(model), "size_mb": len(saved) / 2**20,
        "size_gz_mb": prune.compressed_size(saved) / 2**20, "per_image": metrics["per_image"]}
    if latency:
        if timed is None:
            models = {"model": copy.deepcopy(model)} | ({"reference": copy.deepcopy(reference)} if reference else {})
            with timed_step(cfg, step_key(NOTEBOOK, LATENCY)):
                timed = measure.latencies(models, b.height, b.width, "cpu", warmup=b.warmup,
                                          iters=b.speedup_iters if reference is not None else b.iters)
        out |= {"latency_ms": timed["model"]["median_ms"], "latency_times_ms": timed["model"]["times_ms"]}
        if "reference" in timed:
            out["reference_times_ms"] = timed["reference"]["times_ms"]
    if flops:
        out["gflops"] = measure.flops(copy.deepcopy(model).cpu(), b.height, b.width) / 1e9
    return out


def dense_row(cfg: Config, dense: nn.Module) -> dict:
    """describe() of the dense model, FLOPs too; its accuracy is read from its training (the best
    epoch's validation, evaluation.from_training) when that was the same evaluation."""
    metrics = from_training(dense_checkpoint(cfg).parent, cfg, **_eval_args(cfg))
    if metrics:
        print(f"[segstudy] dense model: accuracy from its training's validation of the same weights "
              f"({dense_checkpoint(cfg).parent / run_folder.CONFUSIONS})")
    return describe(dense, cfg, flops=True, metrics=metrics, method="dense", level=0.0, recovery="none")


def unstructured_sweep(cfg: Config, dense: nn.Module) -> tuple[list[dict], dict[str, dict]]:
    """Every scope x sparsity without fine-tuning, then the fine-tuned level. Latency is measured
    once, at the fine-tuned level of the last scope, side by side with the dense model: every
    unstructured model has the dense model's shapes, so one measurement shows the (absent)
    speed-up. Also returns the per-layer sparsity of each scope at the fine-tuned level."""
    p = cfg.prune
    rows, layers = [], {}
    lamp = prune.model_lamp_scores(dense) if "lamp" in p.scopes else None  # the same for every level
    for scope in p.scopes:
        for s in p.sparsities:
            model = prune.unstructured(copy.deepcopy(dense), s, scope, scores=lamp)
            timed = scope == p.scopes[-1] and s == p.finetune_sparsity
            rows.append(describe(model, cfg, latency=timed, reference=dense if timed else None,
                                 method=f"unstructured {scope}", level=s, recovery="none"))
            if s == p.finetune_sparsity:
                layers[scope] = prune.sparsity(model)["layers"]
        if scope in unstructured_finetune_scopes(cfg):
            model = prune.unstructured(copy.deepcopy(dense), p.finetune_sparsity, scope, permanent=False,
                                       scores=lamp)
            ft = finetune(model, cfg, p.unstructured_epochs, lr=p.unstructured_lr,
                          desc=f"{scope} {p.finetune_sparsity}", validate_after=False,  # describe() scores it
                          timing_key=step_key(NOTEBOOK, f"unstructured-{scope}"))
            prune.make_permanent(model)  # the zeros survived the fine-tune: the masks were kept
            rows.append(describe(model, cfg, latency=False, method=f"unstructured {scope}",
                                 level=p.finetune_sparsity, recovery="fine-tune",
                                 train_seconds=ft["train_seconds"]))
    return rows, layers


def _taylor_batches(cfg: Config, n: int = 2) -> list:
    ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    loader = build_loader(ds, cfg.data.batch_size, train=True, seed=cfg.seed, num_workers=0, device="cpu")
    return [batch for _, batch in zip(range(n), loader)]


def structured_model(cfg: Config, dense: nn.Module, ratio: float, importance: str | None = None,
                     steps: int = 1) -> tuple[nn.Module, object]:
    """A copy of `dense` with `ratio` of its channels removed, and the pruner for further steps."""
    p = cfg.prune
    model = copy.deepcopy(dense)
    pruner = prune.structured_pruner(model, ratio, importance or p.importance, steps=steps,
                                     layer_ratios=p.layer_ratios)
    batches = _taylor_batches(cfg) if (importance or p.importance) == "taylor" else None
    prune.structured_step(pruner, model, batches)
    return model, pruner


def structured_sweep(cfg: Config, dense: nn.Module) -> list[dict]:
    """prune.ratios with prune.importance (FLOPs and latency), then the other importance criteria
    at prune.ratio; no fine-tuning, so these rows show what the criterion alone keeps."""
    p = cfg.prune
    rows = []
    for r in p.ratios:
        model, _ = structured_model(cfg, dense, r)
        rows.append(describe(model, cfg, flops=True, method=f"structured {p.importance}", level=r, recovery="none"))
    for imp in p.importances:
        if imp == p.importance and p.ratio in p.ratios:
            continue  # that model is a row above
        model, _ = structured_model(cfg, dense, p.ratio, imp)
        rows.append(describe(model, cfg, latency=False, method=f"structured {imp}", level=p.ratio,
                             recovery="none"))
    return rows


def _finetune_in_steps(model: nn.Module, cfg: Config, desc: str, name: str, before_step=None, **kd) -> list[float]:
    """prune.steps fine-tunes of prune.epochs / prune.steps epochs at prune.lr, each after
    `before_step()` (a pruning step) when given; returns the val mIoU after every step but the
    last, which the caller's describe() scores. `name`: the fine-tune's in the plan."""
    p, history = cfg.prune, []
    for step in range(p.steps):
        if before_step is not None:
            before_step()
        last = step == p.steps - 1
        ft = finetune(model, cfg, p.epochs / p.steps, lr=p.lr, desc=f"{desc} step {step + 1}/{p.steps}",
                      validate_after=not last, timing_key=step_key(NOTEBOOK, name), **kd)
        history += [] if last else [ft["miou"]]
    return history


def recover(cfg: Config, dense: nn.Module, out_dir: Path) -> list[dict]:
    """Prune to prune.ratio in prune.steps steps with a fine-tune after each (plain, then with the
    dense model as KD teacher); the better of the two is saved for notebook 05. Both are timed in
    the same rounds as the dense model (one dense timing per round serves both speed-ups)."""
    p, b = cfg.prune, cfg.bench
    recovered = {}  # recovery: (model, val mIoU after each step but the last, fine-tune seconds)
    for recovery, kd_weight in zip(RECOVERIES, (0.0, p.kd_weight)):
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(dense)
        pruner = prune.structured_pruner(model, p.ratio, p.importance, steps=p.steps, layer_ratios=p.layer_ratios)
        t0 = time.perf_counter()
        history = _finetune_in_steps(
            model, cfg, recovery, f"structured-{recovery}",
            lambda pruner=pruner, model=model: prune.structured_step(
                pruner, model, _taylor_batches(cfg) if p.importance == "taylor" else None),
            teacher=dense, kd_weight=kd_weight, kd_temperature=p.kd_temperature)
        recovered[recovery] = (model, history, time.perf_counter() - t0)
    with timed_step(cfg, step_key(NOTEBOOK, LATENCY)):
        timed = measure.latencies({"reference": copy.deepcopy(dense)} | {k: copy.deepcopy(m) for k, (m, *_) in
                                                                         recovered.items()},
                                  b.height, b.width, "cpu", warmup=b.warmup, iters=b.speedup_iters)
    rows, best = [], None
    for recovery, (model, history, seconds) in recovered.items():
        row = describe(model, cfg, flops=True, timed={"model": timed[recovery], "reference": timed["reference"]},
                       method=f"structured {p.importance}", level=p.ratio, recovery=recovery, train_seconds=seconds)
        row["step_miou"] = [*history, row["miou"]]
        rows.append(row)
        if best is None or row["miou"] > best[0]["miou"]:
            best = (row, model)
    row, model = best
    meta = load_checkpoint(dense_checkpoint(cfg))["meta"] | {"pruned": "structured"}
    path = save_model(model.cpu(), meta, out_dir / SAVED,
                      prune={"ratio": p.ratio, "importance": p.importance, "recovery": row["recovery"],
                             "layer_ratios": p.layer_ratios}, miou=row["miou"])
    row["checkpoint"] = str(path)
    return rows


def dense_control(cfg: Config, dense: nn.Module, dense_row: dict) -> dict:
    """The dense model fine-tuned exactly as recover() fine-tunes the structured one without KD
    (prune.steps fine-tunes of prune.epochs / prune.steps epochs at prune.lr, the same loss and
    seed): on a short schedule part of what recovery "recovers" is that extra training, so the
    pruned model is judged against this row, not against the dense one. It has the dense model's
    shapes, hence the dense row's latency and FLOPs (not measured again)."""
    torch.manual_seed(cfg.seed)
    model, t0 = copy.deepcopy(dense), time.perf_counter()
    history = _finetune_in_steps(model, cfg, "dense control", DENSE_CONTROL)
    row = describe(model, cfg, latency=False, method="dense control", level=0.0, recovery="fine-tune",
                   train_seconds=time.perf_counter() - t0)
    row["step_miou"] = [*history, row["miou"]]
    return row | {k: dense_row[k] for k in ("latency_ms", "latency_times_ms", "gflops") if k in dense_row}


def register(cfg: Config, rows: list[dict]) -> dict | None:
    """Register the saved structured model (the recovered row that was kept) in MLflow as
    segstudy-custom-pruned@champion, with its measured figures as tags."""
    from segstudy.deploy import registry

    kept = next(r for r in rows if r.get("checkpoint"))
    metrics = {"val_miou": kept["miou"], "latency_ms": kept["latency_ms"], "params": kept["params"],
               "gflops": kept["gflops"]}
    return registry.register(cfg, kept["checkpoint"], "segstudy-custom-pruned", metrics,
                             tags={"recovery": kept["recovery"], "ratio": str(kept["level"])})
