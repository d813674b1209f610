"""The served model's Prometheus metrics, answered on the scoring server's own port at GET /metrics,
and the feedback sample (off by default).

deploy/server.py builds MLflow's scoring app (`scoring_server.init(model)`) and `attach` gives it a
/metrics route and a middleware counting /invocations and /segment requests; the model (serving.py)
updates the per-image metrics and the drift window. tests/test_monitoring.py starts the real server and scrapes it.

Several uvicorn workers (`--workers N`) are separate processes: with PROMETHEUS_MULTIPROC_DIR set
(an empty folder; deploy/server.py makes one when N > 1) prometheus_client
keeps every worker's values in files there and any worker's /metrics adds them up. Without it each
worker would answer for itself. Every label comes from a fixed set (ERROR_KINDS, STAGES, the 19
class names, drift.FEATURES), never from a request, so the series cannot multiply. A metric that
fails to update is logged (rate-limited) and the request is answered all the same.
"""

from __future__ import annotations

import contextvars
import functools
import io
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segstudy.data import labels
from segstudy.deploy import drift, segment_route

ERROR_KINDS = ("not_an_image", "too_large", "bad_request", "internal", "timeout")
STAGES = ("decode", "model", "encode")  # per image: decoding, pre-processing + network + argmax, the answer
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
MEGAPIXEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.4)  # 8.4: inference.MAX_PIXELS
COUNTED = ("/invocations", segment_route.PATH)  # the routes that segment: the requests counted
ENABLED = "SEGSTUDY_METRICS"  # "0": serve without /metrics (benchmarks/bench_serving.py compares)
FEEDBACK_DIR, FEEDBACK_MAX, FEEDBACK_RATE = "SEGSTUDY_FEEDBACK_DIR", "SEGSTUDY_FEEDBACK_MAX", "SEGSTUDY_FEEDBACK_RATE"
_log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What the model found wrong with the request being answered (None: nothing, or not reached), and
    the monitoring of its images, done once the answer has gone out (after_answer)."""

    kind: str | None = None
    later: list[Callable[[], None]] = field(default_factory=list)


_OUTCOME: contextvars.ContextVar[Outcome | None] = contextvars.ContextVar("segstudy_outcome", default=None)


def after_answer(work: Callable[[], None]) -> None:
    """Run `work` (the metrics and drift window of an image, the feedback sample) once the request's
    answer has been sent and before it is counted, so that it adds nothing to the client's latency and
    a scrape that sees the request counted sees its images too; at once outside a counted request."""
    outcome = _OUTCOME.get()
    if outcome is None:
        work()
    else:
        outcome.later.append(work)


def note_error(kind: str) -> None:
    """Record the error kind of the request being answered (predict runs in a thread that got a
    copy of the request's context: the Outcome object itself is shared)."""
    outcome = _OUTCOME.get()
    if outcome is not None:
        outcome.kind = kind


def _safely(method):
    """A metric update never fails a request: it is logged (the first ten, then one in 1000)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                _log.warning("segstudy metrics: %s failed (failure %d); the request is answered regardless",
                             method.__name__, self.failures, exc_info=True)
    return wrapper


class ServingMetrics:
    """The metrics of one server process, and the drift window it scores."""

    def __init__(self, reference: drift.Reference | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.failures = 0
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("segstudy_requests", "POST /invocations and /segment requests answered", registry=r)
        self.errors = Counter("segstudy_request_errors", "requests answered with an error, by kind", ["kind"],
                              registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)  # every kind shows, at 0
        self.latency = Histogram("segstudy_request_seconds", "time to answer a POST /invocations request",
                                 buckets=LATENCY_BUCKETS, registry=r)
        stages = Histogram("segstudy_stage_seconds", "time per image in each stage", ["stage"],
                           buckets=LATENCY_BUCKETS, registry=r)
        self.stages = {s: stages.labels(s) for s in STAGES}
        self.images = Counter("segstudy_images", "images segmented", registry=r)
        self.megapixels = Histogram("segstudy_image_megapixels", "size of the images segmented (MP)",
                                    buckets=MEGAPIXEL_BUCKETS, registry=r)
        pixels = Counter("segstudy_predicted_pixels", "pixels predicted per class", ["class"], registry=r)
        self.pixels = [pixels.labels(name) for name in labels.CLASS_NAMES]
        self.window = drift.DriftWindow(reference) if reference is not None else None
        if reference is not None:
            self._drift_metrics(reference, Counter, Gauge)

    def _drift_metrics(self, reference: drift.Reference, Counter, Gauge) -> None:
        r = self.registry
        # mostrecent: with several workers the gauge shows the latest window scored by any of them
        self.score = Gauge("segstudy_drift_score", f"drift score of the latest window of {reference.window} images: "
                           f"{reference.statistic}", registry=r, multiprocess_mode="mostrecent")
        feature = Gauge("segstudy_drift_distance", "Jensen-Shannon distance of each feature in the latest window",
                        ["feature"], registry=r, multiprocess_mode="mostrecent")
        self.distance = {f: feature.labels(f) for f in drift.FEATURES}
        threshold = Gauge("segstudy_drift_threshold", f"the drift score's threshold (false alarms on about "
                          f"{reference.false_alarm:.0%} of in-domain windows)", registry=r, multiprocess_mode="max")
        threshold.set(min(reference.threshold, 1e9))  # no calibration: inf would not alarm either
        self.windows = Counter("segstudy_drift_windows", "windows scored", registry=r)
        self.alarms = Counter("segstudy_drift_alarms", "windows whose drift score crossed the threshold", registry=r)

    @_safely
    def request_done(self, status: int, kind: str | None, seconds: float) -> None:
        self.requests.inc()
        self.latency.observe(seconds)
        if status >= 400:
            self.errors.labels(kind if kind in ERROR_KINDS else _kind_of(status)).inc()

    @_safely
    def decoded(self, seconds: list[float]) -> None:
        for s in seconds:
            self.stages["decode"].observe(s)

    @_safely
    def segmented(self, image: np.ndarray, class_pixels: dict[str, int], model_s: float, encode_s: float) -> None:
        self.images.inc()
        self.megapixels.observe(image.shape[0] * image.shape[1] / 1e6)
        self.stages["model"].observe(model_s)
        self.stages["encode"].observe(encode_s)
        counts = list(class_pixels.values())  # in labels.CLASS_NAMES order (inference.class_pixels)
        for child, n in zip(self.pixels, counts):
            child.inc(n)
        if self.window is not None:
            self._drift(drift.image_row(image, counts))

    def _drift(self, row: np.ndarray) -> None:
        scored = self.window.add(row)
        if scored is None:
            return
        score, found = scored
        self.score.set(score)
        for name, value in found.items():
            self.distance[name].set(value)
        self.windows.inc()
        if score > self.window.reference.threshold:
            self.alarms.inc()


def _kind_of(status: int) -> str:
    """The kind of an error the model did not see (MLflow refused the body before predict)."""
    return "timeout" if status == 504 else "internal" if status >= 500 else "bad_request"


class _Shares:
    """segstudy_predicted_class_share: each class's share of all predicted pixels, derived when
    scraped from the pixel counters (summed over the workers), so the shares sum to 1."""

    def __init__(self, source):
        self.source = source

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        families = list(self.source.collect())
        yield from families
        counts = {s.labels.get("class"): s.value for f in families if f.name == "segstudy_predicted_pixels"
                  for s in f.samples if s.name.endswith("_total")}
        total = sum(counts.values())
        shares = GaugeMetricFamily("segstudy_predicted_class_share", "share of all predicted pixels per class",
                                   labels=["class"])
        for name in labels.CLASS_NAMES:
            shares.add_metric([name], counts.get(name, 0.0) / total if total else 0.0)
        yield shares


def exposition(metrics: ServingMetrics) -> bytes:
    """The Prometheus text of this server: every worker's when PROMETHEUS_MULTIPROC_DIR is set."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        source = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(source)
    else:
        source = metrics.registry
    registry.register(_Shares(source))
    return generate_latest(registry)


class _CountRequests:
    """ASGI middleware around MLflow's app: times and counts every request to COUNTED, with the
    error kind predict noted (note_error) or, for a body refused before predict, its status."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in COUNTED:
            return await self.app(scope, receive, send)
        outcome, status = Outcome(), [500]
        token, start = _OUTCOME.set(outcome), time.perf_counter()

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _OUTCOME.reset(token)
            seconds = time.perf_counter() - start  # the answer has gone out: its latency is known
            for work in outcome.later:
                work()
            self.metrics.request_done(status[0], outcome.kind, seconds)


def enabled() -> bool:
    return os.environ.get(ENABLED, "1") != "0"


def attach(app, model: Any) -> ServingMetrics:
    """Give MLflow's FastAPI `app` GET /metrics and the request counting, and `model` (the
    SegmentationModel it serves) the metrics to update."""
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.responses import Response

    metrics = ServingMetrics(getattr(model, "reference", None))

    async def scrape(request) -> Response:  # a plain Starlette route: FastAPI would read `request` as a query
        return Response(exposition(metrics), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/metrics", scrape, methods=["GET"], include_in_schema=False)
    app.add_middleware(_CountRequests, metrics=metrics)
    model.monitor(metrics, Feedback.from_env())
    return metrics


class Feedback:
    """The feedback sample (off unless SEGSTUDY_FEEDBACK_DIR is set): about `rate` of the images
    served, each with its prediction, kept in `folder` for later labelling, at most `cap` of them
    (across all workers: a sample claims its numbered slot with an exclusive create). The images are
    what clients sent: docs/serving.md says what that means for privacy."""

    def __init__(self, folder: str | Path, cap: int, rate: float, seed: int | None = None):
        self.folder, self.cap, self.rate = Path(folder), int(cap), float(rate)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.next = 0
        self.random = random.Random(seed)

    @classmethod
    def from_env(cls) -> Feedback | None:
        folder = os.environ.get(FEEDBACK_DIR)
        if not folder:
            return None
        return cls(folder, int(os.environ.get(FEEDBACK_MAX, "1000")), float(os.environ.get(FEEDBACK_RATE, "0.01")))

    def _claim(self) -> int | None:
        while self.next < self.cap:
            try:
                fd = os.open(self.folder / f"{self.next:06d}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
            except FileExistsError:
                self.next += 1
                continue
            os.close(fd)
            return self.next
        return None

    def offer(self, image: np.ndarray, label_ids_png: bytes, class_pixels: dict[str, int]) -> Path | None:
        """Keep this image and its answer with probability `rate` while slots are left."""
        if self.next >= self.cap or self.random.random() >= self.rate:
            return None
        slot = self._claim()
        if slot is None:
            return None
        stem = self.folder / f"{slot:06d}"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        Path(f"{stem}_image.png").write_bytes(buf.getvalue())
        Path(f"{stem}_labelIds.png").write_bytes(label_ids_png)
        meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "height": image.shape[0],
                "width": image.shape[1], "class_pixels": class_pixels}
        Path(f"{stem}.json").write_text(json.dumps(meta))  # written last: a complete sample has it filled
        return stem

