"""One of torchrun's processes (engine.launch.torchrun starts them): train() with the config file
torchrun() wrote. Its result is read back from the run folder, and the caller logs the model, so the
worker logs none. A module of its own so that training (which starts torchrun) and this entry point
(which trains) import each other in one direction only."""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from segstudy.config_profiles import load_config
from segstudy.engine.training import train
from segstudy.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__name__}", description="a worker of engine.launch.torchrun")
    p.add_argument("config", help="the YAML file torchrun() wrote (the whole config)")
    p.add_argument("model")
    p.add_argument("run_dir")
    p.add_argument("--no-keep-weights", action="store_true")
    args = p.parse_args(argv)
    try:
        train(load_config(args.config), model_name=args.model, run_dir=args.run_dir,
              keep_weights=not args.no_keep_weights)
    except UserError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        # the process group's threads must stop before the interpreter does: exiting with them still
        # running aborts the rank ("terminate called without an active exception", SIGABRT)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
