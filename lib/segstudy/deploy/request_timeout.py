"""MLflow's request timeout, as plain ASGI middleware in place of MLflow's own.

MLflow's scoring app (`scoring_server.init`) bounds every request with a function middleware
(`@app.middleware("http")`: Starlette's BaseHTTPMiddleware) that answers 504 after
MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT seconds. BaseHTTPMiddleware passes the request body and the
answer through streams and tasks of its own, which cost the served int8 model 3-4 ms a request
(docs/serving.md). `replace_mlflows` swaps it, in the same place of the stack, for `Timeout`: the
same limit, the same 504 answer, with the app called directly.
"""

from __future__ import annotations

import asyncio

from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

TIMED_OUT = "Request processing time exceeded limit"  # MLflow's 504 body (scoring_server.init)
MLFLOWS = "timeout_middleware"  # the name of MLflow's function middleware (mlflow is locked: requirements.lock)


class Timeout:
    """Answer 504 (MLflow's body) when the app has not started its answer within `seconds`, and cancel
    it; as MLflow's, the limit ends when the answer starts (a slow client reading it is not cut off)."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = asyncio.Event()

        async def sending(message):
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        answer = asyncio.ensure_future(self.app(scope, receive, sending))  # the request's context, copied
        begun = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({answer, begun}, timeout=self.seconds, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server stopping: the answer goes with this request
            answer.cancel()
            raise
        finally:
            begun.cancel()
        if not (answer.done() or started.is_set()):
            answer.cancel()
            from starlette.responses import Response

            await Response(TIMED_OUT, status_code=504, media_type="application/json")(scope, receive, send)
            return
        await answer


def replace_mlflows(app) -> None:
    """Put `Timeout` where MLflow's scoring app has its timeout middleware (before the app starts)."""
    from starlette.middleware import Middleware

    for i, layer in enumerate(app.user_middleware):
        if getattr(layer.kwargs.get("dispatch"), "__name__", None) == MLFLOWS:
            app.user_middleware[i] = Middleware(Timeout, seconds=MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
            return
    raise RuntimeError(f"MLflow's scoring app has no {MLFLOWS} to replace: {app.user_middleware}; "
                       f"mlflow is locked (requirements.lock), a newer one builds its app otherwise")
