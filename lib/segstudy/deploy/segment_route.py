"""POST /segment: one image file in, its Cityscapes labelIds PNG out, beside MLflow's /invocations
on the scoring server of deploy/server.py (`segstudy serve`, the serve image).

    curl --data-binary @frame.png http://HOST:PORT/segment -o frame_labelIds.png -D -

Request: the PNG or JPEG file itself as the body. Its format is read from its bytes, as `segstudy
predict` reads a file, so any Content-Type will do (curl's default included).
Answer 200: the labelIds PNG (image/png), the same pixels /invocations and `segstudy predict` give,
with its pixels per class as JSON in the header `Segstudy-Class-Pixels`.
Errors: the JSON of /invocations ({"error_code": ..., "message": "<one line>"}), 400 for what is
wrong with the image, 500 for the server's own failure, and MLflow's 504 past its request timeout
(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT); the metrics count both routes alike.

It is /invocations without base64 both ways and without MLflow's JSON and DataFrame handling: the
request path for clients that send one camera frame at a time (docs/serving.md has the figures).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException

PATH = "/segment"
CLASS_PIXELS_HEADER = "Segstudy-Class-Pixels"
TIMED_OUT = "Request processing time exceeded limit"  # MLflow's own 504 body (scoring_server.init)


class _SegmentRoute:
    """ASGI middleware answering POST /segment itself; everything else goes on to MLflow's app. It sits
    outside MLflow's request-timeout middleware, a Starlette BaseHTTPMiddleware whose streams around
    the body and the answer cost about a millisecond a request (docs/serving.md), and applies the
    same timeout itself."""

    def __init__(self, app, model: Any):
        self.app, self.model = app, model
        self.timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        from starlette.responses import Response

        try:
            response = await asyncio.wait_for(self._answer(Request(scope, receive)), self.timeout)
        except TimeoutError:
            response = Response(TIMED_OUT, status_code=504, media_type="application/json")
        await response(scope, receive, send)

    async def _answer(self, request):
        from starlette.responses import Response

        data = await request.body()
        try:  # in a thread, as MLflow runs /invocations: the event loop keeps answering /ping
            png, counts = await asyncio.to_thread(self.model.segment_file, data)
        except MlflowException as exc:
            return Response(exc.serialize_as_json(), status_code=exc.get_http_status_code(),
                            media_type="application/json")
        return Response(png, media_type="image/png",
                        headers={CLASS_PIXELS_HEADER: json.dumps(counts, separators=(",", ":"))})


def attach(app, model: Any) -> None:
    """Give MLflow's FastAPI `app` POST /segment, answered by `model` (a serving.SegmentationModel).
    Attached before the metrics (serving_metrics.attach), which then count it from outside."""
    from starlette.responses import Response

    async def answered_outside(request) -> Response:
        # never called: _SegmentRoute answers every POST first; the route is here so that the
        # router answers the other methods 405 (Allow: POST), as for /invocations
        raise RuntimeError(f"POST {PATH} reached MLflow's app: segment_route._SegmentRoute is not attached")

    app.add_route(PATH, answered_outside, methods=["POST"], include_in_schema=False)
    app.add_middleware(_SegmentRoute, model=model)
