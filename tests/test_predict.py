"""`segstudy predict`: round trip through `segstudy evaluate`, eval pre-processing, ONNX, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from segstudy.cli import main
from segstudy.data.datasets import build_dataset
from segstudy.deploy import inference
from segstudy.engine.cityscapes_eval import evaluate_folder
from segstudy.errors import UserError
from segstudy.models.checkpoint import load_trained


def test_predict_then_evaluate_round_trip(smoke_model, tiny_root, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = main(["predict", "--model", smoke_model["checkpoint_best"], "--input", str(tiny_root / "leftImg8bit" / "val"),
               "--out", str(out), "--profile", "smoke", "--set", f"data.root={tiny_root}"])
    assert rc == 0, capsys.readouterr().err
    label_files = sorted(out.rglob("*_labelIds.png"))
    assert len(label_files) == 6 and len(sorted(out.rglob("*_color.png"))) == 6
    with Image.open(label_files[0]) as im:
        assert im.mode == "L" and im.size == (128, 64)
    # smoke evaluates at the images' own size (base_size 64), so scoring the written PNGs with the
    # official definitions gives the validation mIoU train() recorded for this checkpoint
    result = evaluate_folder(tiny_root, "val", out, progress=False)
    assert result["miou"] == pytest.approx(smoke_model["best_miou"], abs=1e-9)


def test_preprocessing_is_the_eval_preset_and_maps_come_back_at_input_size(smoke_model, tiny_root):
    cfg = smoke_model["cfg"]
    ds = build_dataset(cfg.data, "val")
    image_path = ds.samples[0].image
    image = inference.decode_image(image_path.read_bytes())
    torch.testing.assert_close(inference.preprocess(image, cfg.data.base_size), ds[0][0].unsqueeze(0),
                               rtol=0, atol=0)
    engine = inference.load_engine(smoke_model["checkpoint_best"])
    small = inference.segment(engine, image, base_size=32)  # the model runs at 32x64
    assert small.shape == (64, 128) and small.dtype == np.uint8 and small.max() < 19


def test_predict_onnx_matches_torch(smoke_model, tiny_root, tmp_path):
    model = load_trained(smoke_model["checkpoint_best"])
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 128),), str(onnx_path), dynamo=False, input_names=["image"],
                      output_names=["out"], dynamic_axes={"image": {2: "h", 3: "w"}, "out": {2: "h", 3: "w"}})
    images = sorted((tiny_root / "leftImg8bit" / "val").rglob("*.png"))[:2]
    torch_engine, onnx_engine = inference.load_engine(smoke_model["checkpoint_best"]), inference.load_engine(onnx_path)
    assert onnx_engine.kind == "onnx" and onnx_engine.fixed_size is None
    for path in images:
        image = inference.decode_image(path.read_bytes())
        a, b = inference.segment(torch_engine, image, 64), inference.segment(onnx_engine, image, 64)
        assert (a == b).mean() > 0.999  # float rounding may flip a near-tie pixel
    rc = main(["predict", "--model", str(onnx_path), "--input", str(images[0]), "--out", str(tmp_path / "p"),
               "--profile", "smoke"])
    assert rc == 0 and len(list((tmp_path / "p").glob("*_labelIds.png"))) == 1


def test_predict_bad_input(smoke_model, tiny_root, tmp_path, capsys):
    def err(*args: str) -> str:
        assert main(["predict", *args, "--profile", "smoke", "--set", f"output_root={tmp_path}"]) == 2
        return capsys.readouterr().err

    val = str(tiny_root / "leftImg8bit" / "val")
    ckpt = smoke_model["checkpoint_best"]
    assert "model file nope.pt does not exist" in err("--model", "nope.pt", "--input", val, "--out", str(tmp_path))
    msg = err("--model", "models:/segstudy-custom@champion", "--input", val, "--out", str(tmp_path / "o"))
    assert "models:/segstudy-custom@champion: no registered model 'segstudy-custom'" in msg
    assert "no model is registered there yet" in msg
    assert "no .png/.jpg images under" in err("--model", ckpt, "--input", str(tmp_path), "--out", str(tmp_path / "o"))
    bad = tmp_path / "in" / "broken_000000_000001_leftImg8bit.png"
    bad.parent.mkdir()
    bad.write_bytes((tiny_root / "leftImg8bit" / "val").rglob("*.png").__next__().read_bytes()[:300])
    assert "is a truncated or corrupt PNG" in err("--model", ckpt, "--input", str(bad.parent), "--out",
                                                  str(tmp_path / "o"))
    strip = tmp_path / "strip" / "strip.png"  # 8 MP, under the pixel limit, but 8,000,000:1
    strip.parent.mkdir()
    Image.new("L", (1, 8_000_000)).save(strip)
    msg = err("--model", ckpt, "--input", str(strip), "--out", str(tmp_path / "o"))
    assert f"{strip} is 1x8000000, an aspect ratio of 8,000,000:1" in msg
    assert "crop it to at most 8:1, or leave it out of --input" in msg and "send" not in msg


def test_argmax_classes_equals_argmax_including_ties():
    logits = np.random.default_rng(0).standard_normal((19, 33, 65)).astype(np.float32)
    logits[:, :4, :4] = 0.5  # all classes tie: the first one wins, as with argmax
    logits[[3, 7], 10, 10] = 9.0
    np.testing.assert_array_equal(inference.argmax_classes(logits), np.argmax(logits, axis=0))
    assert inference.argmax_classes(logits)[10, 10] == 3


def _encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def test_decode_image_gives_pils_rgb_pixels():
    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    images = {"RGB": Image.fromarray(rgb), "L": Image.fromarray(rgb[..., 0]), "P": Image.fromarray(rgb).quantize(16),
              "RGBA": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
              "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)}
    cases = [(mode, "PNG") for mode in images] + [("RGB", "JPEG"), ("L", "JPEG"), ("tRNS", "PNG")]
    for mode, fmt in cases:
        # tRNS: an RGB PNG with a transparent colour, which libpng would hand out as RGBA
        data = _encoded(images["RGB"], fmt, transparency=(1, 2, 3)) if mode == "tRNS" else _encoded(images[mode], fmt)
        with Image.open(io.BytesIO(data)) as im:
            # 16-bit grey: scaled to 8 bits (PIL's convert("RGB") would clip it to white)
            expected = np.repeat(rgb[..., :1], 3, axis=2) if mode == "I;16" else np.asarray(im.convert("RGB"))
        got = inference.decode_image(data)
        assert got.dtype == np.uint8 and got.shape == (24, 40, 3), (mode, fmt)
        np.testing.assert_array_equal(got, expected, err_msg=f"{mode} {fmt}")
    png = _encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)))
    jpeg = _encoded(images["RGB"], "JPEG")
    idat = png.index(b"IDAT") + 100  # one bit of compressed pixel data flipped: the chunk's CRC no longer matches
    for bad, what in ((png[:idat] + bytes([png[idat] ^ 1]) + png[idat + 1:], "x.png"), (png[: len(png) // 2], "x.png"),
                      (jpeg[: len(jpeg) // 2], "x.jpg")):
        with pytest.raises(UserError, match=rf"{what} is a truncated or corrupt (PNG|JPEG)"):
            inference.decode_image(bad, what)
    with pytest.raises(UserError, match=r"x.png is 40x24 \(960 pixels\), more than the limit of 500"):
        inference.decode_image(_encoded(images["RGB"]), "x.png", inference.SizeLimits(24, max_pixels=500))
