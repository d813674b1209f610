"""Models, the training engine, exact resume, NaN handling, DDP, MLflow, bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from segstudy.config import load_config
from segstudy.engine.measure import parameters
from segstudy.engine.training import train
from segstudy.errors import UserError
from segstudy.models.checkpoint import load_checkpoint
from segstudy.models.networks import build_model


@pytest.mark.parametrize("name,os_", [("unet", 16), ("deeplabv3_resnet50", 8), ("deeplabv3_resnet50", 16),
                                      ("custom", 8), ("custom", 16), ("custom", 32)])
def test_model_shapes(name, os_):
    model = build_model(name, 19, pretrained="false", output_stride=os_, aux_loss=True, unet_base=8,
                        head_channels=32).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 72, 136))  # not a multiple of 32 on purpose
    assert out["out"].shape == (1, 19, 72, 136)
    if name == "deeplabv3_resnet50":
        assert out["aux"].shape == (1, 19, 72, 136)
    assert parameters(model) > 0


def test_unknown_model_and_pretrained_true_without_weights(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="model.name = 'resnet' is unknown; choose one of unet"):
        build_model("resnet")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="pretrained = true but the ImageNet ResNet-50 weights are not in"):
        build_model("custom", pretrained="true")
    model = build_model("custom", pretrained="auto")  # falls back to random init, says so
    assert isinstance(model, torch.nn.Module)


def _cfg(tmp_path, tiny_root, **over):
    base = {"data.root": str(tiny_root), "output_root": str(tmp_path / "out"), "data.generate": False}
    return load_config("smoke", base | over)


def test_training_reduces_loss(tmp_path, tiny_root):
    cfg = _cfg(tmp_path, tiny_root, **{"train.epochs": 4, "model.name": "unet"})
    result = train(cfg, progress=False)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    assert result["finished"] and result["best_miou"] > 0
    ckpt = load_checkpoint(result["checkpoint_best"])  # weights_only=True
    assert ckpt["meta"]["model"] == "unet"


def test_resume_is_exact(tmp_path, tiny_root):
    full = train(_cfg(tmp_path / "a", tiny_root, **{"train.epochs": 3}), progress=False)
    cfg = _cfg(tmp_path / "b", tiny_root, **{"train.epochs": 3, "train.max_steps": 6})
    partial = train(cfg, progress=False)  # "interrupted" in epoch 2: checkpoint from epoch 1
    assert not partial["finished"]
    resumed = train(_cfg(tmp_path / "b", tiny_root, **{"train.epochs": 3}), resume=True, progress=False)
    assert resumed["final"]["val_miou"] == full["final"]["val_miou"]
    assert resumed["final"]["train_loss"] == full["final"]["train_loss"]


def test_same_seed_same_metrics(tmp_path, tiny_root):
    a = train(_cfg(tmp_path / "a", tiny_root), progress=False)
    b = train(_cfg(tmp_path / "b", tiny_root), progress=False)
    assert a["final"]["val_iou"] == b["final"]["val_iou"]


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, tiny_root):
    cfg = _cfg(tmp_path, tiny_root, **{"train.epochs": 1})
    train(cfg, progress=False)
    latest = tmp_path / "out" / "smoke" / "runs" / "custom" / "checkpoint_latest.pt"
    before = latest.read_bytes()
    bad = _cfg(tmp_path, tiny_root, **{"train.epochs": 2, "train.lr": 1e30})
    with pytest.raises(UserError, match="the loss became .* last good checkpoint is kept"):
        train(bad, progress=False)
    assert latest.read_bytes() == before
    # a retrain that gets past its first epoch keeps the earlier run as <run>.previous
    train(_cfg(tmp_path, tiny_root, **{"train.epochs": 1, "seed": 1}), progress=False)
    previous = latest.parent.with_name("custom.previous") / "checkpoint_latest.pt"
    assert previous.read_bytes() == before and latest.read_bytes() != before


def test_bad_checkpoints(tmp_path, tiny_root):
    with pytest.raises(UserError, match="model.name = 'segformer' is unknown"):
        train(_cfg(tmp_path, tiny_root, **{"model.name": "segformer"}), progress=False)
    assert not (tmp_path / "out" / "smoke" / "runs").exists()  # a failed start writes nothing
    with pytest.raises(UserError, match="checkpoint .*checkpoint_latest.pt does not exist"):
        train(_cfg(tmp_path, tiny_root), resume=True, progress=False)
    train(_cfg(tmp_path, tiny_root, **{"train.epochs": 1, "model.name": "unet"}), progress=False)
    run_dir = tmp_path / "out" / "smoke" / "runs" / "unet"
    with pytest.raises(UserError, match="holds a 'unet' model .* but the params ask for 'custom'"):
        train(_cfg(tmp_path, tiny_root), resume=True, run_dir=run_dir, progress=False)
    (run_dir / "checkpoint_latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        train(_cfg(tmp_path, tiny_root, **{"model.name": "unet"}), resume=True, progress=False)


def test_mlflow_run_and_registered_model(tmp_path, tiny_root):
    import mlflow

    cfg = _cfg(tmp_path, tiny_root, **{"train.epochs": 1, "tracking.backend": "mlflow"})
    result = train(cfg, progress=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out'}/mlflow.db")
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "val_miou" in run.data.metrics
    assert "val_iou_road" in run.data.metrics and "latency_ms" in run.data.metrics
    versions = mlflow.MlflowClient().search_model_versions("name='segstudy-custom'")
    assert len(versions) == 1 and versions[0].run_id == result["mlflow_run_id"]


def test_ddp_two_gloo_processes(tmp_path, tiny_root):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "segstudy", "train", "--params", "smoke", "--set", f"data.root={tiny_root}",
           f"output_root={out}", "data.generate=false", "train.epochs=1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "smoke" / "runs" / "custom" / "result.json").read_text())
    # 8 images, batch 2, 2 ranks: 2 steps per epoch on each rank
    assert result["finished"] and result["steps"] == 2
    assert 0 <= result["final"]["val_miou"] <= 1


def test_criterion_aux_and_ignore():
    from segstudy.config import LossConfig
    from segstudy.models.losses import build_loss, with_aux

    criterion = with_aux(build_loss(LossConfig("ce")), aux_weight=0.5)
    logits = torch.zeros(1, 3, 1, 2)
    target = torch.tensor([[[0, 255]]])
    assert criterion({"out": logits}, target).item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    both = criterion({"out": logits, "aux": logits}, target)
    assert both.item() == pytest.approx(1.5 * torch.log(torch.tensor(3.0)).item())
