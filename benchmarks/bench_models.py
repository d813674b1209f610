"""Inference latency (fp32 eager vs channels_last, batch 1) and training throughput of the three
models, side by side in one process on this machine.

    python benchmarks/bench_models.py [--profile demo] [--height 512 --width 1024] [--iters 5]
    python benchmarks/bench_models.py --crops 128x256 96x192   # training img/s per crop, side by side
    python benchmarks/bench_models.py --precisions none bf16   # training img/s per autocast, side by side

Weights are random (latency does not depend on their values). Prints the CPU and its ISA flags,
writes outputs/<profile>/benchmarks/models.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from segstudy.config_profiles import load_config
from segstudy.engine import measure
from segstudy.engine.device import autocast_dtype, resolve_device
from segstudy.models.networks import MODELS, build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", "--params", dest="params", default="demo",
                   metavar="NAME", help="profile (params/) or YAML file (default: demo)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--crops", nargs="+", metavar="HxW",
                   help="training crops measured side by side at the profile's settings, e.g. 128x256 96x192")
    p.add_argument("--precisions", nargs="+", metavar="AMP",
                   help="train.amp values (none, bf16, ...) measured side by side at the profile's crop")
    args = p.parse_args()
    cfg = load_config(args.params)
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.train.amp, device)
    info = measure.cpu_info()
    print(measure.cpu_line(info))
    print(f"torch {torch.__version__}, device {device}; latency: batch 1 at {args.width}x{args.height}, "
          f"median of {args.iters}; training: batch {cfg.data.batch_size} at crop {cfg.data.crop_size}, "
          f"amp {cfg.train.amp} ({amp}), channels_last {cfg.train.channels_last}")
    rows = {}
    for name in MODELS:
        model = build_model(num_classes=19, **(asdict(cfg.model) | {"name": name, "pretrained": False,
                                                                     "aux_loss": False}))
        if args.crops:
            rows[name] = _crops(model, cfg, args, amp, device)
            continue
        if args.precisions:
            rows[name] = _precisions(model, cfg, args, device)
            continue
        eager = measure.latency(model, args.height, args.width, device, warmup=1, iters=args.iters)["median_ms"]
        cl = measure.latency(model, args.height, args.width, device, warmup=1, iters=args.iters,
                             channels_last=True)["median_ms"]
        fp32_tp = measure.train_throughput(model, cfg.data.batch_size, *cfg.data.crop_size, args.train_steps,
                                           device=device)
        tp = measure.train_throughput(model, cfg.data.batch_size, *cfg.data.crop_size, args.train_steps, amp,
                                      cfg.train.channels_last, device)
        rows[name] = {"latency_fp32_ms": eager, "latency_channels_last_ms": cl, "channels_last_speedup": eager / cl,
                      "train_img_per_s_fp32": fp32_tp, "train_img_per_s_profile": tp,
                      "parameters_M": measure.parameters(model) / 1e6}
        print(f"{name:20s} fp32 {eager:8.1f} ms   channels_last {cl:8.1f} ms ({eager / cl:4.2f}x)   "
              f"train fp32 {fp32_tp:5.1f} img/s, profile settings {tp:5.1f} img/s ({tp / fp32_tp:4.2f}x)")
    out = cfg.output_dir / "benchmarks" / "models.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": info, "size": f"{args.width}x{args.height}", "models": rows}, indent=2))
    print("wrote", out)


def _crops(model, cfg, args, amp, device) -> dict:
    """Training img/s at each of --crops, the profile's batch, AMP and channels_last, side by side."""
    speeds = {}
    for crop in args.crops:
        h, w = (int(v) for v in crop.lower().split("x"))
        speeds[crop] = measure.train_throughput(model, cfg.data.batch_size, h, w, args.train_steps, amp,
                                                cfg.train.channels_last, device)
    first = speeds[args.crops[0]]
    print(f"{type(model).__name__:20s} " + "   ".join(f"{c}: {v:5.1f} img/s ({v / first:4.2f}x)"
                                                      for c, v in speeds.items()))
    return {"train_img_per_s": speeds}


def _precisions(model, cfg, args, device) -> dict:
    """Training img/s under each of --precisions (autocast dtype), the profile's crop and
    channels_last, in two interleaved rounds (the better of the two): what train.amp=auto chooses
    must be the faster one on this machine."""
    speeds = {}
    for _ in range(2):
        for amp in args.precisions:
            dtype = autocast_dtype(amp, device)
            v = measure.train_throughput(model, cfg.data.batch_size, *cfg.data.crop_size, args.train_steps, dtype,
                                         cfg.train.channels_last, device)
            speeds[amp] = max(speeds.get(amp, 0.0), v)
    first = speeds[args.precisions[0]]
    print(f"{type(model).__name__:20s} " + "   ".join(f"{a}: {v:5.1f} img/s ({v / first:4.2f}x)"
                                                      for a, v in speeds.items())
          + f"   (auto here: {autocast_dtype('auto', device)})")
    return {"train_img_per_s": speeds}


if __name__ == "__main__":
    main()
