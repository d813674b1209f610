"""Size limits checked from an image's header (input pixels, aspect ratio, network input after
pre-processing), each caller's wording, and evaluate's message for a corrupt prediction."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segstudy.deploy import inference
from segstudy.deploy.predict import read_image
from segstudy.engine.cityscapes_eval import evaluate_folder
from segstudy.errors import UserError


def blank_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")  # zeros: even 8 MP compress to a few KB
    return buf.getvalue()


@pytest.fixture(scope="module")
def strips() -> dict[str, bytes]:
    """Under the 8.4 MP input limit, but pre-processing would scale them to hundreds of GB."""
    return {"1x8000000": blank_png(1, 8_000_000), "16x524288": blank_png(16, 524_288)}


def test_strips_are_refused_from_the_header(strips):
    limits = inference.SizeLimits(base_size=1024)
    with pytest.raises(inference.ImageTooLarge, match=r"^image 0 is 1x8000000, an aspect ratio of 8,000,000:1 "
                                                      r"\(longer to shorter side\), more than the limit of 8:1$"):
        inference.decode_image(strips["1x8000000"], "image 0", limits)
    with pytest.raises(inference.ImageTooLarge, match=r"16x524288, an aspect ratio of 32,768:1") as info:
        inference.decode_image(strips["16x524288"], "image 0", limits)
    assert (info.value.kind, info.value.limit) == ("aspect", "8:1")


def test_network_input_limit_after_resizing():
    limits = inference.SizeLimits(base_size=1024)  # the full profile's: up to 2:1 fits 2048x1024
    inference.check_size(2048, 1024, limits)
    inference.check_size(100, 50, limits)  # small images are scaled up: 2048x1024 as well
    with pytest.raises(inference.ImageTooLarge, match=r"300x100; with its shorter side scaled to base_size 1024, "
                                                      r"the network would run at 3072x1024 \(3,145,728 pixels\), "
                                                      r"more than the limit of 2,097,152") as info:
        inference.decode_image(blank_png(300, 100), "x.png", limits)
    assert (info.value.kind, info.value.limit) == ("aspect", "2:1")
    with pytest.raises(UserError, match="use a base_size of at most 1448"):
        inference.SizeLimits(base_size=2048)


def test_resized_size_is_what_preprocessing_gives():
    for height, width in ((64, 128), (37, 100), (100, 37), (50, 50), (3, 17)):
        x = inference.preprocess(np.zeros((height, width, 3), dtype=np.uint8), 64)
        assert inference.resized_size(width, height, 64) == (x.shape[3], x.shape[2]), (height, width)


def _message(call, *args) -> str:
    with pytest.raises(UserError) as info:
        call(*args)
    return str(info.value)


def test_predict_words_the_limits_for_a_file(strips, tmp_path):
    limits = inference.SizeLimits(base_size=64)
    strip, large = tmp_path / "strip.png", tmp_path / "large.png"
    strip.write_bytes(strips["1x8000000"])
    large.write_bytes(blank_png(4100, 2100))
    assert _message(read_image, strip, limits) == (
        f"{strip} is 1x8000000, an aspect ratio of 8,000,000:1 (longer to shorter side), more than the limit of "
        f"8:1; crop it to at most 8:1, or leave it out of --input")
    assert _message(read_image, large, limits) == (
        f"{large} is 4100x2100 (8,610,000 pixels), more than the limit of 8,388,608 (8.4 MP); downscale it to at "
        f"most 8.4 MP, or leave it out of --input")


def test_evaluate_blames_a_corrupt_prediction_on_the_predictions(tiny_root, tmp_path):
    gts = sorted((tiny_root / "gtFine" / "val").rglob("*_labelIds.png"))
    preds = tmp_path / "pred"
    preds.mkdir()
    for gt in gts:  # perfect predictions, then one cut short
        shutil.copy(gt, preds / gt.name)
    broken = preds / gts[0].name
    broken.write_bytes(broken.read_bytes()[:100])
    msg = _message(evaluate_folder, tiny_root, "val", preds, False)
    assert msg.startswith(f"prediction {broken} is not a readable PNG (corrupt or truncated")
    assert f"write the predictions again (segstudy predict --model MODEL --input IMAGES --out {preds})" in msg
    assert "dataset" not in msg
    # a corrupt ground-truth file is still the dataset's
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    gt = root / gts[0].relative_to(tiny_root)
    gt.write_bytes(gt.read_bytes()[:100])
    shutil.copy(gts[0], broken)
    msg = _message(evaluate_folder, root, "val", preds, False)
    assert msg.startswith(f"{gt} is not a readable label PNG") and "regenerate the dataset" in msg


def test_a_network_that_ends_below_its_input_size_runs_once_an_image_after_the_first():
    calls = {"classes": 0, "run": 0}

    def classes(image):  # a foreign network's ids at half its input's size
        calls["classes"] += 1
        return np.zeros((image.shape[0] // 2, image.shape[1] // 2), np.uint8)

    def run(x):
        calls["run"] += 1
        logits = torch.zeros(1, 19, x.shape[2] // 2, x.shape[3] // 2)
        logits[:, 3] = 1.0
        return logits

    engine = inference.Engine("openvino", "foreign.xml", run, image_classes=classes)
    image = np.zeros((64, 128, 3), np.uint8)
    for _ in range(3):
        ids = inference.segment(engine, image, 64)
        assert ids.shape == (64, 128) and (ids == 3).all()  # from the logits, upsampled to the image
    assert calls == {"classes": 1, "run": 3}
