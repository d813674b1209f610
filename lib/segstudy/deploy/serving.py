"""The servable segstudy model: an MLflow pyfunc around a checkpoint (fp32 or pruned) or an ONNX
file (fp32 or int8), served by `mlflow models serve -m models:/NAME@champion --env-manager local`.

Request (`POST /invocations`, JSON): one row per image, base64 PNG/JPEG in the column `image`:
    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0..."], ["/9j/4AAQ..."]]}}
Answer: one prediction per image, in order:
    {"predictions": [{"label_ids_png": "<base64 Cityscapes labelIds PNG>", "height": H, "width": W,
                      "class_pixels": {"road": n, ..., "bicycle": n}}, ...]}
The decode / pre-processing / post-processing is segstudy.deploy.inference's, the same as `segstudy predict`.
`segstudy serve` also answers POST /segment (deploy/segment_route.py, `segment_file` here): one image
file as the body, its labelIds PNG as the answer, without base64 or MLflow's JSON handling.

Errors: a bad request is answered 400 with a one-line reason (MlflowException INVALID_PARAMETER_VALUE),
an unexpected failure 500 with a one-line message, its traceback going to the server's log only:
MLflow's scoring server puts a `stack_trace` in the answer for any other exception type. What
MLflow parses the JSON body before the model runs and answers a body that is not valid JSON with
a 400 quoting the whole body: `bound_json_errors` (applied when the model loads) shortens that
quote. A request without a Content-Type and a body its parsers fail on in other ways (JSON nested
deeper than Python's recursion limit, an integer of more than 4300 digits) would be MLflow's bare
500: `refuse_unreadable_bodies` (applied with it) answers them 415 and 400, naming the mistake.
MLflow still reads any body in full, so cap request bodies in front of the server (a proxy or
ingress body-size limit) where clients are not trusted.

The logged model carries segstudy's own code (`code_paths`), so it loads wherever its pinned
requirements install, e.g. with `mlflow models build-docker`, not only beside this checkout.

Monitoring: served by deploy/server.py (`segstudy serve`, the serve image), the model updates the
metrics of deploy/serving_metrics.py from every prediction (stage times, sizes, class pixels, errors by
kind) and scores its drift window against the reference logged with it (deploy/drift.py).
"""

from __future__ import annotations

import base64
import contextvars
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Object, Property, Schema
from PIL import Image

from segstudy.compress import openvino_int8
from segstudy.data import labels
from segstudy.deploy import drift, inference, serving_metrics
from segstudy.errors import UserError
from segstudy.models.checkpoint import model_format

IMAGE_COLUMN = "image"
MAX_IMAGES_PER_REQUEST = 16
# Training-only parts of a checkpoint: dropped from the served copy (a third of its size).
TRAINING_STATE = ("optimizer", "lr_scheduler", "scaler", "rng", "history")
_log = logging.getLogger(__name__)
BODY_ADVICE = ("; POST /segment takes the PNG or JPEG file itself as the body (curl --data-binary @FILE), "
               "base64 in JSON goes to POST /invocations")
# set by SegmentationModel.predict: a failure after it (answering) is the server's, one before it the body's
_REACHED_MODEL: contextvars.ContextVar[bool] = contextvars.ContextVar("segstudy_reached_model", default=False)


