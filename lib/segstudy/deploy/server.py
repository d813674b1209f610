"""The scoring server: MLflow's own app plus GET /metrics and POST /segment, on one port.

    python -m segstudy.deploy.server -m models:/segstudy-custom@champion -h 0.0.0.0 -p 8080 -w 2

does what `mlflow models serve -m URI --env-manager local` does (download the model, then exec
uvicorn with MLflow's command, scoring_server.get_cmd) with this module's `app` in place of
`mlflow.pyfunc.scoring_server.app:app`. In every uvicorn worker, `app` loads the model and builds
MLflow's FastAPI app with `scoring_server.init` (the same /ping, /invocations and answers; its request
timeout as plain ASGI, deploy/request_timeout.py), then deploy/segment_route.py adds POST /segment (an
image file in, its labelIds PNG out) and deploy/serving_metrics.py GET /metrics and the request
counting. `segstudy serve` and the serve image run this; plain `mlflow models serve` still serves the
model's /invocations, without the two.
With several workers, prometheus_client's multiprocess mode needs a folder (PROMETHEUS_MULTIPROC_DIR)
holding only this server's files: a private one is made unless it is set, and removed when the
server ends; a folder given is checked at start (files of processes that are gone removed, a running
process's refused) and cleared of this server's files at the end. For that a small process (this
module without mlflow, `supervise`) runs uvicorn and outlives it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from segstudy.errors import UserError
from segstudy.files import process_alive

MODULE = "segstudy.deploy.server"
APP = f"{MODULE}:app"
MLFLOW_APP = "mlflow.pyfunc.scoring_server.app:app"
PROG = "python -m segstudy.deploy.server"
MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"
PRIVATE_PREFIX = "segstudy-metrics-"  # + the server's PID + "-": a folder whose server is gone can be told
SUPERVISE = "--supervise"  # main's internal mode: run uvicorn, then clean its metrics folder
# prometheus_client's multiprocess files: one per metric type and process, the writer's PID in the name
METRICS_FILE = re.compile(r"^(?:counter|histogram|summary|gauge_[a-z]+)_(?P<pid>\d+)\.db$")


def build_app():
    """MLflow's scoring app for the model at $__pyfunc_model_path__, with POST /segment, and /metrics
    unless SEGSTUDY_METRICS=0."""
    from mlflow.pyfunc import scoring_server

    from segstudy.deploy import request_timeout, segment_route, serving, serving_metrics

    model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
    # the model's own file (serving_model.py) applies these too, but as it was when the version was logged
    serving.bound_json_errors()
    serving.refuse_unreadable_bodies()
    app = scoring_server.init(model)
    request_timeout.replace_mlflows(app)
    segment_route.attach(app, model.unwrap_python_model())
    if serving_metrics.enabled():
        serving_metrics.attach(app, model.unwrap_python_model())
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
    if env.get(MULTIPROC):
        check_metrics_folder(Path(env[MULTIPROC]))
    elif workers > 1:
        remove_gone_private_folders()
        env[MULTIPROC] = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-")
    return cmd, env


def _writers(folder: Path) -> dict[Path, int]:
    """Each metrics file in `folder` and the PID of the process that wrote it; anything else is refused."""
    writers = {}
    for path in sorted(folder.iterdir()):
        match = METRICS_FILE.match(path.name)
        if match is None:
            raise UserError(f"{MULTIPROC}={folder} holds {path.name}, which is not a prometheus_client metrics "
                            f"file; give the server an empty folder of its own, or unset {MULTIPROC} (a private "
                            f"one is made)")
        writers[path] = int(match["pid"])
    return writers


def _gone_and_running(folder: Path) -> tuple[list[Path], dict[Path, int]]:
    """(the metrics files in `folder` whose writer is gone, {file: PID} of those whose writer runs).
    This process's own PID counts as gone: it writes no metrics (its uvicorn children do), and in a
    restarted container the server is PID 1 again."""
    gone, running = [], {}
    for path, pid in _writers(folder).items():
        if pid != os.getpid() and process_alive(pid):
            running[path] = pid
        else:
            gone.append(path)
    return gone, running


def check_metrics_folder(folder: Path) -> None:
    """A folder given as PROMETHEUS_MULTIPROC_DIR, made ready to count this server's requests only: the
    files of processes that are gone (a server stopped or killed earlier) would be added to its counts,
    so they are removed; a running process's mean another server shares it, which is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    gone, running = _gone_and_running(folder)
    if running:
        path, pid = next(iter(running.items()))
        raise UserError(f"{MULTIPROC}={folder} holds the metrics of running process {pid} ({path.name}): "
                        f"another server uses that folder, and this one's /metrics would add up both; give "
                        f"this server an empty folder of its own, or unset {MULTIPROC} (a private one is made)")
    for path in gone:
        path.unlink(missing_ok=True)
    if gone:
        print(f"[segstudy] {MULTIPROC}={folder}: removed {len(gone)} metrics files of processes that are gone "
              f"(they would have been counted again)", flush=True)


def remove_gone_private_folders() -> None:
    """The private metrics folders of servers that are gone (killed before they could remove them)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PRIVATE_PREFIX}*-*"):
        pid = folder.name[len(PRIVATE_PREFIX):].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def supervise(folder: Path, private: bool, cmd: list[str]) -> int:
    """Run the server `cmd` until it ends, passing it the signals that stop it; then remove its metrics
    folder (private) or the files its processes left there (a folder given). Returns its exit status."""
    children: list[subprocess.Popen] = []

    def stop(signum, frame) -> None:
        # SIGTERM is uvicorn's graceful stop; a terminal's Ctrl-C reaches uvicorn too, and a second
        # SIGINT would make it force-exit
        for child in children:
            child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # before the start: no signal is missed
        signal.signal(sig, stop)
    children.append(subprocess.Popen(cmd))
    try:
        code = children[0].wait()
    finally:
        if private:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for path in _gone_and_running(folder)[0]:
                path.unlink(missing_ok=True)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SUPERVISE]:  # FOLDER private|given -- COMMAND...
        sys.exit(supervise(Path(argv[1]), argv[2] == "private", argv[4:]))
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--help", action="help")
    p.add_argument("-m", "--model-uri", required=True, help="models:/NAME@ALIAS (MLFLOW_TRACKING_URI: its registry)")
    p.add_argument("-h", "--host", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=5001)
    p.add_argument("-w", "--workers", type=int, default=1)
    p.add_argument("-t", "--timeout", type=int, default=60, help="seconds per request (MLflow's)")
    args = p.parse_args(argv)
    try:
        cmd, env = command(args.model_uri, args.host, args.port, args.workers, args.timeout)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(cmd), flush=True)
    if not env.get(MULTIPROC):
        os.execve(cmd[0], cmd, env)
    # the supervisor is this module in a fresh interpreter: it does not keep this one's mlflow in memory
    private = "private" if env[MULTIPROC] != os.environ.get(MULTIPROC) else "given"
    os.execve(sys.executable, [sys.executable, "-m", MODULE, SUPERVISE, env[MULTIPROC], private, "--", *cmd],
              env)


if __name__ == "__main__":
    main()
