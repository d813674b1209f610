"""POST /segment: one image file in, its Cityscapes labelIds PNG out, beside MLflow's /invocations
on the scoring server of deploy/server.py (`segstudy serve`, the serve image).

    curl --data-binary @frame.png http://HOST:PORT/segment -o frame_labelIds.png -D -

Request: the PNG or JPEG file itself as the body. Its format is read from its bytes, as `segstudy
predict` reads a file, so any Content-Type will do (curl's default included).
Answer 200: the labelIds PNG (image/png), the same pixels /invocations and `segstudy predict` give,
with its pixels per class as JSON in the header `Segstudy-Class-Pixels`.
Errors: the JSON of /invocations ({"error_code": ..., "message": "<one line>"}), 400 for what is
wrong with the image, 500 for the server's own failure, and MLflow's 504 past its request timeout
(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, deploy/request_timeout.py); the metrics count both routes alike.

It is /invocations without base64 both ways and without MLflow's JSON and DataFrame handling: the
request path for clients that send one camera frame at a time (docs/serving.md has the figures).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mlflow.exceptions import MlflowException

PATH = "/segment"
CLASS_PIXELS_HEADER = "Segstudy-Class-Pixels"


def attach(app, model: Any) -> None:
    """Give MLflow's FastAPI `app` POST /segment, answered by `model` (a serving.SegmentationModel)."""
    from starlette.requests import Request
    from starlette.responses import Response

    async def segment(request: Request) -> Response:  # a plain Starlette route, as GET /metrics
        data = await request.body()
        try:  # in a thread, as MLflow runs /invocations: the event loop keeps answering /ping
            png, counts = await asyncio.to_thread(model.segment_file, data)
        except MlflowException as exc:
            return Response(exc.serialize_as_json(), status_code=exc.get_http_status_code(),
                            media_type="application/json")
        return Response(png, media_type="image/png",
                        headers={CLASS_PIXELS_HEADER: json.dumps(counts, separators=(",", ":"))})

    app.add_route(PATH, segment, methods=["POST"], include_in_schema=False)
