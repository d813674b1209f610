"""The registry (alias, metric tags, clear errors) and the real `mlflow models serve` on loopback."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from PIL import Image

from segstudy.cli import main
from segstudy.config_profiles import load_config
from segstudy.deploy import registry
from segstudy.deploy.serving import example_image
from segstudy.errors import UserError

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def registered(smoke_model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("registry")
    cfg = load_config("smoke", {"data.root": smoke_model["cfg"].data.root, "data.generate": False,
                                "output_root": str(out), "tracking.backend": "mlflow"})
    version = registry.register(cfg, smoke_model["checkpoint_best"], "segstudy-custom",
                                {"val_miou": smoke_model["best_miou"], "latency_ms": 12.5})
    return {"cfg": cfg, "version": version, "db": f"sqlite:///{out.resolve()}/mlflow.db"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: bytes | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _images(*payloads: str | bytes) -> bytes:
    rows = [[p if isinstance(p, str) else base64.b64encode(p).decode()] for p in payloads]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """The README's command, on a free loopback port; stopped (its whole process group) afterwards."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/segstudy-custom@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = os.environ | {"MLFLOW_TRACKING_URI": registered["db"], "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with running(cmd, env, log, port) as url:
        yield url


@contextlib.contextmanager
def running(cmd: list[str], env: dict, log: Path, port: int):
    """A server started by `cmd` (output in `log`), once it answers /ping on `port`; its whole process
    group is stopped afterwards (mlflow and segstudy serve exec uvicorn and its workers in children)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping answer in {START_TIMEOUT_S} s: {log.read_text()[-3000:]}"
            try:
                if _request(url + "/ping")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_registered_with_alias_and_metric_tags(registered, smoke_model):
    cfg, version = registered["cfg"], registered["version"]
    assert version["uri"] == "models:/segstudy-custom@champion"
    mv = registry.client(cfg).get_model_version_by_alias("segstudy-custom", "champion")
    assert str(mv.version) == version["version"]
    assert float(mv.tags["val_miou"]) == pytest.approx(smoke_model["best_miou"], rel=1e-5)
    assert mv.tags["format"] == "torch" and mv.tags["base_size"] == "64"
    assert registry.resolve(cfg, "models:/segstudy-custom@champion")["version"] == version["version"]
    run = mlflow.MlflowClient(registered["db"]).get_run(version["run_id"])
    assert run.data.tags["segstudy.commit"] and run.data.tags["segstudy.lock_sha256"]  # provenance tags


def test_the_logged_model_carries_its_code(registered):
    """Servable without this checkout: segstudy's code is logged with the model, not required from an index."""
    mlflow.set_tracking_uri(registered["db"])
    local = Path(mlflow.artifacts.download_artifacts("models:/segstudy-custom@champion"))
    assert (local / "code" / "segstudy" / "deploy" / "serving.py").is_file()
    requirements = (local / "requirements.txt").read_text()
    assert "segstudy" not in requirements and "torch==" in requirements and "cityscapesscripts==" in requirements
    assert "+" not in requirements  # torch==2.14.1, not a local build label (+cpu) that PyPI cannot install


def test_logged_requirements_drop_local_build_labels():
    from segstudy.deploy.serving import installable_version

    assert installable_version("2.14.1+cpu") == "2.14.1" == installable_version("2.14.1")


def test_the_request_example_is_logged_unless_turned_off(registered, smoke_model):
    """tracking.input_example: false (the rehearsal) logs no example, so MLflow serves nothing at
    registration; the version still loads and segments."""
    mlflow.set_tracking_uri(registered["db"])
    local = Path(mlflow.artifacts.download_artifacts("models:/segstudy-custom@champion"))
    assert (local / "serving_input_example.json").is_file()
    cfg = dataclasses.replace(registered["cfg"], tracking=dataclasses.replace(registered["cfg"].tracking,
                                                                              input_example=False))
    version = registry.register(cfg, smoke_model["checkpoint_best"], "segstudy-custom-noexample", alias=None)
    local = Path(mlflow.artifacts.download_artifacts(version["uri"]))
    assert not (local / "serving_input_example.json").exists() and (local / "MLmodel").is_file()
    image = np.array(Image.open(io.BytesIO(example_image())).convert("RGB"))
    assert registry.load(cfg, version["uri"]).segment(image).shape == image.shape[:2]


def test_registry_errors_name_the_uri_and_list_versions(registered, capsys):
    cfg = registered["cfg"]
    with pytest.raises(UserError, match=r"models:/segstudy-custom@prod: alias 'prod' is not set .* "
                                        r"segstudy-custom: versions 1 @champion"):
        registry.resolve(cfg, "models:/segstudy-custom@prod")
    with pytest.raises(UserError, match=r"models:/segstudy-unet@champion: no registered model 'segstudy-unet' "
                                        r".*registered: segstudy-custom: versions 1 @champion"):
        registry.resolve(cfg, "models:/segstudy-unet@champion")
    with pytest.raises(UserError, match="there is no version '7'"):
        registry.resolve(cfg, "models:/segstudy-custom/7")
    # segstudy serve checks before it starts anything
    sets = ["--set", "tracking.backend=mlflow", f"output_root={cfg.output_root}"]
    assert main(["serve", "--model", "models:/segstudy-custom@prod", "--profile", "smoke", *sets]) == 2
    assert "alias 'prod' is not set" in capsys.readouterr().err


