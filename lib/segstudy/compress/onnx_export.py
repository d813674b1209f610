"""ONNX export and ONNX Runtime sessions, fp32 and static int8 (QDQ), for notebook 05.

- Export uses torch's TorchScript-based exporter (`dynamo=False`): the torch.export-based one
  needs onnxscript, which is not part of this environment, and the classic exporter handles
  these CNNs fully. Batch, height and width are dynamic axes, so one file serves the validation
  size and the benchmark size, and the model is traced on a crop of the example (quantize.example_crop).
- int8 is ONNX Runtime's static quantization in QDQ format: per-channel symmetric int8 weights,
  activations uint8 (x86's fast u8 x s8 path) or int8, MinMax ranges from a CalibrationDataReader.
  The final bilinear Resize stays in float: 19-channel logits upsampled in uint8 would lose
  precision for no measurable gain.
- Every file is written to a temporary name in the target folder and renamed into place, so a
  failed export or quantization never leaves a half-written model where a valid one is expected.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from segstudy.compress.quantize import LogitsOnly, check_calibration, example_crop
from segstudy.errors import UserError
from segstudy.files import atomic_path

OPSET = 17
# ops ORT quantizes; Resize (the final upsampling) is left out on purpose, see above
INT8_OPS = ["Conv", "Add", "Relu", "MaxPool", "GlobalAveragePool", "Concat", "ConvTranspose"]
ACTIVATIONS = ("uint8", "int8")


def export(model: nn.Module, path: str | Path, example: torch.Tensor) -> Path:
    """Export a segstudy model ({"out": logits}) to ONNX, one input `image` and one output `logits`,
    dynamic batch/height/width, traced on a crop of `example`. An operator the exporter cannot
    handle is a UserError naming it; nothing is left at `path` then."""
    model = (model if isinstance(model, LogitsOnly) else LogitsOnly(model)).eval()
    example = example_crop(example)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classic exporter's deprecation notice and tracer warnings
        try:
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch", 2: "height", 3: "width"}})
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            raise UserError(f"ONNX export of {type(model).__name__} failed: {str(exc).splitlines()[0]}; "
                            f"replace that operator in the model or keep this model in PyTorch "
                            f"(nothing was written to {path})") from None
        except Exception as exc:  # the tracer's errors name the offending op in their first line
            raise UserError(f"ONNX export of {type(model).__name__} failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written to "
                            f"{path}") from exc
    return Path(path)


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session with all graph optimisations (QDQ pairs fuse into QLinearConv etc.) and
    `threads` intra-op threads (0: torch's current count, so both engines get the same cores)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: ORT's warnings about optimised-graph caching are noise here
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ORT session behind a segstudy model's interface (image tensor in, {"out": logits} out),
    so the same validation loop scores PyTorch and ONNX Runtime."""

    def __init__(self, sess: ort.InferenceSession):
        super().__init__()
        self.session = sess
        self.input_name = sess.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        image = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return {"out": torch.from_numpy(self.session.run(None, {self.input_name: image})[0])}


class _Reader(CalibrationDataReader):
    """Feeds float batches (N, 3, H, W) to ORT's calibrator, one batch per get_next()."""

    def __init__(self, batches: Sequence[torch.Tensor], input_name: str):
        self._it = iter([{input_name: np.ascontiguousarray(b.float().numpy())} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def quantize_int8(fp32_path: str | Path, path: str | Path, batches: Sequence[torch.Tensor],
                  activation: str = "uint8") -> Path:
    """Static int8 QDQ model from an fp32 ONNX file: per-channel int8 weights, `activation`
    (uint8 | int8) activations, MinMax ranges over `batches` (checked by quantize.check_calibration)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activation not in ACTIVATIONS:
        raise UserError(f"quant.ort_activation = '{activation}'; choose uint8 or int8")
    batches = check_calibration(batches)
    with tempfile.TemporaryDirectory() as tmpdir, atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # shape inference + graph clean-up first, as ORT's quantization docs recommend
        pre = Path(tmpdir) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        quantize_static(str(pre), str(tmp), _Reader(batches, "image"), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                        op_types_to_quantize=INT8_OPS, calibrate_method=CalibrationMethod.MinMax)
    return Path(path)


def latency(sess: ort.InferenceSession, height: int, width: int, warmup: int = 2, iters: int = 5) -> dict:
    """Median (and min/max) batch-1 run time, same shape of result as measure.latency."""
    x = np.random.default_rng(0).standard_normal((1, 3, height, width), dtype=np.float32)
    name = sess.get_inputs()[0].name
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        sess.run(None, {name: x})
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
            "max_ms": 1000 * max(times), "times_ms": [1000 * t for t in times], "iters": iters,
            "size": f"{width}x{height}", "threads": sess.get_session_options().intra_op_num_threads,
            "device": "cpu (onnxruntime)"}