def _invalid(message: str, kind: str = "bad_request") -> MlflowException:
    # INVALID_PARAMETER_VALUE is answered as HTTP 400 with this message (not a stack trace); the
    # metrics count it under `kind` (serving_metrics.ERROR_KINDS)
    serving_metrics.note_error(kind)
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Images in, Cityscapes labelIds PNGs and per-class pixel counts out."""

    def load_context(self, context) -> None:
        cfg = context.model_config or {}
        self.base_size = int(cfg["base_size"])
        self.max_pixels = int(cfg.get("max_pixels", inference.MAX_PIXELS))
        self.limits = inference.SizeLimits(self.base_size, self.max_pixels)
        self.engine = inference.load_engine(context.artifacts["model"])
        reference = context.artifacts.get("reference")  # models registered before monitoring have none
        self.reference = drift.Reference.load(reference) if reference else None
        self.metrics: serving_metrics.ServingMetrics | None = None  # set by the server only (monitor)
        self.feedback: serving_metrics.Feedback | None = None

    def monitor(self, metrics: serving_metrics.ServingMetrics,
                feedback: serving_metrics.Feedback | None = None) -> None:
        """Update `metrics` (and offer images to the feedback sample) from every prediction."""
        self.metrics, self.feedback = metrics, feedback

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> train ids at its size; what `segstudy predict` calls for an MLflow URI."""
        return inference.segment(self.engine, image, self.base_size)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        _REACHED_MODEL.set(True)
        try:
            return self._predict(model_input)
        except MlflowException:
            raise
        except Exception as exc:
            raise _internal("segmenting", exc) from None

    def segment_file(self, data: bytes) -> tuple[bytes, dict[str, int]]:
        """POST /segment's work (deploy/segment_route.py): one PNG/JPEG file's bytes -> (its labelIds
        PNG, pixels per class), with the metrics and errors of /invocations."""
        try:
            start = time.perf_counter()
            image = self._decode_image(data, "the request body", BODY_ADVICE)
            if self.metrics is not None:
                self.metrics.decoded([time.perf_counter() - start])
            return self._answer("the image", image)
        except MlflowException:
            raise
        except Exception as exc:
            raise _internal("segmenting", exc) from None

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for i, image in enumerate(self._decode(model_input)):
            png, counts = self._answer(f"image {i}", image)
            rows.append(answer_row(png, counts, image.shape[:2]))
        return pd.DataFrame(rows, columns=["label_ids_png", "height", "width", "class_pixels"])

    def _answer(self, what: str, image: np.ndarray) -> tuple[bytes, dict[str, int]]:
        """A request's image (`what`: which, for an error) -> (its labelIds PNG, pixels per class),
        counted by the metrics and offered to the feedback sample once the answer is out."""
        start = time.perf_counter()
        try:
            train_ids = self.segment(image)
        except UserError as exc:  # e.g. a fixed-shape ONNX graph and an image of another aspect
            raise _invalid(f"{what}: {exc}") from None
        segmented = time.perf_counter()
        png, counts = encode(train_ids)
        if self.metrics is not None:
            model_s, encode_s = segmented - start, time.perf_counter() - segmented
            serving_metrics.after_answer(lambda: self._monitored(image, png, counts, model_s, encode_s))
        return png, counts

    def _monitored(self, image: np.ndarray, png: bytes, counts: dict[str, int], model_s: float,
                   encode_s: float) -> None:
        self.metrics.segmented(image, counts, model_s, encode_s)
        if self.feedback is None:
            return
        try:
            self.feedback.offer(image, png, counts)
        except Exception:  # the sample is a by-product: the request is answered regardless
            _log.warning("segstudy feedback sample: could not keep an image", exc_info=True)

    def _decode(self, model_input: pd.DataFrame) -> list[np.ndarray]:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            cols = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise _invalid(f"expected a column '{IMAGE_COLUMN}' of base64 PNG/JPEG strings, got {cols}; send "
                           f'{{"dataframe_split": {{"columns": ["{IMAGE_COLUMN}"], "data": [["<base64>"]]}}}}')
        values = model_input[IMAGE_COLUMN].tolist()
        if not values:
            raise _invalid(f"the request holds no images (an empty list); send 1 to {MAX_IMAGES_PER_REQUEST} rows "
                           f"in the column '{IMAGE_COLUMN}'")
        if len(values) > MAX_IMAGES_PER_REQUEST:
            raise _invalid(f"the request holds {len(values)} images; send at most {MAX_IMAGES_PER_REQUEST} "
                           f"per request", "too_large")
        images, seconds = [], []
        for i, value in enumerate(values):
            start = time.perf_counter()
            images.append(self._decode_image(value, f"image {i}"))
            seconds.append(time.perf_counter() - start)
        if self.metrics is not None:
            self.metrics.decoded(seconds)
        return images

    def _decode_image(self, value: str | bytes, what: str, advice: str = "") -> np.ndarray:
        """A base64 string (/invocations) or the file's bytes (/segment) -> (H, W, 3) uint8 RGB; what is
        wrong with it answered 400 and counted by kind (`advice` follows a body that is no image)."""
        decode = inference.decode_image if isinstance(value, bytes) else inference.decode_base64_image
        try:
            return decode(value, what, self.limits)
        except inference.ImageTooLarge as exc:
            raise _invalid(f"{exc.reason}; send images of at most {exc.limit}", "too_large") from None
        except UserError as exc:
            raise _invalid(f"{exc}{advice}", "not_an_image") from None


def encode(train_ids: np.ndarray) -> tuple[bytes, dict[str, int]]:
    """One image's prediction as both routes answer it: the Cityscapes labelIds PNG, pixels per class."""
    return inference.label_ids_png(train_ids), inference.class_pixels(train_ids)


def answer_row(png: bytes, counts: dict[str, int], shape: tuple[int, int]) -> dict[str, Any]:
    """One image's row of an /invocations answer: base64 labelIds PNG, its size, pixels per class."""
    return {"label_ids_png": base64.b64encode(png).decode("ascii"), "height": shape[0], "width": shape[1],
            "class_pixels": counts}


def answer(train_ids: np.ndarray) -> dict[str, Any]:
    """One image's prediction as /invocations serves it."""
    return answer_row(*encode(train_ids), train_ids.shape)