def test_server_masks_equal_predict(server, registered, smoke_model, tiny_root, tmp_path):
    images = sorted((tiny_root / "leftImg8bit" / "val").rglob("*.png"))[:2]
    jpeg = io.BytesIO()
    Image.open(images[1]).convert("RGB").save(jpeg, format="JPEG", quality=95)
    jpeg_path = tmp_path / "in" / "jpegcity_000000_000001_leftImg8bit.jpg"
    jpeg_path.parent.mkdir()
    jpeg_path.write_bytes(jpeg.getvalue())
    status, answer = _request(server + "/invocations", _images(images[0].read_bytes(), jpeg.getvalue()))
    assert status == 200, answer
    preds = answer["predictions"]
    assert len(preds) == 2
    sets = ["--profile", "smoke", "--set", f"output_root={registered['cfg'].output_root}"]
    for model in (smoke_model["checkpoint_best"], "models:/segstudy-custom@champion"):
        out = tmp_path / model.replace("/", "_").replace(":", "")
        assert main(["predict", "--model", model, "--input", str(images[0]), str(jpeg_path), "--out", str(out),
                     *sets]) == 0
        expected = [out / f"{images[0].name[:-len('_leftImg8bit.png')]}_labelIds.png",
                    out / "jpegcity_000000_000001_labelIds.png"]
        for pred, path in zip(preds, expected):
            served = np.array(Image.open(io.BytesIO(base64.b64decode(pred["label_ids_png"]))))
            np.testing.assert_array_equal(served, np.array(Image.open(path)))
            assert (pred["height"], pred["width"]) == served.shape == (64, 128)
            assert sum(pred["class_pixels"].values()) == 64 * 128 and len(pred["class_pixels"]) == 19


