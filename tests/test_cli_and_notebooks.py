"""The CLI end to end, and notebook 00 executed by papermill on the smoke profile."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from PIL import Image

from segstudy.data import labels
from segstudy.data.cityscapes import cityscapes_samples
from segstudy.notebook_runner import run_notebooks
from segstudy.studies.verdicts import miou


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segstudy", *args], capture_output=True, text=True,
                          timeout=300)


def test_synth_and_evaluate_cli(tmp_path):
    root = tmp_path / "ds"
    r = _cli("synth", "--out", str(root), "--train", "2", "--val", "3", "--height", "64",
             "--width", "128", "--workers", "1")
    assert r.returncode == 0, r.stderr
    pred = tmp_path / "pred"
    pred.mkdir()
    for s in cityscapes_samples(root, "val"):  # perfect predictions, via train ids and back
        gt = labels.to_label_ids(labels.to_train_ids(np.array(Image.open(s.label))))
        Image.fromarray(gt).save(pred / f"{s.stem}_labelIds.png")
    r = _cli("evaluate", "--data-root", str(root), "--split", "val", "--pred-dir", str(pred), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["miou"] == 1.0 and result["n_images"] == 3
    assert all(v in (1.0, None) for v in result["iou"].values())
    # bad input: one line on stderr, exit code 2, no traceback
    r = _cli("evaluate", "--data-root", str(tmp_path / "missing"), "--pred-dir", str(pred))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _cli("synth", "--out", str(root))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_notebook_00_on_smoke(tmp_path):
    (tmp_path / "data").mkdir()  # generated here on purpose: not the profile's own data.root
    overrides = {"data.root": str(tmp_path / "data"), "output_root": str(tmp_path / "out")}
    timings = run_notebooks("smoke", overrides, only=["00"], progress=False)
    assert set(timings) == {"00_data_exploration"}
    out = tmp_path / "out" / "smoke"
    summary = json.loads((out / "00_data_exploration" / "summary.json").read_text())
    assert set(summary["splits"]) == {"train", "val"}
    assert len(summary["splits"]["train"]["frequency"]) == 19
    assert abs(sum(summary["splits"]["train"]["frequency"].values()) - 1) < 1e-9
    for fig in ("samples", "class_frequency", "class_presence", "object_sizes"):
        assert (out / "00_data_exploration" / f"{fig}.png").stat().st_size > 5000
    nb = nbformat.read(out / "00_data_exploration.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "smoke" in injected[0].source
    html = (out / "00_data_exploration.html").read_text()
    assert "Class statistics" in html and "data:image/png;base64" in html
    # where the time went: every code cell's seconds (papermill's), slowest first, in timings.json
    cells = json.loads((out / "timings.json").read_text())["cells"]["00_data_exploration"]
    assert len(cells) == sum(c.cell_type == "code" for c in nb.cells)
    assert [c["seconds"] for c in cells] == sorted((c["seconds"] for c in cells), reverse=True)
    assert sum(c["seconds"] for c in cells) <= timings["00_data_exploration"]
    assert any("load_config(profile, overrides)" in c["code"] for c in cells)


def test_failing_notebook_is_named_and_kept(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    shutil.copy("notebooks/00_data_exploration.ipynb", nb_dir / "00_data_exploration.ipynb")
    nb = nbformat.read(nb_dir / "00_data_exploration.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('boom')"))
    nbformat.write(nb, nb_dir / "01_broken.ipynb")
    (tmp_path / "data").mkdir()
    overrides = {"data.root": str(tmp_path / "data"), "output_root": str(tmp_path / "out")}
    import pytest

    from segstudy.errors import UserError
    with pytest.raises(UserError, match=r"notebook 01_broken.ipynb failed .*RuntimeError: boom"):
        run_notebooks("smoke", overrides, notebooks_dir=nb_dir, progress=False)
    assert (tmp_path / "out" / "smoke" / "00_data_exploration.html").is_file()
    kept = nbformat.read(tmp_path / "out" / "smoke" / "01_broken.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in kept.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_notebooks_01_02_on_smoke(tmp_path, tiny_root, capfd):
    overrides = {"data.root": str(tiny_root), "data.generate": False, "output_root": str(tmp_path / "out"),
                 "train.epochs": 1}
    timings = run_notebooks("smoke", overrides, only=["01", "02"], progress=False)
    assert set(timings) == {"01_baselines", "02_custom_model"}
    captured = capfd.readouterr()  # the kernels' [segstudy] lines reach the terminal; bars and warnings do not
    assert "[segstudy] unet epoch 1: loss" in captured.out and "[segstudy] ETA: " in captured.out
    terminal = captured.out + captured.err
    assert "it/s]" not in terminal and "warning" not in terminal.lower(), terminal[-2000:]
    out = tmp_path / "out" / "smoke"
    base = json.loads((out / "01_baselines" / "results.json").read_text())
    assert set(base["models"]) == {"unet", "deeplabv3_resnet50"}
    for m in base["models"].values():
        assert 0 <= m["best_miou"] <= 1 and m["latency_ms"] > 0 and m["gflops"] > 0
    custom = json.loads((out / "02_custom_model" / "results.json").read_text())
    assert set(custom["models"]) == {"custom"}
    for name in ("learning_curves", "per_class_iou", "predictions"):
        assert (out / "02_custom_model" / f"{name}.png").is_file()
    html = (out / "02_custom_model.html").read_text()
    assert "Against the baselines" in html and "deeplabv3_resnet50" in html


def test_notebook_03_on_smoke(tmp_path, tiny_root):
    overrides = {"data.root": str(tiny_root), "data.generate": False, "output_root": str(tmp_path / "out")}
    run_notebooks("smoke", overrides, only=["03"], progress=False)
    out = tmp_path / "out" / "smoke" / "03_loss_comparison"
    result = json.loads((out / "results.json").read_text())
    assert [(r["loss"], r["seed"]) for r in result["runs"]] == [("ce", 0), ("ce", 1), ("dice", 0), ("dice", 1)]
    summary = {row["loss"]: row for row in result["summary"]}
    assert summary["ce"]["seeds"] == 2 and summary["ce"]["mIoU std"] is not None
    assert set(result["small_class_delta_vs_ce"]) == {"dice"}
    for fig in ("miou_spread", "per_class_iou", "small_class_delta", "learning_curves"):
        assert (out / f"{fig}.png").is_file()


def test_sweep_gathers_runs_and_tags_mlflow(tmp_path, tiny_root):
    import mlflow

    out = tmp_path / "out"
    r = _cli("sweep", "notebooks/03_loss_comparison.ipynb", "--profile", "smoke", "--name", "t",
             "-p", "loss_study.names", "ce", "dice", "-p", "loss_study.seeds", "0",
             "--set", f"data.root={tiny_root}", "data.generate=false", f"output_root={out}",
             "tracking.backend=mlflow")
    assert r.returncode == 0, r.stderr[-3000:]
    gathered = json.loads((out / "sweeps" / "t" / "sweep.json").read_text())
    assert [run["params"]["loss_study.names"] for run in gathered["runs"]] == [["ce"], ["dice"]]
    assert all(run["results"]["runs"][0]["best_miou"] >= 0 for run in gathered["runs"])
    assert (out / "sweeps" / "t" / "loss_study.names=ce,loss_study.seeds=0" / "03_loss_comparison.html").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    tagged = mlflow.search_runs(experiment_names=["segstudy"], filter_string="tags.sweep = 't'")
    assert len(tagged) == 2
    bad = _cli("sweep", "notebooks/03_loss_comparison.ipynb", "--profile", "smoke", "-p", "loss_study.nmes", "ce")
    assert bad.returncode == 2 and "unknown key 'loss_study.nmes'" in bad.stderr


def test_notebook_05_on_smoke(tmp_path, tiny_root, smoke_model):
    overrides = {"data.root": str(tiny_root), "data.generate": False, "output_root": str(tmp_path / "out"),
                 "train.epochs": 1, "bench.warmup": 1, "bench.iters": 2}
    runs = tmp_path / "out" / "smoke" / "runs"
    shutil.copytree(smoke_model["run_dir"], runs / "custom")  # notebook 02's model: 05 never trains it
    run_notebooks("smoke", overrides, only=["05"], progress=False)
    out = tmp_path / "out" / "smoke" / "05_quantization"
    result = json.loads((out / "results.json").read_text())
    variants = result["variants"]
    assert set(variants) == {"fp32 eager", "fp32 channels_last", "bf16 autocast + channels_last", "int8 PTQ torch FX",
                             "ONNX Runtime fp32", "int8 ONNX Runtime", "int8 OpenVINO",
                             "int8 QAT torch FX"}  # smoke: quant.qat always
    confusions = np.load(out / "confusions.npz")  # each variant's per-image confusions, keyed by its row
    for r in variants.values():
        assert 0 <= r["miou"] <= 1 and r["latency_ms"] > 0 and r["size_bytes"] > 0 and len(r["iou"]) == 19
        assert len(r["latency_times_ms"]) == 2 and confusions[r["confusions"]].shape == (6, 19, 20)
        # every variant timed in turn with fp32 eager: its speed-up is read round by round
        assert r["reference_times_ms"] == variants["fp32 eager"]["latency_times_ms"]
        assert 100 * r["miou"] == pytest.approx(miou(confusions[r["confusions"]].sum(0)))
    assert variants["int8 ONNX Runtime"]["size_bytes"] < 0.3 * variants["ONNX Runtime fp32"]["size_bytes"]
    assert variants["int8 PTQ torch FX"]["size_bytes"] < 0.3 * variants["fp32 eager"]["size_bytes"]
    agreement = result["agreement_vs_fp32"]
    onnx_fp32 = agreement["ONNX Runtime fp32"]
    assert onnx_fp32["max_abs"] < 1e-3 and onnx_fp32["pixel_agreement"] > 0.999
    assert set(result["calibration_sweep"]) == {"2", "4"} and result["qat"]["ran"]
    assert result["pruned"]["available"] is False  # notebook 04 did not run: said, not failed
    assert result["provenance"]["profile"] == "smoke" and result["provenance"]["torch"].startswith("2.14.1")
    assert set(result["targets"]) == {"int8 PTQ torch FX", "int8 ONNX Runtime", "int8 OpenVINO", "int8 QAT torch FX"}
    deployed = result["deployed_int8"]  # a servable int8 form, timed in turn with OpenVINO's
    servable = {"int8 ONNX Runtime", "int8 OpenVINO"}
    assert deployed["variant"] in servable and deployed["latency_ms"] == variants[deployed["variant"]]["latency_ms"]
    if deployed["variant"] == "int8 ONNX Runtime":  # both within the bar here: OpenVINO unless outrun
        assert deployed["time_vs_openvino_interval"][1] < 1.0
    assert deployed["time_vs_openvino"] <= 1.0
    assert result["other_engines"] == sorted(servable - {deployed["variant"]})  # left out of the recommendation
    for name in ("variants.png", "per_class_iou_delta.png", "miou_vs_calibration_images.png", "custom_fp32.onnx",
                 "custom_int8.onnx", "custom_int8_openvino.xml", "custom_int8_openvino.bin", "custom_int8_fx.pt",
                 "custom_int8_qat.pt"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp*"))  # no temporaries of the atomic writes left
    html = (tmp_path / "out" / "smoke" / "05_quantization.html").read_text()
    assert "Why torch FX graph mode and ONNX Runtime, not PT2E" in html and "no pruned model at" in html
