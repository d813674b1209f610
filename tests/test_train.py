"""Models, the training engine, exact resume, NaN handling, DDP, MLflow, bad checkpoints."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from segstudy import interrupts
from segstudy.config_profiles import load_config
from segstudy.engine.measure import parameters
from segstudy.engine.training import train
from segstudy.errors import UserError
from segstudy.models.checkpoint import load_checkpoint
from segstudy.models.networks import PaddingAwareConv2d, build_model, plain_convs


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


# 64x128 is a 4x8 map at output stride 16: rates 6, 12, 18 skip rows, both, both; 256x512 (16x32) skips
# only rate 18's rows and nothing at rate 6
@pytest.mark.parametrize("size", [(64, 128), (256, 512)])
def test_deeplab_skips_only_the_taps_that_meet_padding(size):
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet50", 19, pretrained="false", output_stride=16).train()
    plain = plain_convs(copy.deepcopy(model))
    assert sum(type(m) is PaddingAwareConv2d for m in model.modules()) == 3
    assert not any(type(m) is PaddingAwareConv2d for m in plain.modules())
    x = torch.randn(2, 3, *size)
    outs = []
    for m in (model, plain):
        torch.manual_seed(1)  # the same dropout mask in ASPP's projection
        out = m(x)["out"]
        out.square().mean().backward()
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):  # float32 rounding apart
        assert (a.grad - b.grad).norm() <= 1e-4 * b.grad.norm() + 1e-8, name
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_a_traced_padding_aware_conv_serves_every_size():
    conv = PaddingAwareConv2d(4, 4, 3, padding=6, dilation=6).eval()
    traced = torch.jit.trace(conv, torch.randn(1, 4, 4, 8))  # a map where every off-centre tap is padding
    fx = torch.fx.symbolic_trace(conv)
    x = torch.randn(1, 4, 16, 32)
    with torch.no_grad():
        assert torch.allclose(traced(x), conv(x), atol=1e-6)
        assert torch.allclose(fx(x), conv(x), atol=1e-6)


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
    partial = train(cfg, progress=False)  # stopped in epoch 2, validated, usable
    assert not partial["finished"] and partial["capped_at_step"] == 6 and partial["steps"] == 6
    assert 0 <= partial["final"]["val_miou"] <= 1 and os.path.isfile(partial["checkpoint_best"])
    assert train(cfg, progress=False)["reused"]  # the same cap again: nothing to train
    resumed = train(_cfg(tmp_path / "b", tiny_root, **{"train.epochs": 3}), resume=True, progress=False)
    assert resumed["final"]["val_miou"] == full["final"]["val_miou"]
    assert resumed["final"]["train_loss"] == full["final"]["train_loss"]


@pytest.mark.parametrize("amp", ["none", "bf16"])  # bf16: what train.amp auto picks on some CPUs
def test_same_seed_same_metrics(tmp_path, tiny_root, amp):
    a = train(_cfg(tmp_path / "a", tiny_root, **{"train.amp": amp}), progress=False)
    b = train(_cfg(tmp_path / "b", tiny_root, **{"train.amp": amp}), progress=False)
    assert a["final"]["val_iou"] == b["final"]["val_iou"]


class _InterruptedWhileFinalized:
    """Ctrl-C arriving while Python runs a finalizer (SQLAlchemy's pool did it in a tuning worker)."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one, on purpose
def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_stops_the_training(tmp_path, tiny_root):
    cfg = _cfg(tmp_path, tiny_root, **{"train.epochs": 1})
    with interrupts.remembered():  # what the command line's main holds
        _InterruptedWhileFinalized()  # its KeyboardInterrupt is printed as "Exception ignored" and dropped
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)  # stopped at its first batch instead of running on
    assert not (tmp_path / "out" / "smoke" / "runs" / "custom" / "checkpoint_best.pt").exists()
    interrupts.check()  # nothing is remembered outside it