def test_bad_requests_get_400_with_a_reason_and_the_server_keeps_answering(server, tiny_root):
    png = next((tiny_root / "leftImg8bit" / "val").rglob("*.png")).read_bytes()
    at = png.index(b"IDAT") + 100
    flipped = png[:at] + bytes([png[at] ^ 1]) + png[at + 1:]  # the chunk's checksum no longer matches
    big = io.BytesIO()
    Image.new("RGB", (4100, 2100)).save(big, format="PNG")  # 8.6 MP > the 8.4 MP limit; compresses to KBs
    strips = {}
    for width, height in ((1, 8_000_000), (16, 524_288)):  # under 8.4 MP, but pre-processing would scale them up
        strips[width] = io.BytesIO()
        Image.new("L", (width, height)).save(strips[width], format="PNG")
    cases = {
        "not an image": (_images(b"hello, not an image"), "image 0 is not an image"),
        "empty list": (_images(), "the request holds no images (an empty list)"),
        "truncated PNG": (_images(png, png[: len(png) // 2]), "image 1 is a truncated or corrupt PNG"),
        "corrupt PNG": (_images(flipped), "image 0 is a truncated or corrupt PNG"),
        "too large": (_images(big.getvalue()),
                      "image 0 is 4100x2100 (8,610,000 pixels), more than the limit of 8,388,608 (8.4 MP)"),
        "1x8000000": (_images(strips[1].getvalue()),
                      "image 0 is 1x8000000, an aspect ratio of 8,000,000:1 (longer to shorter side), more than "
                      "the limit of 8:1; send images of at most 8:1"),
        "16x524288": (_images(png, strips[16].getvalue()), "image 1 is 16x524288, an aspect ratio of 32,768:1"),
        "not base64": (_images("%%% not base64 %%%"), "image 0 is not valid base64"),
        "not JSON": (b'{"dataframe_split": ' + b"x" * 1_000_000, "Ensure that input is a valid JSON formatted string"),
        "wrong column": (json.dumps({"dataframe_split": {"columns": ["img"], "data": [["x"]]}}).encode(),
                         "missing inputs ['image']"),
        # MLflow's parser raised RecursionError / ValueError on these: a bare 500
        "nested too deeply": (b"[" * 100_000 + b"]" * 100_000,
                              "the request body could not be read as application/json (RecursionError: maximum "
                              "recursion depth exceeded"),
        "a 5000-digit integer": (b'{"dataframe_split": {"columns": ["image"], "data": [[' + b"1" * 5000 + b"]]}}",
                                 "(ValueError: Exceeds the limit (4300 digits) for integer string conversion: value "
                                 "has 5000 digits); send {\"dataframe_split\""),
    }
    for what, (body, reason) in cases.items():
        status, answer = _request(server + "/invocations", body)
        assert 400 <= status < 500, (what, status, answer)
        assert reason in answer["message"], (what, answer)
        assert "stack_trace" not in answer and "Traceback" not in answer["message"], (what, answer)
        assert len(answer["message"]) < 5000, (what, len(answer["message"]))  # a 1 MB body is not quoted whole
        assert _request(server + "/ping")[0] == 200
    status, answer = _request(server + "/invocations", _images(png))
    assert status == 200 and len(answer["predictions"]) == 1


def test_an_internal_error_is_one_line_without_a_stack_trace(registered, caplog):
    """MLflow's own scoring function, in-process, with a network that fails: the server answers
    `serialize_as_json()` of what it raises (scoring_server._async_catch_mlflow_exception)."""
    mlflow.set_tracking_uri(registered["db"])
    pyfunc = mlflow.pyfunc.load_model("models:/segstudy-custom@champion")
    model = pyfunc.unwrap_python_model()

    def fail(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the network broke")

    model.engine = dataclasses.replace(model.engine, run=fail)
    with pytest.raises(MlflowException) as info:
        scoring_server.invocations(_images(example_image()), "application/json", pyfunc,
                                   pyfunc.metadata.get_input_schema())
    body = info.value.serialize_as_json()
    assert info.value.get_http_status_code() == 500
    assert "internal error while segmenting (RuntimeError); the server's log has the details" in body
    assert "stack_trace" not in body and "Traceback" not in body and "the network broke" not in body
    assert "RuntimeError: the network broke" in caplog.text  # the traceback goes to the server's log


def test_a_failure_after_the_model_answered_is_the_servers_500(registered, monkeypatch, caplog):
    """The guard that makes a body MLflow cannot parse a 400 leaves the server's own failures 500."""
    mlflow.set_tracking_uri(registered["db"])
    pyfunc = mlflow.pyfunc.load_model("models:/segstudy-custom@champion")  # installs the guard

    def broken(*args, **kwargs):
        raise TypeError("cannot serialize")

    monkeypatch.setattr(scoring_server, "predictions_to_json", broken)
    with pytest.raises(MlflowException) as info:
        scoring_server.invocations(_images(example_image()), "application/json", pyfunc,
                                   pyfunc.metadata.get_input_schema())
    assert info.value.get_http_status_code() == 500
    assert "internal error while answering (TypeError); the server's log has the details" in info.value.message
    assert "TypeError: cannot serialize" in caplog.text


def _typed_stop_recipe() -> tuple[str, str]:
    """docs/serving.md's two lines that start `segstudy serve` in the background and stop it."""
    lines = (Path(__file__).parents[1] / "docs" / "serving.md").read_text().splitlines()
    start = next(line for line in lines if line.startswith("segstudy serve ") and line.endswith("& SERVER=$!"))
    return start, next(line for line in lines if line.startswith("kill $SERVER"))


def _session_processes(sid: int) -> list[int]:
    """The PIDs of the processes still running in session `sid` (not zombies: an orphan's exit status
    waits for PID 1 to reap it)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
    return alive


@pytest.mark.parametrize("job_control, workers", [("set -m", 2), ("set +m", 1)])
def test_the_documented_background_server_stops_with_kill(registered, tmp_path, job_control, workers):
    """The stop recipe of docs/serving.md as typed, in an interactive-like shell (job control on) with
    the workers' supervisor and in a script (off) with uvicorn alone: the server, its workers and its
    metrics folder are gone once `wait` returns."""
    start, stop = _typed_stop_recipe()
    cfg, port = registered["cfg"], _free_port()
    ours = (f"--profile smoke --set tracking.backend=mlflow output_root={cfg.output_root} data.root={cfg.data.root} "
            f"data.generate=false --port {port} --workers {workers}")
    assert "--profile demo --port 5001" in start
    typed = start.replace("--profile demo --port 5001", ours)
    script = f"{job_control}\n{typed}\necho SERVER=$SERVER\nread go\n{stop}\n"
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    shell = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        server = int(next(line for line in shell.stdout if line.startswith("SERVER="))[len("SERVER="):])
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert shell.poll() is None, f"the shell ended first: {shell.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping answer on port {port} in {START_TIMEOUT_S} s"
            with contextlib.suppress(OSError):
                if _request(f"http://127.0.0.1:{port}/ping")[0] == 200:
                    break
            time.sleep(0.5)
        shell.stdin.write("go\n")
        shell.stdin.flush()
        said = shell.communicate(timeout=60)[0]  # uvicorn re-raises SIGTERM once stopped: wait says 143
        assert "Finished server process" in said, said[-3000:]  # its graceful stop, not a kill
        assert not Path(f"/proc/{server}").exists() and _session_processes(shell.pid) == []
        assert not list(tmp_path.glob("segstudy-metrics-*"))  # the supervisor's private folder, removed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
