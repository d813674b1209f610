"""Pruning targets, measured side by side in one process on this machine.

    python benchmarks/bench_prune.py [--profile demo] [--iters 7] [--control]

Loads the dense custom model (notebook 02) and the recovered structured model that notebook 04
saved, makes the 55% unstructured (LAMP) copy, and measures batch-1 latency at the bench size
(fp32 eager, interleaved so that load on the machine hits every model alike) and validation
mIoU. Prints the CPU, each figure, and PASS/FAIL for:
  structured: >= prune.target_speedup x lower latency than dense at <= report.keep_loss mIoU points loss;
  unstructured (prune.finetune_sparsity): >= prune.target_kept of the dense mIoU (read from notebook
  04's fine-tuned rows), no speed-up. The thresholds are the profile's, as notebook 04 reads them.
With --control, the dense model is also fine-tuned for the same prune.epochs at prune.lr as the
structured model's recovery, and the structured model's loss is printed against that copy too:
the recovered model has been trained longer than the dense one, and on a short schedule part of
what it "recovers" is that extra training.
Writes outputs/<profile>/benchmarks/prune.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from segstudy.compress import prune
from segstudy.config_profiles import load_config
from segstudy.engine import measure
from segstudy.engine.evaluation import validate
from segstudy.engine.finetuning import finetune
from segstudy.errors import UserError
from segstudy.models.checkpoint import load_trained
from segstudy.studies import pruning_sweeps


def _interleaved_latency(models: dict[str, torch.nn.Module], height: int, width: int, iters: int) -> dict:
    """Median ms per model, taking one timed pass of each model in turn."""
    x = torch.randn(1, 3, height, width)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)  # warm-up: oneDNN picks its kernels on the first call
        for _ in range(iters):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", "--params", dest="params", default="demo",
                   metavar="NAME", help="profile (params/) or YAML file whose notebook 02/04 models are measured")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--control", action="store_true", help="also fine-tune the dense model as long as the recovery")
    args = p.parse_args()
    cfg = load_config(args.params, {"tracking.backend": "none"})
    info = measure.cpu_info()
    print(measure.cpu_line(info))
    saved = cfg.output_dir / "04_pruning_sweeps" / pruning_sweeps.SAVED
    results = cfg.output_dir / "04_pruning_sweeps" / "results.json"
    if not saved.is_file() or not results.is_file():
        raise UserError(f"{saved} or {results} is missing; run notebook 04 first (./run_all.sh {cfg.profile} "
                        f"--only 04)")
    dense = pruning_sweeps.load_dense(cfg)
    structured = load_trained(saved)
    unstructured = prune.unstructured(copy.deepcopy(dense), cfg.prune.finetune_sparsity, "lamp")
    models = {"dense": dense, "structured": structured, "unstructured": unstructured}
    b = cfg.bench
    print(f"torch {torch.__version__}; batch 1 at {b.width}x{b.height}, fp32 eager, median of {args.iters} "
          f"interleaved passes; mIoU on {cfg.profile}'s validation split")
    lat = _interleaved_latency(models, b.height, b.width, args.iters)
    miou = {k: 100 * validate(copy.deepcopy(m), cfg, amp=cfg.train.amp,
                              channels_last=cfg.train.channels_last)["miou"] for k, m in models.items()}
    for k, m in models.items():
        print(f"{k:13s} {lat[k]:8.1f} ms  ({lat['dense'] / lat[k]:4.2f}x)   mIoU {miou[k]:6.2f}   "
              f"params {measure.parameters(m) / 1e6:5.1f} M   zeros {100 * prune.sparsity(m)['overall']:4.1f}%")
    speedup, loss = lat["dense"] / lat["structured"], miou["dense"] - miou["structured"]
    t, keep = cfg.prune, cfg.report.keep_loss
    ok = speedup >= t.target_speedup and loss <= keep
    print(f"structured target (>= {t.target_speedup:g}x faster, <= {keep:g} mIoU points lost): "
          f"{speedup:.2f}x, {loss:+.2f} points -> "
          f"{'PASS' if ok else 'FAIL'}")
    rows = json.loads(results.read_text())["rows"]
    finetuned = [r for r in rows if r["method"].startswith("unstructured") and r["recovery"] != "none"
                 and abs(r["level"] - cfg.prune.finetune_sparsity) < 1e-9]
    for r in finetuned:
        kept = 100 * r["miou"] / miou["dense"]  # results files hold fractions; this script, points
        print(f"{r['method']} {r['level']:.0%} + {r['recovery']} (notebook 04): mIoU {100 * r['miou']:.2f} = "
              f"{100 * kept:.1f}% of dense -> {'PASS' if kept >= t.target_kept else 'FAIL'} "
              f"(target >= {t.target_kept:.0%})")
    control = None
    if args.control:
        control = 100 * finetune(copy.deepcopy(dense), cfg, cfg.prune.epochs, lr=cfg.prune.lr, progress=False)["miou"]
        print(f"control: dense + {cfg.prune.epochs:g} epochs at lr {cfg.prune.lr:g} (the recovery's schedule): mIoU "
              f"{control:.2f}; structured {miou['structured'] - control:+.2f} points against it")
    print(f"unstructured {cfg.prune.finetune_sparsity:.0%} without fine-tune: {miou['unstructured']:.2f} mIoU, "
          f"latency {lat['dense'] / lat['unstructured']:.2f}x of dense (dense kernels ignore zeros)")
    out = cfg.output_dir / "benchmarks" / "prune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": info, "size": f"{b.width}x{b.height}", "latency_ms": lat, "miou": miou,
                               "structured_speedup": speedup, "structured_loss": loss,
                               "control_miou": control}, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
