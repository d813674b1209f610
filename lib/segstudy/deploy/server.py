"""The scoring server with metrics: MLflow's own app plus GET /metrics, on one port.

    python -m segstudy.deploy.server -m models:/segstudy-custom@champion -h 0.0.0.0 -p 8080 -w 2

does what `mlflow models serve -m URI --env-manager local` does (download the model, then exec
uvicorn with MLflow's command, scoring_server.get_cmd) with this module's `app` in place of
`mlflow.pyfunc.scoring_server.app:app`. In every uvicorn worker, `app` loads the model and builds
MLflow's FastAPI app with `scoring_server.init` (the same /ping, /invocations, answers and request
timeout), then deploy/monitoring.py adds GET /metrics and the request counting to it. `segstudy
serve` and the serve image run this; plain `mlflow models serve` still serves the model, without
/metrics. With several workers, prometheus_client's multiprocess mode needs an empty folder
(PROMETHEUS_MULTIPROC_DIR): a fresh one is made unless it is set.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

APP = "segstudy.deploy.server:app"
MLFLOW_APP = "mlflow.pyfunc.scoring_server.app:app"


def build_app():
    """MLflow's scoring app for the model at $__pyfunc_model_path__, with /metrics unless
    SEGSTUDY_METRICS=0."""
    from mlflow.pyfunc import scoring_server

    from segstudy.deploy import monitoring

    model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
    app = scoring_server.init(model)
    if monitoring.enabled():
        monitoring.attach(app, model.unwrap_python_model())
    return app


def __getattr__(name: str):
    # built when uvicorn asks for it, in each worker; importing the module (the launcher) loads nothing
    if name == "app":
        globals()["app"] = build_app()
        return globals()["app"]
    raise AttributeError(name)


def command(model_uri: str, host: str, port: int, workers: int, timeout: int) -> tuple[list[str], dict[str, str]]:
    """(uvicorn command, environment): MLflow's own, serving APP."""
    from mlflow.pyfunc import scoring_server
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    local = _download_artifact_from_uri(model_uri)
    text, env = scoring_server.get_cmd(local, port, host, timeout, workers)
    cmd = shlex.split(text)
    if cmd[-1] != MLFLOW_APP:  # mlflow is locked (requirements.lock); a newer one may build it otherwise
        raise RuntimeError(f"unexpected MLflow scoring server command: {text}")
    cmd[0] = str(Path(sys.executable).parent / "uvicorn")
    cmd[-1] = APP
    if workers > 1 and not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="segstudy-metrics-")
    return cmd, env


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m segstudy.deploy.server", description=__doc__, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--help", action="help")
    p.add_argument("-m", "--model-uri", required=True, help="models:/NAME@ALIAS (MLFLOW_TRACKING_URI: its registry)")
    p.add_argument("-h", "--host", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=5001)
    p.add_argument("-w", "--workers", type=int, default=1)
    p.add_argument("-t", "--timeout", type=int, default=60, help="seconds per request (MLflow's)")
    args = p.parse_args(argv)
    cmd, env = command(args.model_uri, args.host, args.port, args.workers, args.timeout)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
