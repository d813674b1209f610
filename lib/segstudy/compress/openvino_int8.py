"""OpenVINO int8: NNCF's post-training quantization of the exported ONNX model, saved as OpenVINO IR
(`name.xml` with its weights in `name.bin` beside it), and the compiled model that runs it.

OpenVINO is the third int8 engine of notebook 05, beside torch FX and ONNX Runtime: which of them
is fastest depends on the CPU (docs/results.md), so the study times them in turn and deploys the
fastest servable one (studies/int8_choice.py). Where OpenVINO cannot run,
`unavailable()` says why in one line and the study goes on without its rows.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segstudy.compress.quantize import as_calibration_batch, calibration_batches
from segstudy.engine import measure
from segstudy.errors import UserError

SUFFIX = ".xml"  # the IR's graph; its weights are the file of the same name with WEIGHTS_SUFFIX
WEIGHTS_SUFFIX = ".bin"


def _nncf():
    # NNCF sends usage telemetry (Google Analytics) unless NNCF_CI or NNCF_DEV is set, its only switch
    # (nncf/telemetry/wrapper.py, read at import): a run of the study sends nothing
    os.environ.setdefault("NNCF_CI", "1")
    # its progress bars are rich's, which in a notebook kernel without ipywidgets warn that they fall
    # back to text: the warning was the one stray output of notebook 05
    warnings.filterwarnings("ignore", message='install "ipywidgets"', module="rich")
    import nncf

    return nncf


def unavailable() -> str | None:
    """Why OpenVINO cannot run int8 here, in words (not installed, its CPU plugin refuses this CPU), or None."""
    try:
        _nncf()
        import openvino as ov
    except ImportError as exc:
        return f"OpenVINO is not installed ({exc}); install the lock (requirements.lock) to time it"
    try:  # the CPU plugin alone: available_devices would load the GPU and NPU plugins too
        ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    except RuntimeError as exc:  # the CPU plugin refuses a CPU without the instructions it needs
        return f"OpenVINO cannot start on this CPU ({str(exc).splitlines()[0]})"
    return None


def weights_file(xml: str | Path) -> Path:
    """The weights file of the IR whose graph is `xml`."""
    return Path(xml).with_suffix(WEIGHTS_SUFFIX)


class _Images:
    """The calibration images as NNCF's data source: one (3, H, W) image per item, so that len()
    counts them for NNCF's subset_size without reading any, and iterable again, since NNCF may pass
    over its dataset more than once."""

    def __init__(self, images: Sequence[torch.Tensor]):
        if not len(images):
            calibration_batches(images)  # raises the one message for an empty calibration set
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i, image in enumerate(self.images):
            batch = as_calibration_batch(i, image)  # the check every engine's calibration item passes
            if image.ndim != 3:
                raise UserError(f"OpenVINO calibration image {i} is a shape {tuple(image.shape)}; it takes float "
                                f"(3, H, W) images, one per item (quantize.calibration_images gives them)")
            yield np.ascontiguousarray(batch.float().numpy())


def quantize_int8(fp32_onnx: str | Path, path: str | Path, images: Sequence[torch.Tensor]) -> Path:
    """OpenVINO int8 IR at `path` (.xml, its .bin beside it) from an fp32 ONNX file: NNCF's default
    post-training quantization (symmetric int8 activations, per-channel weights, fast bias
    correction) with its statistics over every one of `images` ((3, H, W) images, read one at a time)."""
    import openvino as ov

    nncf = _nncf()
    path = Path(path)
    if path.suffix != SUFFIX:
        raise UserError(f"an OpenVINO model is saved as {SUFFIX} (and .bin): {path}")
    data = _Images(images)
    logging.getLogger("nncf").setLevel(logging.WARNING)  # its per-step progress bars would fill the notebook
    quantized = nncf.quantize(ov.Core().read_model(str(fp32_onnx)), nncf.Dataset(data), subset_size=len(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # the pair replaces the old one only when written
        ov.save_model(quantized, str(Path(tmp) / path.name), compress_to_fp16=False)
        os.replace(Path(tmp) / weights_file(path).name, weights_file(path))
        os.replace(Path(tmp) / path.name, path)  # the graph last: an .xml beside its weights is complete
    return path


def compiled(path: str | Path, threads: int = 0, served: bool = False):
    """The IR (or an ONNX file) compiled for the CPU for batch-1 latency: one stream of `threads`
    threads (0: torch's current count, so every engine gets the same cores). `served`: as the server
    runs it (image_to_classes)."""
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(str(path))
        return core.compile_model(image_to_classes(model) if served else model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()})
    except RuntimeError as exc:  # OpenVINO's own errors: a missing .bin, a file of another kind
        raise UserError(f"{path} is not a loadable OpenVINO model ({str(exc).splitlines()[0]}); keep its "
                        f"{weights_file(path).name} beside it, or quantize it again (notebook 05)") from exc


def image_to_classes(model):
    """`model` from image to class ids: a (1, H, W, 3) uint8 RGB image in, normalised inside as the
    evaluation preset does (transforms' ImageNet mean and std on [0, 1] values), and the argmax over
    the logits' classes out, (1, 1, H, W) uint8 (TopK of 1, stable: the first index on ties, as numpy's
    argmax). For an image already at the network's size, the whole served path but decoding and the
    answer runs on OpenVINO's threads: no torch operation whose idle threads spin beside it, and the 19
    float maps of logits never written out (docs/serving.md has the figures)."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.preprocess import PrePostProcessor

    from segstudy.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    logits = model.get_results()[0].input_value(0)  # the first output, "out": an aux head would follow it
    top = ops.topk(logits, ops.constant(np.int64(1)), axis=1, mode="max", sort="value",
                   index_element_type="i32", stable=True)
    classes = ov.Model([ops.convert(top.output(1), "u8")], model.get_parameters(), f"{model.get_friendly_name()}_ids")
    steps = PrePostProcessor(classes)
    steps.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    steps.input().model().set_layout(ov.Layout("NCHW"))
    scale = float(np.iinfo(np.uint8).max)  # ToDtype(scale=True): uint8 to [0, 1]
    steps.input().preprocess().convert_element_type(ov.Type.f32).mean([scale * m for m in IMAGENET_MEAN]) \
        .scale([scale * s for s in IMAGENET_STD])
    return steps.build()


def inference_precision(model) -> str:
    """The precision OpenVINO runs the layers that int8 does not cover in (bf16 where the CPU has it)."""
    return model.get_property("INFERENCE_PRECISION_HINT").to_string()  # an ov.Type: "bf16", "f32"


class OvModule(nn.Module):
    """A compiled OpenVINO model behind a segstudy model's interface (image tensor in, {"out": logits}
    out), so the same validation loop scores it beside PyTorch and ONNX Runtime."""

    def __init__(self, model):
        super().__init__()
        self.model, self.request = model, model.create_infer_request()
        # an infer request runs one inference at a time ("Infer Request is busy" for a second caller,
        # e.g. the server's threads at concurrency 2); with one stream they would queue anyway
        self.lock = threading.Lock()

    def run(self, image: np.ndarray, copy: bool = False) -> np.ndarray:
        """The first output (logits) of one (N, 3, H, W) array, held by the request until its next run
        unless `copy`: a copy taken before another caller's run can overwrite it."""
        with self.lock:
            out = self.request.infer({0: image})[0]
            return out.copy() if copy else out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        image = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return {"out": torch.from_numpy(self.run(image, copy=True))}


def latency(module: OvModule, height: int, width: int, warmup: int = 2, iters: int = 5) -> dict:
    """Batch-1 run time of the bare request, the same shape of result as measure.latency."""
    x = np.random.default_rng(0).standard_normal((1, 3, height, width), dtype=np.float32)
    timed = measure.timed_in_turn({"ov": lambda: module.run(x)}, warmup, iters, size=f"{width}x{height}")["ov"]
    return timed | {"threads": int(module.model.get_property("INFERENCE_NUM_THREADS")), "device": "cpu (openvino)"}


def ov_version() -> str:
    import openvino as ov

    return ov.get_version()
