"""Several GPUs from the notebooks' flow: with train.gpus = N > 1, `train` hands a training to
`torchrun --nproc_per_node N -m segstudy.engine.torchrun_worker`, the engine's own worker entry point, with
the same settings (the whole config as one YAML file) and reads back its result. The worker calls
the same `engine.training.train`, so a notebook, `./run_all.sh full --gpus N` and the Kubernetes
Job (`segstudy train ... --set train.gpus=4`) train alike; the engine does not depend on the CLI's flags.
(On a CPU-only machine the N processes use gloo: that is how the tests run it.)"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from segstudy.config import Config
from segstudy.config_profiles import load_config
from segstudy.engine import run_folder
from segstudy.errors import UserError

WORKER = "segstudy.engine.torchrun_worker"  # the module torchrun runs in each process


def wanted(cfg: Config) -> bool:
    """More than one process asked for, and this is not already one of torchrun's processes."""
    return cfg.train.gpus > 1 and "WORLD_SIZE" not in os.environ


def torchrun(cfg: Config, model_name: str, run_dir: Path, keep_weights: bool) -> dict:
    """Train `model_name` on cfg.train.gpus processes; its output streams here; returns its result."""
    with tempfile.TemporaryDirectory(prefix="segstudy-launch-") as tmp:
        params = Path(tmp) / f"{cfg.profile}.yaml"
        params.write_text(yaml.safe_dump(cfg.to_dict() | {"overrides": {}}, sort_keys=False))
        if (written := load_config(params)).to_dict() | {"overrides": {}} != cfg.to_dict() | {"overrides": {}}:
            raise UserError(f"the config written for torchrun ({params}) reads back as another: "
                            f"{run_folder.changed_settings(cfg.to_dict(), written.to_dict())}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(cfg.train.gpus), "-m", WORKER, str(params), model_name, str(run_dir),
               *([] if keep_weights else ["--no-keep-weights"])]
        print(f"[segstudy] {model_name}: torchrun on {cfg.train.gpus} processes, global batch "
              f"{cfg.data.batch_size}", flush=True)
        tail = _stream(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    if tail:
        raise UserError(f"the {cfg.train.gpus}-process training of {model_name} failed; its last lines:\n"
                        + "".join(tail))
    return _result(run_dir)


def _stream(proc: subprocess.Popen) -> list[str]:
    """Print the processes' output as it comes; on failure, return its last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=12)
    for line in proc.stdout:
        print(line, end="", flush=True)
        tail.append(line)
    return [] if proc.wait() == 0 else list(tail)


def _result(run_dir: Path) -> dict:
    """result.json of the run just trained: run_dir, or `<run>.next` when a retry beside a finished
    run stopped early (train.max_steps)."""
    folders = [f for f in (run_dir, run_folder.staging(run_dir)) if (f / "result.json").is_file()]
    newest = max(folders, key=lambda f: (f / "result.json").stat().st_mtime, default=None)
    result = run_folder.read_result(newest) if newest else None
    if result is None:
        raise UserError(f"the distributed training wrote no readable result.json in {run_dir}")
    return result