def test_failed_retries_never_replace_a_finished_run(tmp_path, tiny_root):
    cfg = _cfg(tmp_path, tiny_root, **{"train.epochs": 1})
    train(cfg, progress=False)
    run_dir = tmp_path / "out" / "smoke" / "runs" / "custom"
    before = {name: (run_dir / name).read_bytes() for name in ("checkpoint_best.pt", "result.json")}
    bad = _cfg(tmp_path, tiny_root, **{"train.epochs": 2, "train.lr": 1e30, "train.reuse": False})
    for _ in range(2):  # two failed retries in a row
        with pytest.raises(UserError, match="the loss diverged .* last good checkpoint is kept"):
            train(bad, progress=False)
        assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not run_dir.with_name("custom.previous").exists()
    # a retry that finishes replaces the run, and the earlier one is kept as <run>.previous
    result = train(_cfg(tmp_path, tiny_root, **{"train.epochs": 1, "seed": 1, "train.reuse": False}),
                   progress=False)
    previous = run_dir.with_name("custom.previous")
    assert (previous / "checkpoint_best.pt").read_bytes() == before["checkpoint_best.pt"]
    assert result["checkpoint_best"] == str(run_dir / "checkpoint_best.pt") and result["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "result.json").read_text())["history"] == result["history"]
    assert not list(run_dir.parent.glob("*.tmp*")) and not list(run_dir.glob("*.tmp*"))


def test_divergence_guard():
    from segstudy.engine.optimization import DivergenceGuard

    guard = DivergenceGuard()
    guard(3.0)
    guard(40.0)  # a bad step, not a divergence
    for diverged in (float("nan"), float("inf"), 2.9e9):
        with pytest.raises(FloatingPointError):
            guard(diverged)


def test_second_process_on_a_run_folder_is_refused(tmp_path, tiny_root):
    run_dir = tmp_path / "out" / "smoke" / "runs" / "custom"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib; from segstudy.engine.run_folder import lock\n"
        f"with lock(pathlib.Path({str(run_dir)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"run folder .*custom is in use by PID {holder.pid}"):
            train(_cfg(tmp_path, tiny_root, **{"train.epochs": 1}), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "result.json").exists()  # nothing was written by the refused run
    train(_cfg(tmp_path, tiny_root, **{"train.epochs": 1}), progress=False)  # a killed holder frees it


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    from segstudy.models.checkpoint import save_checkpoint

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"checkpoint_latest.{dead}.tmp.pt"
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / f"checkpoint_latest.{os.getppid()}.tmp.pt"  # a live writer's file stays
    mine.write_bytes(b"in progress")
    save_checkpoint({"model": {}}, tmp_path / "checkpoint_latest.pt")
    assert not stale.exists() and mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint_latest.pt", mine.name])


def test_bad_checkpoints(tmp_path, tiny_root):
    with pytest.raises(UserError, match="model.name = 'segformer' is unknown"):
        train(_cfg(tmp_path, tiny_root, **{"model.name": "segformer"}), progress=False)
    assert not (tmp_path / "out" / "smoke" / "runs").exists()  # a failed start writes nothing
    with pytest.raises(UserError, match="nothing to resume: .* has no checkpoint_latest.pt"):
        train(_cfg(tmp_path, tiny_root), resume=True, progress=False)
    train(_cfg(tmp_path, tiny_root, **{"train.epochs": 1, "model.name": "unet"}), progress=False)
    run_dir = tmp_path / "out" / "smoke" / "runs" / "unet"
    # no optimizer state
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_best.pt", "result.json", "settings.json",
                                                         "val_confusions.npy", "val_previews.npz"]
    with pytest.raises(UserError, match="finished, so it keeps no state to resume from"):
        train(_cfg(tmp_path, tiny_root, **{"model.name": "unet"}), resume=True, progress=False)
    # a run stopped in its second epoch (4 steps an epoch) keeps its resumable state
    other = tmp_path / "other"
    train(_cfg(other, tiny_root, **{"train.epochs": 2, "train.max_steps": 5, "model.name": "unet"}), progress=False)
    run_dir = other / "out" / "smoke" / "runs" / "unet"
    with pytest.raises(UserError, match="started with other settings \\(model.name 'unet' -> 'custom'\\)"):
        train(_cfg(tmp_path, tiny_root), resume=True, run_dir=run_dir, progress=False)
    (run_dir / "checkpoint_latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        train(_cfg(other, tiny_root, **{"model.name": "unet"}), resume=True, progress=False)


def test_unreadable_checkpoint_files(tmp_path):
    from segstudy.models.checkpoint import load_checkpoint, load_trained, save_checkpoint

    for name, data in (("empty.pt", b""), ("text.pt", b"hello, not a checkpoint\n")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=f"{name} is not a readable checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a segstudy checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    meta = {"model": "unet", "num_classes": 19, "model_config": {"name": "unet", "widht": 3}}
    save_checkpoint({"model": {}, "meta": meta}, tmp_path / "future.pt")
    with pytest.raises(UserError, match=r"keys this segstudy does not know \(\['widht'\]\)"):
        load_trained(tmp_path / "future.pt")


def test_ctrl_c_says_how_to_continue(monkeypatch, capsys):
    from segstudy import cli
    from segstudy.engine import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "train", interrupted)
    assert cli.main(["train", "--profile", "smoke"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the last checkpoint is kept: run the same command again to continue from it" in err
    assert "Traceback" not in err


def test_mlflow_run_and_registered_model(tmp_path, tiny_root):
    import mlflow

    from segstudy.deploy.registry import log_trained

    cfg = _cfg(tmp_path, tiny_root, **{"train.epochs": 1, "tracking.backend": "mlflow"})
    result = train(cfg, progress=False)
    uri = log_trained(cfg, result)  # the studies and `segstudy train` log the trained model
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out'}/mlflow.db")
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "val_miou" in run.data.metrics
    assert "val_iou_road" in run.data.metrics and "train_loss" in run.data.metrics
    versions = mlflow.MlflowClient().search_model_versions("name='segstudy-custom'")
    assert len(versions) == 1 and versions[0].run_id == result["mlflow_run_id"]  # into the training's run
    assert uri and mlflow.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(result["mlflow_run_id"], "train_loss")]
    assert steps == list(range(1, result["history"][-1]["step"] + 1))  # every step, written in batches


def test_step_values_reach_mlflow_in_batches(tmp_path, monkeypatch):
    import mlflow

    from segstudy import tracking

    cfg = load_config("smoke", {"tracking.backend": "mlflow", "output_root": str(tmp_path)}).tracking
    tracker = tracking.Tracker(cfg, tmp_path, "steps", {"a": 1})
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")

    def written() -> list[int]:
        return [m.step for m in client.get_metric_history(tracker.run_id, "train_loss")]

    for step in (1, 2):
        tracker.log_step({"train_loss": 1.0 / step}, step)
    assert written() == []  # held: less than STEP_FLUSH_S old
    monkeypatch.setattr(tracking, "STEP_FLUSH_S", 0.0)
    tracker.log_step({"train_loss": 0.3}, 3)
    assert written() == [1, 2, 3]
    monkeypatch.setattr(tracking, "STEP_FLUSH_S", 1e9)
    tracker.log_step({"train_loss": 0.2}, 4)
    tracker.log_metrics({"val_miou": 0.1}, 4)  # a validation writes the steps before it
    assert written() == [1, 2, 3, 4]
    tracker.log_step({"train_loss": 0.1}, 5)
    tracker.finish()
    assert written() == [1, 2, 3, 4, 5] and client.get_run(tracker.run_id).info.status == "FINISHED"


def _train_command(out, tiny_root, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segstudy", "train", "--profile", "smoke", "--set", f"data.root={tiny_root}",
            f"output_root={out}", "data.generate=false", "tracking.backend=none", *extra]


def test_killed_run_continues_to_the_same_metrics(tmp_path, tiny_root):
    """SIGKILL in the middle of an epoch, then the same command: the run continues from its last
    checkpoint (no --resume) and ends with the metrics of a run that was never interrupted."""
    settings = ["train.epochs=3", "train.checkpoint_every=1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(_train_command(tmp_path / "a", tiny_root, *settings), check=True, env=env,
                   capture_output=True, timeout=600)
    reference = json.loads((tmp_path / "a" / "smoke" / "runs" / "custom" / "result.json").read_text())
    run_dir = tmp_path / "b" / "smoke" / "runs" / "custom"
    proc = subprocess.Popen(_train_command(tmp_path / "b", tiny_root, *settings), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoint_latest.pt"
    while proc.poll() is None and _saved_step(latest) < 6:  # 4 steps an epoch: step 6 is mid-epoch 2
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the training ended before it could be killed"
    killed_at = _saved_step(latest)
    assert 6 <= killed_at < 12 and not (run_dir / "result.json").exists()
    again = subprocess.run(_train_command(tmp_path / "b", tiny_root, *settings), env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"(step {killed_at})" in again.stdout  # continued, not started over
    result = json.loads((run_dir / "result.json").read_text())
    assert result["finished"] and result["steps"] == reference["steps"] == 12
    for got, want in zip(result["history"], reference["history"], strict=True):
        assert (got["train_loss"], got["val_miou"], got["val_iou"]) == \
            (want["train_loss"], want["val_miou"], want["val_iou"])


def _saved_step(path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


def test_two_processes_follow_the_one_process_loss_curve(tmp_path, tiny_root):
    """train.gpus = 2 (torchrun, gloo on CPU) against one process at the same global batch: the
    same samples and crops in every step, so the same loss curve up to BatchNorm statistics, which
    CPU ranks compute over their own half of the batch (torch's SyncBatchNorm needs GPUs)."""
    over = {"train.epochs": 4, "data.batch_size": 4, "model.name": "unet", "tracking.backend": "none"}
    one = train(_cfg(tmp_path / "one", tiny_root, **over), progress=False)
    two = train(_cfg(tmp_path / "two", tiny_root, **over, **{"train.gpus": 2}), progress=False)
    assert two["finished"] and two["steps"] == one["steps"] == 8  # 8 images, global batch 4: 2 steps an epoch
    curve_one = [h["train_loss"] for h in one["history"]]
    curve_two = [h["train_loss"] for h in two["history"]]
    assert curve_two == pytest.approx(curve_one, rel=0.02)
    assert curve_two[-1] < curve_two[0]


def test_criterion_aux_and_ignore():
    from segstudy.config import LossConfig
    from segstudy.models.losses import build_loss, with_aux

    criterion = with_aux(build_loss(LossConfig("ce")), aux_weight=0.5)
    logits = torch.zeros(1, 3, 1, 2)
    target = torch.tensor([[[0, 255]]])
    assert criterion({"out": logits}, target).item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    both = criterion({"out": logits, "aux": logits}, target)
    assert both.item() == pytest.approx(1.5 * torch.log(torch.tensor(3.0)).item())
