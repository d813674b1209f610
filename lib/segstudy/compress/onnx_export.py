"""ONNX export and ONNX Runtime sessions, fp32 and static int8 (QDQ), for notebook 05.

- Export uses torch's TorchScript-based exporter (`dynamo=False`): the torch.export-based one
  needs onnxscript, which is not part of this environment, and the classic exporter handles
  these CNNs fully. Batch, height and width are dynamic axes, so one file serves the validation
  size and the benchmark size, and the model is traced on a crop of the example (quantize.example_crop).
- int8 is ONNX Runtime's static quantization in QDQ format: per-channel symmetric int8 weights,
  activations uint8 (x86's fast u8 x s8 path) or int8, MinMax ranges computed by ORT's calibrator
  one image at a time and handed to quantize_static as its calibration cache (minmax_ranges says why).
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
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.calibrate import MinMaxCalibrater, TensorsData, save_tensors_data
from torch import nn

from segstudy.compress.quantize import LogitsOnly, calibration_batches, example_crop
from segstudy.config import ORT_ACTIVATIONS as ACTIVATIONS
from segstudy.errors import UserError
from segstudy.files import atomic_path

OPSET = 17
# ops ORT quantizes; Resize (the final upsampling) is left out on purpose, see above
INT8_OPS = ["Conv", "Add", "Relu", "MaxPool", "GlobalAveragePool", "Concat", "ConvTranspose"]


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
    """Feeds float batches (N, 3, H, W) to ORT's calibrator, one batch per get_next(), each
    converted when asked for (none held in advance)."""

    def __init__(self, batches: Iterable[torch.Tensor], input_name: str):
        self._feeds = ({input_name: np.ascontiguousarray(b.float().numpy())} for b in batches)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


class _MinMaxCalibrater(MinMaxCalibrater):
    """ORT's MinMax calibrator, its session with ORT's memory pattern and CPU arena off (and torch's
    thread count, as session() uses). With them on, the second run allocates the planned block on
    top of what the first run left in the arena: the peak at 4 images was 1.6x that at 1, one image
    per run (docs/results.md, "Does int8 calibration memory grow with the number of images?"); off,
    the process holds what the running image needs."""

    def create_inference_session(self) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's: tensors keep their names
        opts.enable_mem_pattern = False
        opts.enable_cpu_mem_arena = False
        opts.intra_op_num_threads = torch.get_num_threads()
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                  providers=self.execution_providers)


def minmax_ranges(model_path: str | Path, batches: Iterable[torch.Tensor], augmented_path: str | Path
                  ) -> TensorsData:
    """ORT's MinMax ranges of the tensors INT8_OPS quantize, over every image of `batches`, one image
    at a time (quantize.calibration_batches): each collect_data call runs one image, merges its
    ranges into the running ones and clears its outputs, so the calibrator holds one image's outputs
    at a time (quantize_static's single collect_data holds every batch's, its ReduceMin/ReduceMax
    results, until the end). ORT's own cap, CalibMaxIntermediateOutputs, clears the outputs without
    merging them first ("No data is collected"). The calibrator is built as create_calibrator
    builds it for MinMax with no extra options; the ranges are the same as quantize_static's own."""
    calibrator = _MinMaxCalibrater(Path(model_path), INT8_OPS, augmented_model_path=str(augmented_path))
    calibrator.augment_graph()
    calibrator.create_inference_session()
    for image in calibration_batches(batches):
        calibrator.collect_data(_Reader([image], calibrator.infer_session.get_inputs()[0].name))
    return calibrator.compute_data()


def quantize_int8(fp32_path: str | Path, path: str | Path, batches: Iterable[torch.Tensor],
                  activation: str = "uint8") -> Path:
    """Static int8 QDQ model from an fp32 ONNX file: per-channel int8 weights, `activation`
    (uint8 | int8) activations, MinMax ranges over the images of `batches` ((N, 3, H, W) batches or
    (3, H, W) images, read one image at a time: minmax_ranges)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activation not in ACTIVATIONS:
        raise UserError(f"quant.ort_activation = '{activation}'; choose uint8 or int8")
    batches = calibration_batches(batches)  # an empty or malformed set fails here, before any work
    with tempfile.TemporaryDirectory() as tmpdir, atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # shape inference + graph clean-up first, as ORT's quantization docs recommend
        pre, ranges = Path(tmpdir) / "preprocessed.onnx", Path(tmpdir) / "ranges.json"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        save_tensors_data(minmax_ranges(pre, batches, Path(tmpdir) / "augmented.onnx"), ranges)
        # the ranges as quantize_static's calibration cache: it skips its own calibration and reads them
        quantize_static(str(pre), str(tmp), None, quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                        op_types_to_quantize=INT8_OPS, calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=ranges)
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