def example_image(height: int = 64, width: int = 128) -> bytes:
    """A small deterministic PNG (sky over road) for the logged input example."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[: height // 2] = (70, 130, 180)
    arr[height // 2:] = (128, 64, 128)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _signature() -> tuple[pd.DataFrame, ModelSignature]:
    example = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image()).decode("ascii")]})
    counts = Object([Property(name, "long") for name in labels.CLASS_NAMES])
    outputs = Schema([ColSpec("string", "label_ids_png"), ColSpec("long", "height"), ColSpec("long", "width"),
                      ColSpec(counts, "class_pixels")])
    return example, ModelSignature(Schema([ColSpec("string", IMAGE_COLUMN)]), outputs)


def _requirements(kind: str) -> list[str]:
    # pinned from this environment; stated so that MLflow does not load the model to infer them.
    # segstudy itself is not a requirement: its code travels with the model (code_paths)
    names = ["torch", "torchvision", "mlflow", "pillow", "imagecodecs", "pandas", "numpy", "cityscapesscripts",
             "prometheus_client"]
    names += {"onnx": ["onnxruntime"], "openvino": ["openvino"]}.get(kind, [])
    return [f"{n}=={installable_version(metadata.version(n))}" for n in names]


def installable_version(version: str) -> str:
    """The version without a local label: a CPU or CUDA build of torch is `2.14.1+cpu` or
    `2.14.1+cu130`, which no index but PyTorch's serves; `2.14.1` installs from PyPI (the
    environment that serves the model picks its own build)."""
    return version.split("+", 1)[0]


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # lib/segstudy, logged with every model


def bound_json_errors(limit: int = 2000) -> None:
    """MLflow's scoring server answers a body that is not valid JSON with a 400 quoting the whole
    body, however large; shorten that quote to `limit` characters. It wraps the server's private
    JSON decoder (mlflow is locked in requirements.lock; tests/test_serving.py checks the answer)."""
    from mlflow.pyfunc import scoring_server

    decode = scoring_server._decode_json_input
    if getattr(decode, "segstudy_bounded", False):
        return

    def bounded(json_input):
        try:
            return decode(json_input)
        except MlflowException as exc:
            if len(exc.message) <= limit:
                raise
            raise type(exc)(exc.message[:limit] + f"... ({len(exc.message):,} characters in all)") from None
    bounded.segstudy_bounded = True
    scoring_server._decode_json_input = bounded


CONTENT_TYPES = "application/json (or text/csv, application/vnd.apache.parquet)"
REQUEST_FORM = f'{{"dataframe_split": {{"columns": ["{IMAGE_COLUMN}"], "data": [["<base64 PNG/JPEG>"]]}}}}'


def _internal(doing: str, exc: Exception) -> MlflowException:
    """The server's own failure while `doing` (segmenting, answering): logged with its traceback,
    counted as kind="internal", answered 500 without the details."""
    _log.exception(f"segstudy model: unexpected error while {doing}")
    serving_metrics.note_error("internal")
    return MlflowException(f"internal error while {doing} ({type(exc).__name__}); the server's log has the details",
                           error_code=INTERNAL_ERROR)


def refuse_unreadable_bodies() -> None:
    """Answer the client mistakes MLflow's scoring server lets fall through as a bare 500 (counted
    `internal` by the metrics, what the server-error alert fires on) with a 4xx naming them: no
    Content-Type header (415), and a body its parsers raise anything but MlflowException on (400:
    JSON nested too deeply, an over-long integer, ...). A failure after the model answered stays a
    500, logged. It wraps the server's module-level `invocations` (mlflow is locked in
    requirements.lock; tests/test_serving.py and tests/test_monitoring.py check the answers)."""
    from mlflow.pyfunc import scoring_server

    invocations = scoring_server.invocations
    if getattr(invocations, "segstudy_guarded", False):
        return

    def guarded(data, content_type, model, input_schema):
        if not (content_type or "").strip():  # MLflow calls content_type.split(";")
            return scoring_server.InvocationsResponse(
                response=f"the request has no Content-Type header; send Content-Type: {CONTENT_TYPES}",
                status=415, mimetype="text/plain")
        reached = _REACHED_MODEL.set(False)
        try:
            return invocations(data, content_type, model, input_schema)
        except MlflowException:
            raise
        except Exception as exc:
            if _REACHED_MODEL.get():
                raise _internal("answering", exc) from None
            raise _unreadable(content_type, exc) from None
        finally:
            _REACHED_MODEL.reset(reached)
    guarded.segstudy_guarded = True
    scoring_server.invocations = guarded


def _unreadable(content_type: str, exc: Exception) -> MlflowException:
    # Python's own advice after "; " (sys.set_int_max_str_digits) is for the server, not the client
    reason = str(exc).split("; ")[0][:300]
    mime = content_type.split(";")[0].strip()
    return _invalid(f"the request body could not be read as {mime} ({type(exc).__name__}: {reason}); send "
                    f"{REQUEST_FORM}")


def request_images(body: str) -> list:
    """The image column of one /invocations JSON body, parsed as the scoring server parses it: every
    form it accepts (dataframe_split, dataframe_records, instances, inputs), through MLflow's own
    parsing and schema enforcement with the input schema segstudy logs. An MlflowException names
    what is wrong with the body. (What `segstudy monitor` reads a request log with.)"""
    from mlflow.models.utils import _enforce_schema
    from mlflow.pyfunc import scoring_server

    schema = _signature()[1].inputs
    try:
        data, _ = scoring_server._split_data_and_params(body)
        frame = _enforce_schema(scoring_server.infer_and_parse_data(data, schema), schema)
    except MlflowException:
        raise
    except Exception as exc:  # what refuse_unreadable_bodies answers 400 in the server
        raise _unreadable("application/json", exc) from None
    return frame[IMAGE_COLUMN].tolist()


def servable_copy(model_path: str | Path, out_dir: str | Path) -> Path:
    """The file to log: an ONNX file as it is, an OpenVINO .xml with its .bin beside it; a checkpoint
    without its training-only state."""
    from segstudy.models.checkpoint import load_checkpoint, save_checkpoint

    model_path, out_dir = Path(model_path), Path(out_dir)
    if model_format(model_path) == "openvino":  # the weights travel beside the graph
        shutil.copy2(openvino_int8.weights_file(model_path), out_dir)
    if model_format(model_path) != "torch":
        return Path(shutil.copy2(model_path, out_dir / model_path.name))
    ckpt = load_checkpoint(model_path)
    return save_checkpoint({k: v for k, v in ckpt.items() if k not in TRAINING_STATE}, out_dir / "model.pt")


def log_servable(model_path: str | Path, base_size: int, registered_model_name: str | None = None,
                 max_pixels: int = inference.MAX_PIXELS, name: str = "model",
                 input_example: bool = True, reference: drift.Reference | None = None) -> mlflow.models.model.ModelInfo:
    """Log (into the active MLflow run) the pyfunc model serving `model_path`; optionally register it.

    `model_path`: a segstudy checkpoint (.pt, fp32 or pruned), an .onnx file (fp32 or int8) or an
    OpenVINO int8 .xml (its .bin beside it).
    `base_size`: the evaluation shorter side the model was trained for (cfg.data.base_size).
    `input_example`: log a request example, which MLflow serves once (tracking.input_example).
    `reference`: the drift reference the server scores its windows against (reference.json).
    """
    model_path = Path(model_path)
    inference.load_engine(model_path)  # fail here, with the file named, rather than in the server
    kind = model_format(model_path)
    example, signature = _signature()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        if not input_example:  # asked for: MLflow's advice to log one is noise here
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        artifacts = {"model": str(servable_copy(model_path, tmp))}
        if kind == "openvino":  # MLflow copies each artefact into one folder: the .bin lands beside the .xml
            artifacts["model_weights"] = str(openvino_int8.weights_file(artifacts["model"]))
        if reference is not None:
            artifacts["reference"] = str(reference.save(Path(tmp) / "reference.json"))
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("serving_model.py")),  # models from code
            artifacts=artifacts,
            model_config={"base_size": int(base_size), "max_pixels": int(max_pixels), "format": kind},
            signature=signature, input_example=example if input_example else None, pip_requirements=_requirements(kind),
            code_paths=[str(PACKAGE_DIR)], registered_model_name=registered_model_name)


def load_segmenter(model_uri: str) -> SegmentationModel:
    """Load a logged/registered segstudy model in-process (what `segstudy predict` uses for URIs)."""
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not isinstance(model, SegmentationModel):
        raise UserError(f"{model_uri} is an MLflow model but not a segstudy segmentation model "
                        f"({type(model).__name__}); register one with segstudy.deploy.registry.register")
    return model


def serve_command(model_uri: str, host: str = "127.0.0.1", port: int = 5001, workers: int = 1,
                  timeout: int = 60) -> list[str]:
    """The server `segstudy serve` runs: what `mlflow models serve ... --env-manager local` does,
    with GET /metrics on the same port (deploy/server.py), from this environment."""
    return [sys.executable, "-m", "segstudy.deploy.server", "-m", model_uri, "-h", host, "-p", str(port),
            "-w", str(workers), "-t", str(timeout)]


def serve_env(tracking_uri: str) -> dict[str, str]:
    """The scoring server execs `uvicorn`: this environment's bin/ goes first on PATH."""
    bindir = str(Path(sys.executable).parent)
    return os.environ | {"MLFLOW_TRACKING_URI": tracking_uri,
                         "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
