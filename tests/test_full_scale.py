"""What only a real `./run_all.sh full` on a GPU box would meet, simulated on CPU: hours-long cells,
a box with only CITYSCAPES_ROOT exported, advice as a shell passes it, --gpus N through tuning, DDP
validation over a world size that does not divide the set, resuming with fewer GPUs, one training
loader for every epoch."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from segstudy import cli
from segstudy.config_profiles import load_config
from segstudy.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SEGSTUDY = [sys.executable, "-m", "segstudy"]
# full's sizes cut to the tiny data, on CPU; everything else (datasets, variables, the space) is full's
TINY_FULL = ["device=cpu", "model.pretrained=false", "model.head_channels=16", "data.base_size=64",
             "data.crop_size=[64, 128]", "data.batch_size=2", "data.num_workers=0", "train.max_steps=1",
             "train.amp=none", "train.channels_last=false", "tracking.backend=none"]


def _only_cityscapes(tiny_root: Path) -> dict[str, str]:
    """The environment of a GPU box where only CITYSCAPES_ROOT was exported."""
    env = {k: v for k, v in os.environ.items() if k not in ("BDD100K_ROOT", "NUIMAGES_ROOT")}
    return env | {"CITYSCAPES_ROOT": str(tiny_root), "OMP_NUM_THREADS": "1"}


def _segstudy(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(SEGSTUDY + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _sleeping_notebook(path: Path, seconds: float) -> Path:
    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('profile = "smoke"\noverrides = {}')
    parameters.metadata["tags"] = ["parameters"]
    nb.cells = [parameters, nbformat.v4.new_code_cell(f"import time\ntime.sleep({seconds})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_a_cell_has_no_time_limit_unless_one_is_given(tmp_path):
    """A training cell of full runs for hours: `run` and `sweep` set no per-cell limit by default; an
    explicit --timeout still stops a cell, in one line that says what to do."""
    from segstudy.notebook_runner import execute

    parser = cli.build_parser()
    assert parser.parse_args(["run"]).timeout is None
    assert parser.parse_args(["sweep", "nb.ipynb", "-p", "seed", "0"]).timeout is None
    notebook = _sleeping_notebook(tmp_path / "00_sleep.ipynb", 2.5)
    with pytest.raises(UserError, match=r"ran longer than --timeout 1 s and was stopped; run again with a larger"):
        execute(notebook, tmp_path / "out" / notebook.name, "smoke", {}, timeout=1, progress=False)
    assert execute(notebook, tmp_path / "out" / notebook.name, "smoke", {}, progress=False) >= 2.5


def test_set_given_twice_keeps_both():
    """Advice appended as a second --set must not drop the first one's overrides."""
    args = cli.build_parser().parse_args(["run", "--set", "seed=1", "--only", "00", "--set", "cross.mix=[]"])
    assert args.set == ["seed=1", "cross.mix=[]"]


def test_only_cityscapes_root_the_plan_leaves_the_others_out_and_its_advice_works_as_typed(tiny_root):
    env = _only_cityscapes(tiny_root)
    first = _segstudy(["plan", "--profile", "full", "--assume-tflops", "60"], env)
    assert first.returncode == 0, first.stderr
    line = next(x for x in first.stdout.splitlines() if "left out of this run" in x)
    assert line.startswith("[segstudy] BDD100K_ROOT and NUIMAGES_ROOT not set: bdd100k, nuimages left out")
    advice = line.split("as with ", 1)[1].split(" (to include", 1)[0]
    assert advice == "--set cross.bdd100k.root= cross.nuimages.root= 'cross.mix=[]'"
    # the advice as a shell passes it: the quotes gone, `root=` with nothing after it
    typed = _segstudy(["plan", "--profile", "full", "--assume-tflops", "60", *shlex.split(advice)], env)
    assert typed.returncode == 0, typed.stderr
    assert "left out" not in typed.stdout and "02 cross" not in typed.stdout
    assert typed.stdout.count("\n") < first.stdout.count("\n") + 1  # no mixed training, no cross evaluation


def test_only_cityscapes_root_trains_the_kubernetes_jobs_model(tiny_root, tmp_path):
    """The Job's command (segstudy train --profile full --model custom) needs no other dataset."""
    done = _segstudy(["train", "--profile", "full", "--model", "custom", "--no-log-model", "--set", *TINY_FULL,
                      f"output_root={tmp_path}"], _only_cityscapes(tiny_root))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "full" / "runs" / "custom" / "checkpoint_best.pt").is_file()


