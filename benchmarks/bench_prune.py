"""Pruning's figures, measured side by side in one process on this machine, and notebook 04's targets.

    python benchmarks/bench_prune.py [--profile demo] [--iters 8] [--control]

Loads the dense custom model (notebook 02) and the recovered structured model that notebook 04
saved, makes the prune.finetune_sparsity unstructured (LAMP) copy, and measures batch-1 latency at
the bench size (fp32 eager, timed in turn: engine.measure.latencies) and validation mIoU. Prints the
CPU and each figure with its 95% interval: speed-ups over the rounds timed in turn, mIoU differences
paired over the validation images. Then notebook 04's targets as its saved results answer them
(studies.pruning_targets: the report's rule, yes | no | not distinguishable), not judged again here.
With --control, the dense model is also fine-tuned for the same prune.epochs at prune.lr as the
structured model's recovery, and the structured model's mIoU is printed against that copy too:
the recovered model has been trained longer than the dense one, and on a short schedule part of
what it "recovers" is that extra training.
Writes outputs/<profile>/benchmarks/prune.json.
"""

from __future__ import annotations

import argparse
import copy
import json

import pandas as pd

from segstudy.compress import prune
from segstudy.config_profiles import load_config
from segstudy.engine import measure
from segstudy.engine.evaluation import validate
from segstudy.engine.finetuning import finetune
from segstudy.errors import UserError
from segstudy.models.checkpoint import load_trained
from segstudy.studies import pruning_sweeps, pruning_targets, verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", "--params", dest="params", default="demo",
                   metavar="NAME", help="profile (params/) or YAML file whose notebook 02/04 models are measured")
    p.add_argument("--iters", type=int, default=8)
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
    print(f"batch 1 at {b.width}x{b.height}, fp32 eager, {args.iters} rounds timed in turn; mIoU on "
          f"{cfg.profile}'s validation split")
    timed = measure.latencies({k: copy.deepcopy(m) for k, m in models.items()}, b.height, b.width,
                              warmup=b.warmup, iters=args.iters)
    scored = {k: validate(copy.deepcopy(m), cfg, amp=cfg.train.amp, channels_last=cfg.train.channels_last,
                          per_image=True) for k, m in models.items()}
    if args.control:
        tuned = copy.deepcopy(dense)
        finetune(tuned, cfg, cfg.prune.epochs, lr=cfg.prune.lr, progress=False, validate_after=False)
        scored["control"] = validate(tuned, cfg, amp=cfg.train.amp, channels_last=cfg.train.channels_last,
                                     per_image=True)
    figures = {}
    for k, m in models.items():
        speed = verdicts.speedup(timed[k]["times_ms"], timed["dense"]["times_ms"], paired=True)
        diffs = {f"vs {ref}": verdicts.paired_difference(scored[k]["per_image"], scored[ref]["per_image"])
                 for ref in ("dense", "control") if ref in scored and ref != k}
        figures[k] = {"latency_ms": timed[k]["median_ms"], "speedup": speed, "miou": 100 * scored[k]["miou"],
                      "miou_diff": diffs}
        print(f"{k:13s} {timed[k]['median_ms']:8.1f} ms  {speed.mean:4.2f}x [{speed.low:.2f}, {speed.high:.2f}]  "
              f"mIoU {100 * scored[k]['miou']:6.2f}"
              + "".join(f"  {ref} {d} points" for ref, d in diffs.items())
              + f"  params {measure.parameters(m) / 1e6:5.1f} M  zeros {100 * prune.sparsity(m)['overall']:4.1f}%")
    if args.control:
        print(f"control: dense + {cfg.prune.epochs:g} epochs at lr {cfg.prune.lr:g} (the recovery's schedule): "
              f"mIoU {100 * scored['control']['miou']:.2f}")
    with pd.option_context("display.max_colwidth", None, "display.width", 250):
        print("notebook 04's targets, from its saved results (the report's rule):")
        print(pruning_targets.table(cfg).to_string(index=False))
    out = cfg.output_dir / "benchmarks" / "prune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": info, "size": f"{b.width}x{b.height}", "iters": args.iters,
                               "models": figures}, indent=2, default=vars))
    print("wrote", out)


if __name__ == "__main__":
    main()
