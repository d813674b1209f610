"""Faults from outside and odd inputs: each says one clear line and writes nothing wrong.

16-bit and EXIF-rotated images, a truncated settings.json, predict over bad files and with other
kinds of files, a locked MLflow database, a full disk, two first runs at once, a failed notebook.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segstudy.cli import main
from segstudy.config_profiles import load_config
from segstudy.deploy import inference
from segstudy.errors import UserError


def _png(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **options)
    return buf.getvalue()


def _photo(tiny_root: Path) -> np.ndarray:
    with Image.open(next((tiny_root / "leftImg8bit" / "val").rglob("*.png"))) as im:
        return np.asarray(im.convert("RGB"))


def test_16_bit_grey_gives_the_labels_of_its_8_bit_twin(smoke_model, tiny_root):
    engine = inference.load_engine(smoke_model["checkpoint_best"])
    grey = np.asarray(Image.fromarray(_photo(tiny_root)).convert("L"))
    eight, sixteen = _png(Image.fromarray(grey)), _png(Image.fromarray(grey.astype(np.uint16) * 257))
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")  # PIL reads it as 16-bit
    a, b = (inference.segment(engine, inference.decode_image(d), 64) for d in (eight, sixteen))
    np.testing.assert_array_equal(inference.decode_image(sixteen), inference.decode_image(eight))
    np.testing.assert_array_equal(a, b)


def test_an_exif_rotated_jpeg_is_segmented_upright(smoke_model, tiny_root):
    engine = inference.load_engine(smoke_model["checkpoint_best"])
    upright = _photo(tiny_root)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the phone stored it turned the other way
    sideways = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(sideways, "JPEG", quality=100,
                                                                      exif=exif.tobytes())
    twin = io.BytesIO()
    Image.fromarray(upright).save(twin, "JPEG", quality=100)
    rotated, plain = inference.decode_image(sideways.getvalue()), inference.decode_image(twin.getvalue())
    assert rotated.shape == plain.shape == upright.shape
    a, b = inference.segment(engine, rotated, 64), inference.segment(engine, plain, 64)
    assert a.shape == upright.shape[:2] and (a == b).mean() > 0.99  # JPEG rounding differs a little


def test_a_truncated_settings_file_starts_over(tmp_path, tiny_root, capsys):
    from segstudy.engine.training import train

    base = {"data.root": str(tiny_root), "output_root": str(tmp_path), "data.generate": False,
            "model.name": "unet", "train.epochs": 2}
    train(load_config("smoke", base | {"train.max_steps": 1}), progress=False)  # unfinished, resumable
    run_dir = tmp_path / "smoke" / "runs" / "unet"
    settings = run_dir / "settings.json"
    settings.write_text(settings.read_text()[:40])  # a crash or a full disk cut it short
    capsys.readouterr()
    result = train(load_config("smoke", base | {"train.lr": 0.02}), progress=False)
    assert "no readable settings recorded" in capsys.readouterr().out
    assert result["settings"]["train.lr"] == 0.02 and result["history"][0]["step"] == 4  # from step 0
    assert json.loads(settings.read_text())["train.lr"] == 0.02


def _checkpoint_of(tmp_path: Path, name: str) -> Path:
    from segstudy.models.checkpoint import save_model
    from segstudy.models.networks import build_model

    config = {"name": name, "pretrained": False, "unet_base": 8}
    model = build_model(num_classes=19, **config)
    return save_model(model, {"model": name, "num_classes": 19, "model_config": config}, tmp_path / f"{name}.pt")


def test_predict_names_the_architecture_it_loaded_and_goes_on_past_bad_files(tmp_path, tiny_root, capsys):
    unet = _checkpoint_of(tmp_path, "unet")
    inputs = tmp_path / "in"
    inputs.mkdir()
    photo = _png(Image.fromarray(_photo(tiny_root)))
    (inputs / "a.png").write_bytes(photo)
    (inputs / "b.png").write_bytes(b"")  # an empty file between two good ones
    (inputs / "c.png").write_bytes(photo)
    rc = main(["predict", "--model", str(unet), "--input", str(inputs), "--out", str(tmp_path / "out"),
               "--profile", "smoke"])  # smoke's model.name is custom
    out, err = capsys.readouterr()
    assert rc == 2
    assert "holds a unet model, not the profile's model.name (custom): predicting with unet" in out
    assert "refused: " in err and "b.png is empty" in err
    assert "1 of 3 input files were refused (each named above); the other 2 were segmented" in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*_labelIds.png")) == ["a_labelIds.png", "c_labelIds.png"]


def test_predict_says_what_another_study_file_is(tmp_path, tiny_root, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"miou": 0.5}))
    script = torch.jit.script(torch.nn.Conv2d(3, 19, 1))
    torch.jit.save(script, str(tmp_path / "custom_int8_fx.pt"))
    image = tmp_path / "x.png"
    image.write_bytes(_png(Image.fromarray(_photo(tiny_root))))
    for model, what in (("results.json", "is a JSON file (a results or settings file of the study), not a model"),
                        ("custom_int8_fx.pt", "is a TorchScript model (notebook 05's int8 export")):
        assert main(["predict", "--model", str(tmp_path / model), "--input", str(image), "--out",
                     str(tmp_path / "o"), "--profile", "smoke"]) == 2
        err = capsys.readouterr().err
        assert what in err and "delete" not in err and "arbitrary code" not in err
    assert main(["predict", "--model", str(tmp_path / "custom_int8_fx.pt"), "--input", str(tmp_path / "results.json"),
                 "--out", str(tmp_path / "o"), "--profile", "smoke"]) == 2
    assert main(["predict", "--model", "m.onnx", "--input", str(tmp_path / "custom_int8_fx.pt"), "--out",
                 str(tmp_path / "o"), "--profile", "smoke"]) == 2
    assert "is a model file; pass it as --model" in capsys.readouterr().err


def test_a_locked_mlflow_database_is_one_line_and_the_run_ends_failed(tmp_path, monkeypatch, capfd):
    import mlflow

    from segstudy import tracking

    monkeypatch.setattr(tracking, "LOCK_ATTEMPTS", 1)  # MLflow itself waits 20 s per call
    cfg = load_config("smoke", {"tracking.backend": "mlflow", "output_root": str(tmp_path)}).tracking
    tracker = tracking.Tracker(cfg, tmp_path, "locked", {"a": 1})
    db = tmp_path.resolve() / "mlflow.db"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(db)!r}, isolation_level=None); c.execute('BEGIN EXCLUSIVE')\n"
        "print('held', flush=True); sys.stdin.readline()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"the MLflow database sqlite:///{db} stayed locked \(logging step 1 "
                                            r".*--set tracking.uri=") as raised:
            tracker.log_metrics({"loss": 1.0}, 1)
        assert "\n" not in str(raised.value)
    finally:
        holder.communicate("\n", timeout=30)  # the other process lets go
    assert "Traceback" not in capfd.readouterr().err  # MLflow's SQLAlchemy traceback is not shown
    tracker.finish("FAILED")
    assert mlflow.MlflowClient(f"sqlite:///{db}").get_run(tracker.run_id).info.status == "FAILED"


def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    from segstudy.models import checkpoint

    path = checkpoint.save_checkpoint({"model": {"w": torch.zeros(1000)}}, tmp_path / "checkpoint_best.pt")
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 4100")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError, match=rf"no space left to write {path}: it needs at least 3.9 KB, .* MB are free"):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(1000)}}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_full_disk_under_papermill_is_one_line(tmp_path, monkeypatch):
    from segstudy import notebook_runner

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(notebook_runner.pm, "execute_notebook", full_disk)
    nb = notebook_runner.list_notebooks(only=["00"])[0]
    with pytest.raises(UserError, match=r"no space left to write .*00_data_exploration.ipynb"):
        notebook_runner.execute(nb, tmp_path / nb.name, "smoke", {}, progress=False)


def test_two_first_runs_generate_the_dataset_once(tmp_path):
    root = tmp_path / "synth"
    code = ("import sys; from segstudy.config import SynthConfig; "
            "from segstudy.data.synthetic.dataset import ensure_dataset; "
            f"print(ensure_dataset({str(root)!r}, SynthConfig(train=6, val=2, height=64, width=128), workers=1))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(out.strip().splitlines()[-1] for out, _ in results) == ["False", "True"]  # one made it
    assert len(list((root / "leftImg8bit" / "train").rglob("*.png"))) == 6


def test_a_failed_notebook_keeps_its_own_executed_copy(tmp_path):
    import nbformat

    from segstudy import notebook_runner

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "smoke"\noverrides = {}', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "99_fails.ipynb"
    nbformat.write(nb, source)
    executed = tmp_path / "out" / source.name
    with pytest.raises(UserError, match="ValueError: boom. The executed copy with the full traceback is ") as raised:
        notebook_runner.execute(source, executed, "smoke", {}, progress=False)
    kept = Path(str(raised.value).rsplit(" is ", 1)[1])
    assert kept.is_file() and kept != executed and kept.parent == executed.parent / "failed"
    assert "boom" in kept.read_text()


def test_ctrl_c_during_a_notebook_prints_only_the_clean_line(tmp_path, tiny_root):
    import signal

    cmd = [sys.executable, "-m", "segstudy", "run", "--profile", "smoke", "--only", "01", "--set",
           f"output_root={tmp_path}", f"data.root={tiny_root}", "data.generate=false", "train.epochs=500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # a training is under way in the notebook's kernel
        if line.startswith("[segstudy] unet epoch"):
            break
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("Executing")]
    assert proc.returncode == 130
    assert lines == ["segstudy run: interrupted; run the same command again: finished trainings are reused "
                     "(train.reuse), an interrupted one continues from its last checkpoint, and the notebooks "
                     "run again"], err[-3000:]
    assert (tmp_path / "smoke" / "01_baselines.kernel.log").is_file()  # the kernel's own noise went there


def _together(code: str, n: int, timeout: float = 300) -> list[tuple[int, str, str]]:
    """`code` in `n` processes started together: each imports, prints "ready", then waits for one
    line on stdin, so all of them reach the code under test at the same moment."""
    prelude = "import sys\nprint('ready', flush=True); sys.stdin.readline()\n"
    # mlflow.set_tracking_uri in an earlier test wrote MLFLOW_TRACKING_URI, which would win over output_root
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-c", code.replace("#GO\n", prelude)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.communicate(timeout=timeout)
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_processes_starting_together_create_the_mlflow_database_once(tmp_path):
    # what two `segstudy train` (or tune workers) do first on a fresh output root; both ran MLflow's
    # schema migration, and one failed with "duplicate column name" or "table ... already exists"
    code = ("import mlflow.store.tracking.sqlalchemy_store\nfrom segstudy.config_profiles import load_config\n"
            "from segstudy import tracking\n"
            f"cfg = load_config('smoke', {{'tracking.backend': 'mlflow', 'output_root': {str(tmp_path)!r}}})\n"
            "#GO\n"
            "tracker = tracking.Tracker(cfg.tracking, cfg.output_root, 'together', {'a': 1})\n"
            "tracker.finish()\n")
    results = _together(code, 2)
    procs = [(rc, err[-2000:]) for rc, _, err in results]
    assert [rc for rc, _ in procs] == [0, 0], procs
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name(load_config("smoke").tracking.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 2  # one experiment, both runs in it
