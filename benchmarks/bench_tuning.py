"""The profile's tuning study against one plain training of the same budget, in one process.

    python benchmarks/bench_tuning.py [--profile demo] [--out /tmp/bench-tuning]

First one `train()` with the trials' budget (tune.model, tune.epochs, tune.max_images) and the
profile's own settings, then notebook 06's calls (tuning.start, optimize_until tune.trials, save) on a
fresh study under --out. Prints the load average, each one's wall and CPU seconds, the study's
trials by state and best parameters, and the ratios (docs/tuning.md, "The demo's study").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from segstudy.config_profiles import load_config
from segstudy.engine import measure
from segstudy.engine.training import train
from segstudy.studies import tune_space, tuning


def _timed(call) -> tuple[object, dict]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = call()
    return value, {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="demo", help="profile (params/) or YAML file (default: demo)")
    p.add_argument("--out", default=None, help="output_root for both (default: a new temporary folder)")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench-tuning-")
    cfg = load_config(args.profile, {"output_root": out})
    print(f"{measure.cpu_info()['cpu']}, load average {os.getloadavg()[0]:.1f} (1 min)", flush=True)
    result, plain = _timed(lambda: train(tune_space.budget_config(cfg), run_dir=f"{out}/plain", progress=False,
                                         keep_weights=False))
    print("PLAIN", json.dumps(plain | {"best_miou": result["best_miou"]}), flush=True)

    def study() -> dict:
        tuned = tuning.start(args.profile, {"output_root": out})
        tuning.optimize_until(tuned, cfg.tune.trials)
        return tuning.save(tuned)

    summary, cost = _timed(study)
    print("STUDY", json.dumps(cost | {"states": {k: v for k, v in summary["states"].items() if v},
                                      "best": summary["best"]}), flush=True)
    print(f"RATIO wall {cost['wall_s'] / plain['wall_s']:.2f} cpu {cost['cpu_s'] / plain['cpu_s']:.2f}; "
          f"load average {os.getloadavg()[0]:.1f}; files in {out}")


if __name__ == "__main__":
    main()