def test_only_cityscapes_root_tunes_under_gpus_n(tiny_root, tmp_path):
    """`./run_all.sh full --gpus 4` reaches notebook 06 with train.gpus=4: the study runs, each trial in
    one process on one GPU, and one line says how to use the others."""
    done = _segstudy(["tune", "--profile", "full", "--trials", "1", "--set", *TINY_FULL, "train.gpus=4",
                      "tune.epochs=1", "tune.max_images=4", f"output_root={tmp_path}"], _only_cityscapes(tiny_root))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train.gpus = 4, but a trial trains in one process on one GPU" in done.stdout
    assert "for N = 0 ... 3" in done.stdout
    assert "1 complete" in done.stdout and "failed" not in done.stdout.split("trials (", 1)[1].split(")")[0]


# -- DDP validation: every image once, per-image confusions as in one process -----------------------

WORKER = """
import sys
import numpy as np, torch
from segstudy.config_profiles import load_config
from segstudy.data.datasets import build_dataset
from segstudy.engine.device import init_distributed
from segstudy.engine.evaluation import confusion_over, eval_loader
from segstudy.models.networks import build_model

cfg = load_config("smoke", {"data.root": sys.argv[1], "data.generate": False, "data.max_images": 5,
                            "data.batch_size": 6})
device = torch.device("cpu")
rank, world = init_distributed(device)
torch.manual_seed(0)
model = build_model("unet", 19, pretrained="false", unet_base=8)
loader = eval_loader(build_dataset(cfg.data, cfg.data.val_split), cfg, device, rank, world)
cm = confusion_over(model, loader, device, per_image=True)
if rank == 0:
    np.savez(sys.argv[2], total=cm.mat.numpy(), per_image=cm.per_image, batch=loader.batch_size)
if world > 1:
    torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ddp_validation_scores_every_image_once(world, tiny_root, tmp_path):
    """5 validation images over 2 or 3 gloo processes: the same confusion totals and the same per-image
    array as one process (DistributedSampler would pad and count an image twice), the batch per rank."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"world{world}.npz"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)] if world > 1 else []
    cmd = [sys.executable, *launcher, str(script), str(tiny_root), str(out)]
    done = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(out)
    reference = tmp_path / "reference.npz"
    subprocess.run([sys.executable, str(script), str(tiny_root), str(reference)], check=True,
                   env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    ref = np.load(reference)
    assert got["per_image"].shape == ref["per_image"].shape == (5, 19, 20)
    np.testing.assert_array_equal(got["total"], ref["total"])
    np.testing.assert_array_equal(got["per_image"], ref["per_image"])
    assert int(got["batch"]) == 6 // world


# -- resuming with fewer visible GPUs ---------------------------------------------------------------

def test_rng_states_of_more_gpus_than_visible_restore(monkeypatch):
    """A checkpoint from a 4-GPU run (one RNG state per visible GPU, as get_rng_state_all wrote them)
    resumed where one GPU is visible: only that GPU's state is set; the CPU state is restored exactly."""
    from segstudy.models.checkpoint import rng_state, set_rng_state

    saved = rng_state() | {"cuda": [torch.zeros(16, dtype=torch.uint8) + i for i in range(4)]}
    expected = torch.rand(3)
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_calls.append((state, device)))
    set_rng_state(saved)
    assert len(set_calls) == 1 and torch.equal(set_calls[0][0], saved["cuda"][0])
    torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # and on CPU: nothing to set
    set_calls.clear()
    set_rng_state(saved)
    assert not set_calls


# -- one training loader, its workers kept across epochs ---------------------------------------------

def test_training_builds_one_loader_for_every_epoch(tmp_path, tiny_root, monkeypatch):
    from segstudy.engine import training

    built = []
    real = training.build_loader
    monkeypatch.setattr(training, "build_loader", lambda *a, **k: built.append(k) or real(*a, **k))
    cfg = load_config("smoke", {"data.root": str(tiny_root), "data.generate": False, "output_root": str(tmp_path),
                                "train.epochs": 3, "model.name": "unet", "data.num_workers": 1})
    result = training.train(cfg, progress=False)
    assert result["finished"] and result["epochs"] == 3
    assert len(built) == 1 and built[0]["num_workers"] == 1  # persistent_workers follows num_workers > 0


def test_cudnn_picks_its_fastest_kernels_on_cuda_only(monkeypatch):
    from segstudy.engine.training import fixed_shape_kernels

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    fixed_shape_kernels(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    fixed_shape_kernels(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
