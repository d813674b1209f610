"""Int8 quantization (notebook 05): torch FX PTQ and QAT, ONNX export and ONNX Runtime int8, bad input.

A small segmentation net (conv-BN-ReLU stem, residual add, stride 4, 1x1 classifier, bilinear
upsampling: the custom hybrid's structure at a fraction of its size) is trained briefly on the tiny
generated dataset, so that int8 is compared against a model with real class margins.
Tolerances: int8 argmax agrees with fp32 on >= 95% of the pixels and the mean absolute logit
difference is below 5% of the mean absolute fp32 logit; ORT fp32 matches torch to 1e-4.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segstudy.compress import onnx_export, quantize
from segstudy.config_profiles import load_config
from segstudy.engine.evaluation import validate
from segstudy.engine.finetuning import finetune
from segstudy.errors import UserError
from segstudy.studies import int8_choice, quantization, quantization_rows
from segstudy.studies.verdict_inputs import SeedNoise
from segstudy.studies.verdicts import NOT_DISTINGUISHABLE


class TinySeg(nn.Module):
    def __init__(self, classes: int = 19):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))
        self.down = nn.Sequential(nn.Conv2d(64, 128, 3, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU())
        self.classifier = nn.Conv2d(128, classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        h = self.stem(x)
        h = F.relu(h + self.block(h))
        return {"out": F.interpolate(self.classifier(self.down(h)), size=size, mode="bilinear", align_corners=False)}


@pytest.fixture(scope="module")
def cfg(tiny_root, tmp_path_factory):
    return load_config("smoke", {"data.root": str(tiny_root), "data.generate": False, "train.amp": "none",
                                 "output_root": str(tmp_path_factory.mktemp("out")), "train.channels_last": False})


@pytest.fixture(scope="module")
def trained(cfg):
    torch.manual_seed(0)
    quantize.set_threads(2)
    model = TinySeg()
    finetune(model, cfg, 6, lr=0.01, amp="none", channels_last=False, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def calib(cfg):
    return quantize.calibration_images(cfg, 4)


def _assert_close_to_fp32(agree: dict, fp32_scale: float) -> None:
    assert agree["pixel_agreement"] >= 0.95, agree
    assert agree["mean_abs"] <= 0.05 * fp32_scale, (agree, fp32_scale)


def _scale(model, images) -> float:
    with torch.no_grad():
        return float(torch.stack([model(x[None])["out"].abs().mean() for x in images]).mean())


def test_fx_ptq_agrees_with_fp32_and_saves_smaller(cfg, trained, calib, tmp_path):
    val = quantize.validation_images(cfg, 4)
    ptq = quantize.fx_ptq(trained, calib, [2, 4], observer="minmax")
    assert set(ptq["models"]) == {2, 4} and ptq["notes"] == []
    int8 = ptq["models"][4]
    gm = int8.net
    assert any("quantized" in str(type(m)) for m in gm.modules())  # real int8 modules, not fake-quant
    upsample = next(n for n in gm.graph.nodes if n.target is F.interpolate)
    assert upsample.args[0].target == "dequantize"  # the final upsampling runs in float
    assert quantization_rows.cpu_only(int8) and not quantization_rows.cpu_only(trained)  # int8 is scored on the CPU
    _assert_close_to_fp32(quantize.agreement(trained, {"int8": int8}, val)["int8"], _scale(trained, val))
    # mIoU on the tiny val split within 2 points of fp32 (tiny data: a few pixels swing it)
    assert abs(validate(trained, cfg)["miou"] - validate(int8, cfg)["miou"]) < 0.02
    # histogram observer (the x86 default) too, and TorchScript round trip: same outputs, smaller file
    hist = quantize.fx_ptq(trained, calib, [4])["models"][4]
    _assert_close_to_fp32(quantize.agreement(trained, {"hist": hist}, val)["hist"], _scale(trained, val))
    path = quantize.save_torchscript(int8, tmp_path / "int8.pt")
    loaded = torch.jit.load(str(path))
    assert quantize.agreement(int8, {"loaded": loaded}, val)["loaded"]["max_abs"] == 0.0
    fp32_path = tmp_path / "fp32.pt"
    torch.save(trained.state_dict(), fp32_path)
    assert path.stat().st_size < 0.5 * fp32_path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.pt", "int8.pt"]  # no temporary left


def test_onnx_round_trip_and_ort_int8(cfg, trained, calib, tmp_path, monkeypatch):
    val = quantize.validation_images(cfg, 3)
    monkeypatch.setattr(quantize, "EXAMPLE_SIZE", (32, 64))  # traced smaller than it is run: dynamic axes
    assert val[0].shape[-2:] != (32, 64)
    fp32_path = onnx_export.export(trained, tmp_path / "m.onnx", calib[0][None])
    ort_fp32 = onnx_export.OrtModule(onnx_export.session(fp32_path, 2))
    assert quantization_rows.cpu_only(ort_fp32)
    agree = quantize.agreement(trained, {"ort": ort_fp32}, val)["ort"]
    assert agree["max_abs"] < 1e-4 and agree["pixel_agreement"] == 1.0
    other = torch.randn(2, 3, 48, 96)  # dynamic batch, height and width
    assert ort_fp32(other)["out"].shape == (2, 19, 48, 96)
    for act in ("uint8", "int8"):
        path = onnx_export.quantize_int8(fp32_path, tmp_path / f"{act}.onnx", quantize.batched(calib, 2), act)
        ort_int8 = onnx_export.OrtModule(onnx_export.session(path))
        _assert_close_to_fp32(quantize.agreement(trained, {act: ort_int8}, val)[act], _scale(trained, val))
        assert path.stat().st_size < 0.5 * fp32_path.stat().st_size
    lat = onnx_export.latency(onnx_export.session(fp32_path, 2), 32, 64, warmup=1, iters=2)
    assert lat["median_ms"] > 0 and lat["threads"] == 2
    assert len(lat["times_ms"]) == 2 and lat["median_ms"] == pytest.approx(sum(lat["times_ms"]) / 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx", "m.onnx", "uint8.onnx"]


def test_bad_calibration_data(cfg, trained, calib, tmp_path):
    with pytest.raises(UserError, match="calibration set is empty"):
        quantize.fx_ptq(trained, [], [4])
    with pytest.raises(UserError, match="calibration set is empty"):
        quantize.calibration_batches([])
    with pytest.raises(UserError, match=r"calibration batch 0 has shape \(64, 128\).*expected float images"):
        quantize.calibration_batches([calib[0][0]])  # no channel dimension
    with pytest.raises(UserError, match=r"shape \(1, 1, 64, 128\)"):
        quantize.calibration_batches([calib[0][None, :1]])  # one channel
    with pytest.raises(UserError, match="torch.uint8"):
        quantize.calibration_batches([(calib[0][None] * 50).to(torch.uint8)])
    later = quantize.calibration_batches([calib[0], "image.png"])  # a later bad item fails when it comes
    with pytest.raises(UserError, match="calibration batch 1 is a str"):
        list(later)
    with pytest.raises(UserError, match="asks for more than the 4 images"):
        quantize.fx_ptq(trained, calib, [8])
    with pytest.raises(UserError, match="100 calibration images asked for .* has 8 training images"):
        quantize.calibration_images(cfg, 100)
    fp32_path = onnx_export.export(trained, tmp_path / "m.onnx", calib[0][None])
    with pytest.raises(UserError, match="calibration set is empty"):
        onnx_export.quantize_int8(fp32_path, tmp_path / "int8.onnx", [])
    with pytest.raises(UserError, match=r"calibration batch 0 has shape \(64, 128\)"):
        onnx_export.quantize_int8(fp32_path, tmp_path / "int8.onnx", [calib[0][0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing half-written


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # Python branching on a tensor value: FX cannot trace it
            return x
        return -x


class WithGate(TinySeg):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        size = x.shape[-2:]
        h = self.gate(self.stem(x))
        return {"out": F.interpolate(self.classifier(self.down(h)), size=size, mode="bilinear", align_corners=False)}


class BranchingRoot(TinySeg):
    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


def test_ops_the_quantizer_cannot_handle(calib, tmp_path, capsys):
    torch.manual_seed(0)
    # in a submodule: that submodule stays in float, the rest is int8, and it is said
    model = WithGate().eval()
    ptq = quantize.fx_ptq(model, calib, [2], observer="minmax")
    assert len(ptq["notes"]) == 1 and ptq["notes"][0].startswith("gate (Gate) kept in float")
    assert "if x.mean() > 0" in ptq["notes"][0] and "kept in float" in capsys.readouterr().out
    assert quantize.agreement(model, {"int8": ptq["models"][2]}, calib[:2])["int8"]["pixel_agreement"] >= 0.9
    # in the model's own forward: a UserError naming the line
    with pytest.raises(UserError, match=r"BranchingRoot.forward cannot be quantized.*`if x.sum\(\) > 0:`"):
        quantize.fx_ptq(BranchingRoot().eval(), calib, [2])

    # an operator the ONNX exporter does not know: named, nothing written, an earlier file kept intact
    class Bessel(TinySeg):
        def forward(self, x):
            return {"out": torch.special.bessel_j0(super().forward(x)["out"])}

    target = tmp_path / "model.onnx"
    target.write_bytes(b"earlier valid file")
    with pytest.raises(UserError, match="aten::special_bessel_j0"):
        onnx_export.export(Bessel().eval(), target, calib[0][None])
    assert target.read_bytes() == b"earlier valid file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_qat_fine_tunes_and_converts(cfg, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    result = quantize.qat(trained, cfg, epochs=0.5, lr=1e-4)
    assert result["train_seconds"] > 0 and 0 <= result["fake_quant_miou"] <= 1
    assert any("quantized" in str(type(m)) for m in result["model"].net.modules())
    val = quantize.validation_images(cfg, 2)
    assert quantize.agreement(trained, {"qat": result["model"]}, val)["qat"]["pixel_agreement"] >= 0.9
    after = trained.state_dict()  # QAT trains a copy: the fp32 model is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)


def _per_image(accuracy: float, n: int = 30, seed: int = 0, sd: float = 0.01) -> np.ndarray:
    """[n, 2, 3] per-image confusions of 2 classes, `accuracy` of each image's pixels right (+- sd)."""
    rng = np.random.default_rng(seed)
    right = np.clip(accuracy + rng.normal(0, sd, n), 0, 1) * 1000
    out = np.zeros((n, 2, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 1], out[:, 1, 0] = right, 1000 - right, right, 1000 - right
    return out


def _timed(ms: float) -> dict:
    return {"latency_ms": ms, "latency_times_ms": [ms * f for f in (1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.99)]}


def test_int8_targets_are_judged_on_intervals():
    vnni = {"avx512_vnni": True, "amx_int8": False}
    avx2 = {"avx512_vnni": False, "amx_int8": False}
    fp32 = _per_image(0.80)
    rows = {"fp32 eager": _timed(600) | {"miou": 0.30, "per_image": fp32},
            "fx": _timed(100) | {"miou": 0.299, "per_image": fp32 + 0.5},  # the same answers: 6x, no loss
            "ort": _timed(130) | {"miou": 0.299, "per_image": fp32}}
    for k in ("fx", "ort"):  # as notebook 05 times them: in turn with fp32 eager, whose rounds they keep
        rows[k]["reference_times_ms"] = rows["fp32 eager"]["latency_times_ms"]
    t = int8_choice.check_targets(vnni, rows, ["fx", "ort"])
    assert t["fx"]["met"] == "yes" and round(t["fx"]["speedup"], 2) == 6.0
    assert t["ort"]["met"] == "no" and round(t["ort"]["ratio_to_fastest_int8"], 2) == 1.3  # 4.6x, 1.3x slower
    assert int8_choice.check_targets(avx2, rows, ["ort"])["ort"]["met"] == "yes"  # 3x bar on AVX2-only
    rows["fx"]["per_image"] = _per_image(0.70, seed=1)  # about 10 points lost on every image
    assert int8_choice.check_targets(vnni, rows, ["fx"])["fx"]["met"] == "no"
    rows["fx"]["per_image"] = _per_image(0.80, seed=1, sd=0.05)  # images that differ a lot: [-2.6, 1.7] points
    assert int8_choice.check_targets(vnni, rows, ["fx"])["fx"]["met"] == NOT_DISTINGUISHABLE
    one = {k: {"latency_ms": r["latency_ms"]} for k, r in rows.items()}  # one timing each: no spread
    assert int8_choice.check_targets(vnni, one, ["fx"])["fx"]["met"] == NOT_DISTINGUISHABLE
    # QAT fine-tunes: its change carries that training's seed noise, and is open without it
    qat = "int8 QAT torch FX"
    rows[qat] = _timed(100) | {"miou": 0.30, "per_image": fp32 + 0.5}

    def met(**kw) -> str:
        return int8_choice.check_targets(vnni, rows, [qat], **kw)[qat]["met"]

    quiet, loud = (SeedNoise(sd, df=8, runs=12) for sd in (0.1, 3.0))
    assert met() == NOT_DISTINGUISHABLE and met(noise=quiet) == "yes" and met(noise=loud) == NOT_DISTINGUISHABLE


def test_qat_decision():
    assert int8_choice.qat_decision("auto", 1.5, 1.0)[0] and not int8_choice.qat_decision("auto", 0.5, 1.0)[0]
    assert int8_choice.qat_decision("always", 0.0, 1.0)[0] and not int8_choice.qat_decision("never", 9.0, 1.0)[0]
    with pytest.raises(UserError, match="quant.qat = 'sometimes'"):
        int8_choice.qat_decision("sometimes", 0.0, 1.0)
    with pytest.raises(UserError, match="quant.observer = 'percentile'"):
        quantize.qconfig_mapping("percentile")


def test_notebook_05_asks_for_notebook_02s_model_instead_of_training_it(tmp_path):
    cfg = load_config("smoke", {"output_root": str(tmp_path)})
    with pytest.raises(UserError, match=r"02_custom_model trains; run it first \(./run_all.sh smoke --only 02\)"):
        quantization.trained_model(cfg)


def _initializers(path) -> dict:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_ort_calibration_holds_one_image_and_matches_quantize_static(trained, calib, tmp_path, monkeypatch):
    """ORT calibration runs one image at a time (the calibrator holds one image's outputs whatever
    the number of images) and gives the model quantize_static's own calibration gives."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    from onnxruntime.quantization.shape_inference import quant_pre_process

    monkeypatch.setattr(quantize, "EXAMPLE_SIZE", (32, 64))
    fp32_path = onnx_export.export(trained, tmp_path / "m.onnx", calib[0][None])
    batches = quantize.batched(calib, 2)  # as notebook 05 passes them: 2 batches of 2
    # the reference: ORT's quantize_static calibrating the same pre-processed model on the same batches
    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
    reference = tmp_path / "reference.onnx"
    quantize_static(str(pre), str(reference), onnx_export._Reader(batches, "image"), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, op_types_to_quantize=onnx_export.INT8_OPS,
                    calibrate_method=CalibrationMethod.MinMax)
    held = []  # outputs the calibrator holds each time it computes ranges (ORT's own compute_data)
    compute_data = MinMaxCalibrater.compute_data

    def counting(self):
        held.append(len(self.intermediate_outputs))
        return compute_data(self)

    monkeypatch.setattr(MinMaxCalibrater, "compute_data", counting)
    ours = onnx_export.quantize_int8(fp32_path, tmp_path / "ours.onnx", batches)
    assert [n for n in held if n] == [1] * len(calib)  # each image alone (batch 1), one held at a time
    expected, got = _initializers(reference), _initializers(ours)
    assert got.keys() == expected.keys() and any(name.endswith("_scale") for name in got)
    assert all(np.array_equal(got[name], expected[name]) for name in expected)  # same ranges, same int8 model


def test_fx_calibration_runs_one_image_at_a_time(trained, calib, monkeypatch):
    seen = []  # the input shape of every pass through the observed (prepared) model
    prepare = quantize.fx_prepare

    def recording(*args, **kwargs):
        prepared, notes = prepare(*args, **kwargs)
        prepared.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape)))
        return prepared, notes

    monkeypatch.setattr(quantize, "fx_prepare", recording)
    quantize.fx_ptq(trained, calib, [1, 4], observer="minmax")
    assert seen == [(1, *calib[0].shape)] * len(calib)  # each image alone, batch 1


def test_calibration_images_are_read_when_used(cfg, calib):
    assert isinstance(calib, quantize.CalibrationImages) and len(calib) == 4
    assert not any(isinstance(v, torch.Tensor) for v in vars(calib).values())  # indices, not images
    assert torch.equal(calib[:3][2], calib[2]) and torch.equal(calib[2], quantize.calibration_images(cfg, 4)[2])
    assert [tuple(b.shape) for b in quantize.calibration_batches(calib)] == [(1, *calib[0].shape)] * 4
    mixed = [calib[0], torch.stack([calib[1], calib[2]])]  # images and batches: every image, one at a time
    assert [torch.equal(b[0], calib[i]) for i, b in enumerate(quantize.calibration_batches(mixed))] == [True] * 3


def test_openvino_int8_agrees_with_fp32_is_deterministic_and_served(cfg, trained, calib, tmp_path, monkeypatch):
    """NNCF's int8 IR of the exported model: close to fp32, the same weights from the same images, what
    load_engine and predict run, and one line without its .bin. Checked in a process of its own
    (_openvino_checks): the product runs OpenVINO in notebook 05's kernel and in the server, and
    OpenVINO loaded into the test process made a later test of the suite die of SIGSEGV."""
    monkeypatch.setattr(quantize, "EXAMPLE_SIZE", (32, 64))
    onnx_export.export(trained, tmp_path / "m.onnx", calib[0][None])
    plain = [calib[i].as_subclass(torch.Tensor) for i in range(len(calib))]  # no tv_tensors: weights_only loads it
    val = [x.as_subclass(torch.Tensor) for x in quantize.validation_images(cfg, 3)]
    torch.save({"state": trained.state_dict(), "calib": plain, "val": val}, tmp_path / "inputs.pt")
    # a fresh interpreter, not multiprocessing's spawn: that would inherit this process's sys.path, where
    # an earlier test's MLflow model put its logged copy of segstudy (with no params/) first
    child = subprocess.run([sys.executable, "-c", f"from tests.test_quantize import _openvino_checks; "
                            f"_openvino_checks({str(tmp_path)!r})"], cwd=Path(__file__).parents[1],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]


def _openvino_checks(folder: str) -> None:
    from segstudy.cli import main
    from segstudy.compress import openvino_int8
    from segstudy.deploy import inference

    tmp_path = Path(folder)
    inputs = torch.load(tmp_path / "inputs.pt", weights_only=True)
    trained, calib, val = TinySeg(), inputs["calib"], inputs["val"]
    trained.load_state_dict(inputs["state"])
    trained.eval()
    quantize.set_threads(2)
    assert openvino_int8.unavailable() is None  # installed from the lock on every x86 machine of the project
    fp32_path = tmp_path / "m.onnx"
    first = openvino_int8.quantize_int8(fp32_path, tmp_path / "a" / "int8.xml", calib)
    again = openvino_int8.quantize_int8(fp32_path, tmp_path / "b" / "int8.xml", calib)
    # the same weights and ranges (the graph's auto-generated node names count up in the process)
    assert openvino_int8.weights_file(first).read_bytes() == openvino_int8.weights_file(again).read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["int8.bin", "int8.xml"]  # no temporary left
    # images are counted by len(), so a batch in their place is refused, not read as one image of many
    with pytest.raises(UserError, match=r"OpenVINO calibration image 0 is a shape \(2, 3, .*one per item"):
        openvino_int8.quantize_int8(fp32_path, tmp_path / "c" / "int8.xml", [torch.stack(calib[:2])])
    with pytest.raises(UserError, match="the calibration set is empty"):
        openvino_int8.quantize_int8(fp32_path, tmp_path / "c" / "int8.xml", [])
    assert not (tmp_path / "c").exists()
    module = openvino_int8.OvModule(openvino_int8.compiled(first, 2))
    torch.testing.assert_close(module(val[0][None])["out"], openvino_int8.OvModule(
        openvino_int8.compiled(again, 2))(val[0][None])["out"], rtol=0, atol=0)
    assert quantization_rows.cpu_only(module)
    _assert_close_to_fp32(quantize.agreement(trained, {"ov": module}, val)["ov"], _scale(trained, val))
    assert module(torch.randn(2, 3, 48, 96))["out"].shape == (2, 19, 48, 96)  # dynamic batch and size
    lat = openvino_int8.latency(module, 32, 64, warmup=1, iters=2)
    assert lat["threads"] == 2 and len(lat["times_ms"]) == 2 and lat["device"] == "cpu (openvino)"
    engine = inference.load_engine(first)
    assert engine.kind == "openvino"
    x = val[0][None]
    torch.testing.assert_close(engine.run(x), module(x)["out"])
    # an image at the network's size is segmented inside OpenVINO (pre-processing, network, argmax):
    # the mask of the logits path, which an image of another size takes
    image = (np.random.default_rng(1).random((48, 96, 3)) * 255).astype(np.uint8)
    served = inference.segment(engine, image, 48)
    np.testing.assert_array_equal(served, inference.postprocess(engine.run(inference.preprocess(image, 48)), 48, 96))
    assert inference.segment(engine, image, 32).shape == (48, 96)
    # the server's threads at once: each inference waits for the one before ("Infer Request is busy" before)
    with ThreadPoolExecutor(3) as pool:
        masks = list(pool.map(lambda _: inference.segment(engine, image, 48), range(6)))
        logits = list(pool.map(lambda _: engine.run(x), range(6)))
    assert all(np.array_equal(m, served) for m in masks) and all(torch.equal(v, logits[0]) for v in logits)
    Image.fromarray((np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    rc = main(["predict", "--model", str(first), "--input", str(tmp_path / "in.png"), "--out",
               str(tmp_path / "p"), "--profile", "smoke"])
    assert rc == 0 and len(list((tmp_path / "p").glob("*_labelIds.png"))) == 1
    openvino_int8.weights_file(again).unlink()
    with pytest.raises(UserError, match=r"int8\.xml is not a loadable OpenVINO model .*keep its int8\.bin beside it"):
        inference.load_engine(again)


def test_deployed_int8_is_the_fastest_within_the_loss_bar():
    from segstudy.studies import int8_choice

    rows = {"fp32 eager": {"miou": 0.50, "latency_ms": 100.0},
            "ort": {"miou": 0.50, "latency_ms": 20.0, "latency_times_ms": [20.0, 21.0, 19.0]},
            "ov": {"miou": 0.495, "latency_ms": 22.0, "latency_times_ms": [22.0, 22.0, 21.0]},
            "lossy": {"miou": 0.40, "latency_ms": 5.0}}
    pick = int8_choice.deployed_int8(rows, ["ort", "ov", "lossy"], openvino="ov", max_loss=1.0)
    assert pick["variant"] == "ort" and pick["time_vs_openvino"] == pytest.approx(20 / 22)
    assert pick["time_vs_openvino_interval"][0] <= pick["time_vs_openvino"] <= pick["time_vs_openvino_interval"][1]
    rows["ort"]["miou"] = 0.45  # 5 points lost: the OpenVINO row is deployed, at 1.0x its own time
    pick = int8_choice.deployed_int8(rows, ["ort", "ov", "lossy"], openvino="ov", max_loss=1.0)
    assert pick["variant"] == "ov" and pick["time_vs_openvino"] == 1.0
    assert int8_choice.deployed_int8(rows, ["missing"], openvino="ov") is None


def test_deployed_int8_keeps_the_first_engine_unless_another_is_distinguishably_faster():
    from segstudy.studies import int8_choice

    ov = [100.0, 104.0, 98.0, 101.0, 103.0, 99.0, 102.0, 100.0]
    tied = [99.0, 106.0, 97.0, 100.0, 101.0, 100.0, 104.0, 98.0]  # a lower median, within the rounds' noise
    rows = {"fp32 eager": {"miou": 0.50, "latency_ms": 700.0},
            "ov": {"miou": 0.50, "latency_ms": float(np.median(ov)), "latency_times_ms": ov},
            "ort": {"miou": 0.50, "latency_ms": float(np.median(tied)), "latency_times_ms": tied}}
    assert rows["ort"]["latency_ms"] < rows["ov"]["latency_ms"]
    pick = int8_choice.deployed_int8(rows, ["ov", "ort"], openvino="ov")
    assert pick["variant"] == "ov" and pick["time_vs_openvino"] == 1.0
    assert "ort timed faster but not distinguishably" in pick["why"]
    ahead = [0.9 * t for t in ov]  # 10% faster in every round: distinguishable
    rows["ort"] |= {"latency_ms": float(np.median(ahead)), "latency_times_ms": ahead}
    pick = int8_choice.deployed_int8(rows, ["ov", "ort"], openvino="ov")
    assert pick["variant"] == "ort" and pick["time_vs_openvino"] == pytest.approx(0.9)
    assert pick["why"].startswith("the fastest of ov, ort")


def test_without_openvino_its_rows_are_left_out_with_one_line(tmp_path, monkeypatch):
    from segstudy.compress import openvino_int8
    from segstudy.deploy import inference

    monkeypatch.setitem(sys.modules, "openvino", None)  # what a machine without the wheel sees at import
    why = openvino_int8.unavailable()
    assert why.startswith("OpenVINO is not installed") and "requirements.lock" in why and "\n" not in why
    xml = tmp_path / "int8.xml"
    xml.write_text("<net/>")
    with pytest.raises(UserError, match=r"int8\.xml is an OpenVINO model; OpenVINO is not installed"):
        inference.load_engine(xml)
