"""Monitoring the served model: the real server (`segstudy serve`, two workers) on loopback answers
GET /metrics with counts, histograms and class shares that add up; a failing metric never fails a
request; the drift score stays under its threshold in-domain and crosses it on a shifted domain;
`segstudy monitor` scores a folder and a request log; the feedback sample keeps its cap."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.middleware.base import BaseHTTPMiddleware

from segstudy.cli import main
from segstudy.data import labels
from segstudy.data.synthetic.scene import render
from segstudy.deploy import drift, inference, request_timeout, segment_route, server, serving, serving_metrics
from segstudy.deploy.serving import example_image
from tests.test_serving import _free_port, _images, _request, registered, running  # noqa: F401

WORKERS = 2


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _scrape(url: str) -> dict[str, list]:
    """Every sample of GET /metrics, parsed by prometheus_client's parser: name -> [(labels, value)]."""
    status, text = _request(url + "/metrics")
    assert status == 200, text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _settled(url: str, requests: float, timeout: float = 10.0) -> dict[str, list]:
    """GET /metrics once `requests` requests are counted: the middleware counts a request after its
    answer has gone out, so a scrape right after the answer may come before the count (on the other
    worker too)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _scrape(url)
        if _one(samples, "segstudy_requests_total") >= requests or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def _one(samples: dict[str, list], name: str, **labels) -> float:
    found = [v for lab, v in samples[name] if labels.items() <= lab.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def _stale_metrics(folder: Path, requests: int) -> None:
    """What a server stopped earlier leaves in its metrics folder: `requests` counted by a process that is gone."""
    code = ("from prometheus_client import Counter\n"
            f"Counter('segstudy_requests', 'POST /invocations and /segment requests answered').inc({requests})")
    subprocess.run([sys.executable, "-c", code], env=os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(folder)},
                   check=True)


@pytest.fixture(scope="module")
def served(registered, tmp_path_factory):  # noqa: F811
    """`segstudy serve` with two workers on a free loopback port, their metrics in one folder, given to it
    holding the counts of a server that is gone (which must not be counted)."""
    cfg, port = registered["cfg"], _free_port()
    tmp = tmp_path_factory.mktemp("monitored")
    log, multiproc = tmp / "server.log", tmp / "prometheus"
    multiproc.mkdir()
    _stale_metrics(multiproc, 5)
    cmd = [sys.executable, "-m", "segstudy", "serve", "--model", "models:/segstudy-custom@champion", "--profile",
           "smoke", "--set", "tracking.backend=mlflow", f"output_root={cfg.output_root}",
           f"data.root={cfg.data.root}", "data.generate=false", "--port", str(port), "--workers", str(WORKERS)]
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    with running(cmd, env, log, port) as url:
        yield {"url": url, "multiproc": multiproc, "log": log}


def test_metrics_count_good_and_bad_requests_across_workers(served, registered, tiny_root):  # noqa: F811
    url = served["url"]
    vals = sorted((tiny_root / "leftImg8bit" / "val").rglob("*.png"))
    good = [_images(vals[i % len(vals)].read_bytes()) for i in range(5)]
    good.append(_images(*(p.read_bytes() for p in vals[:3])))
    big = io.BytesIO()
    Image.new("RGB", (4100, 2100)).save(big, format="PNG")  # over the pixel limit
    bad = {"not_an_image": [_images(b"hello"), _images("%%% not base64 %%%")], "too_large": [_images(big.getvalue())],
           "bad_request": [b'{"dataframe_split": ', _images()]}  # not JSON (refused by MLflow), no image
    for body in good:
        assert _request(url + "/invocations", body)[0] == 200
    for kind, bodies in bad.items():
        for body in bodies:
            assert _request(url + "/invocations", body)[0] == 400, kind
    n_good, n_bad, n_images = len(good), sum(map(len, bad.values())), 5 + 3
    m = _settled(url, n_good + n_bad)
    assert _one(m, "segstudy_requests_total") == n_good + n_bad
    for kind in serving_metrics.ERROR_KINDS:
        assert _one(m, "segstudy_request_errors_total", kind=kind) == len(bad.get(kind, [])), kind
    assert _one(m, "segstudy_images_total") == n_images
    # histograms: the counts add up, the buckets grow to +Inf = count
    for name, labels_, count in [("segstudy_request_seconds", {}, n_good + n_bad),
                                 ("segstudy_image_megapixels", {}, n_images)] + [
                                    ("segstudy_stage_seconds", {"stage": s}, n_images) for s in serving_metrics.STAGES]:
        assert _one(m, f"{name}_count", **labels_) == count, name
        buckets = sorted((float(lab["le"]), v) for lab, v in m[f"{name}_bucket"] if labels_.items() <= lab.items())
        values = [v for _, v in buckets]
        assert values == sorted(values) and buckets[-1] == (float("inf"), count), name
    shares = {lab["class"]: v for lab, v in m["segstudy_predicted_class_share"]}
    assert set(shares) == set(labels.CLASS_NAMES) and sum(shares.values()) == pytest.approx(1.0)
    pixels = sum(v for _, v in m["segstudy_predicted_pixels_total"])
    assert pixels == n_images * 64 * 128
    # the drift reference came with the model: the threshold is its, each worker scores its windows
    mlflow.set_tracking_uri(registered["db"])
    reference = mlflow.pyfunc.load_model("models:/segstudy-custom@champion").unwrap_python_model().reference
    assert _one(m, "segstudy_drift_threshold") == pytest.approx(min(reference.threshold, 1e9))
    assert _one(m, "segstudy_drift_windows_total") >= 1 and 0 <= _one(m, "segstudy_drift_score") <= 1
    assert {lab["feature"] for lab, _ in m["segstudy_drift_distance"]} == set(drift.FEATURES)
    # two workers, one set of counts: both wrote to the multiprocess folder
    pids = {p.stem.rsplit("_", 1)[-1] for p in served["multiproc"].glob("*.db")}
    assert len(pids) == WORKERS, sorted(served["multiproc"].iterdir())


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """POST /invocations with exactly these headers (urllib would add a Content-Type)."""
    status, _, content = _post_to(url, "/invocations", body, headers)
    return status, content.decode()


def _post_to(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a POST to `path` with exactly these headers."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def test_segment_takes_the_file_and_answers_the_mask_of_invocations(served, tiny_root):
    """POST /segment: the PNG or JPEG file itself as the body, whatever its Content-Type; the labelIds
    PNG back, the same pixels and class counts as /invocations gives; what is no image a 400 saying
    where base64 goes; every request counted as /invocations' are."""
    url, before = served["url"], _scrape(served["url"])
    png = sorted((tiny_root / "leftImg8bit" / "val").rglob("*.png"))[0].read_bytes()
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png)).save(jpeg, format="JPEG", quality=90)
    status, answer = _request(url + "/invocations", _images(png, jpeg.getvalue()))
    assert status == 200, answer
    sent = [(png, "image/png"), (jpeg.getvalue(), "application/x-www-form-urlencoded")]  # curl's default type
    for (body, content_type), pred in zip(sent, answer["predictions"]):
        status, headers, content = _post_to(url, segment_route.PATH, body, {"Content-Type": content_type})
        assert status == 200 and headers["content-type"] == "image/png", (status, content[:300])
        mask = np.array(Image.open(io.BytesIO(content)))
        np.testing.assert_array_equal(mask, np.array(Image.open(io.BytesIO(base64.b64decode(pred["label_ids_png"])))))
        assert json.loads(headers[segment_route.CLASS_PIXELS_HEADER.lower()]) == pred["class_pixels"]
    mistakes = [(_images(png), "application/json", f"the request body is not an image ({len(_images(png))} bytes "
                                                   f"that are neither PNG nor JPEG){serving.BODY_ADVICE}"),
                (b"", "image/png", f"the request body is empty; send PNG or JPEG bytes{serving.BODY_ADVICE}")]
    for body, content_type, message in mistakes:
        status, headers, content = _post_to(url, segment_route.PATH, body, {"Content-Type": content_type})
        assert status == 400 and json.loads(content)["message"] == message, (status, content[:500])
    after = _settled(url, _one(before, "segstudy_requests_total") + 1 + len(sent) + len(mistakes))
    for name, added in (("segstudy_requests_total", 1 + len(sent) + len(mistakes)), ("segstudy_images_total", 4)):
        assert _one(after, name) - _one(before, name) == added, name
    assert (_one(after, "segstudy_request_errors_total", kind="not_an_image")
            - _one(before, "segstudy_request_errors_total", kind="not_an_image")) == len(mistakes)


def test_segment_as_its_docstring_types_it_with_curl(served, tiny_root, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed: the command of segment_route's docstring cannot be run as typed")
    frame = sorted((tiny_root / "leftImg8bit" / "val").rglob("*.png"))[0]
    shutil.copy(frame, tmp_path / "frame.png")
    typed = next(line.strip() for line in segment_route.__doc__.splitlines() if line.strip().startswith("curl "))
    command = typed.replace("http://HOST:PORT", served["url"])
    done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and " 200 " in done.stdout.splitlines()[0], (done.stdout, done.stderr)
    assert segment_route.CLASS_PIXELS_HEADER.lower() in done.stdout.lower()
    status, answer = _request(served["url"] + "/invocations", _images(frame.read_bytes()))
    expected = np.array(Image.open(io.BytesIO(base64.b64decode(answer["predictions"][0]["label_ids_png"]))))
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "frame_labelIds.png")), expected)


def test_client_mistakes_are_4xx_and_not_counted_as_internal(served):
    """A request without a Content-Type and bodies MLflow's parser raises other errors on were bare
    500s, counted kind="internal" (what the server-error alert fires on)."""
    url, before = served["url"], _scrape(served["url"])
    mistakes = [(b"{}", {}, "the request has no Content-Type header; send Content-Type: application/json"),
                (b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}, "RecursionError"),
                (b'{"inputs": [' + b"9" * 5000 + b"]}", {"Content-Type": "application/json"}, "4300 digits")]
    for body, headers, reason in mistakes:
        status, text = _post(url, body, headers)
        assert 400 <= status < 500 and reason in text, (headers, status, text[:500])
        assert _request(url + "/ping")[0] == 200
    after = _settled(url, _one(before, "segstudy_requests_total") + len(mistakes))
    for kind, added in (("internal", 0), ("bad_request", len(mistakes))):
        assert (_one(after, "segstudy_request_errors_total", kind=kind)
                - _one(before, "segstudy_request_errors_total", kind=kind)) == added, kind


def test_a_metrics_folder_another_server_uses_is_refused(registered, tmp_path, monkeypatch, capsys):  # noqa: F811
    cfg = registered["cfg"]
    argv = ["serve", "--model", "models:/segstudy-custom@champion", "--profile", "smoke", "--set",
            "tracking.backend=mlflow", f"output_root={cfg.output_root}", "--workers", "2"]
    folder = tmp_path / "prometheus"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))

    def started(*args):  # were the check to let it through, `serve` would replace pytest with the server
        raise AssertionError(f"the server was started: {args[1]}")

    monkeypatch.setattr(os, "execve", started)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / f"counter_{alive.pid}.db").write_bytes(b"")
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"holds the metrics of running process {alive.pid} (counter_{alive.pid}.db)" in err
        assert "give this server an empty folder of its own, or unset PROMETHEUS_MULTIPROC_DIR" in err
    finally:
        alive.kill()
        alive.wait()
    (folder / f"counter_{alive.pid}.db").unlink()
    (folder / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert "holds notes.txt, which is not a prometheus_client metrics file" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("private", [True, False])
def test_the_metrics_folder_is_cleaned_when_the_server_stops(tmp_path, private):
    """The server's supervisor (what `python -m segstudy.deploy.server` runs uvicorn under when it has a
    metrics folder) with a stand-in for uvicorn that writes a worker's metrics and waits to be stopped."""
    folder = tmp_path / ("segstudy-metrics-1-x" if private else "given")
    folder.mkdir()
    worker = ("import signal, sys, time\nfrom prometheus_client import Counter\n"
              "Counter('segstudy_requests', 'requests').inc()\n"
              "def stop(*args):\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, stop)\nprint('serving', flush=True)\ntime.sleep(60)")
    cmd = [sys.executable, "-m", server.MODULE, server.SUPERVISE, str(folder), "private" if private else "given",
           "--", sys.executable, "-c", worker]
    proc = subprocess.Popen(cmd, env=os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(folder)}, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "serving"
    assert len(list(folder.glob("counter_*.db"))) == 1
    os.killpg(proc.pid, signal.SIGTERM)  # what the tests' running() and a container's stop send
    assert proc.wait(timeout=30) == 0
    assert not folder.exists() if private else list(folder.iterdir()) == []


def test_several_workers_get_a_fresh_metrics_folder(registered, monkeypatch):  # noqa: F811
    """The server's command is MLflow's own (scoring_server.get_cmd) with segstudy's app."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["db"])
    cmd, env = server.command("models:/segstudy-custom@champion", "127.0.0.1", 5001, 1, 60)
    assert cmd[-1] == server.APP and "--port" in cmd and "PROMETHEUS_MULTIPROC_DIR" not in env
    cmd, env = server.command("models:/segstudy-custom@champion", "127.0.0.1", 5001, 3, 60)
    assert cmd[cmd.index("--workers") + 1] == "3"
    folder = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    assert folder.is_dir() and not any(folder.iterdir())
    folder.rmdir()


def test_a_failing_metric_is_logged_and_the_request_answered(registered, caplog, monkeypatch):  # noqa: F811
    """The server's app in-process (deploy/server.py: MLflow's app with the metrics attached)."""
    client, metrics = _in_process_app(registered, monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("the metrics store broke")

    metrics.images.inc = broken
    answer = client.post("/invocations", content=_images(example_image()), headers={"Content-Type": "application/json"})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
    assert "segstudy metrics: segmented failed" in caplog.text and "the metrics store broke" in caplog.text
    scraped = client.get("/metrics")
    assert scraped.status_code == 200 and "segstudy_requests_total 1.0" in scraped.text


def _in_process_app(registered, monkeypatch):  # noqa: F811
    """(TestClient, ServingMetrics) of deploy/server.py's app."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    mlflow.set_tracking_uri(registered["db"])
    monkeypatch.setenv(scoring_server._SERVER_MODEL_PATH,
                       mlflow.artifacts.download_artifacts("models:/segstudy-custom@champion"))
    app = server.build_app()
    metrics = next(m for m in app.user_middleware if m.cls is serving_metrics._CountRequests).kwargs["metrics"]
    return TestClient(app), metrics


def test_the_request_timeout_is_mlflows_504_on_both_routes(registered, monkeypatch):  # noqa: F811
    """MLflow's timeout middleware is replaced by plain ASGI (deploy/request_timeout.py): past
    MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT a request is still MLflow's 504, counted as a timeout, and the
    server answers the next one."""
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "1")
    client, metrics = _in_process_app(registered, monkeypatch)
    assert not [m for m in client.app.user_middleware if m.cls is BaseHTTPMiddleware]
    with pytest.MonkeyPatch.context() as slow:
        for method in ("segment_file", "_predict"):  # requests that outlast the timeout
            slow.setattr(serving.SegmentationModel, method, lambda self, data: time.sleep(1.5))
        late = [client.post(segment_route.PATH, content=example_image()),
                client.post("/invocations", content=_images(example_image()),
                            headers={"Content-Type": "application/json"})]
    assert [(a.status_code, a.text) for a in late] == [(504, request_timeout.TIMED_OUT)] * 2
    assert metrics.errors.labels("timeout")._value.get() == 2
    assert client.post(segment_route.PATH, content=example_image()).status_code == 200
    assert client.get(segment_route.PATH).status_code == 405


def test_an_mlflow_without_its_timeout_middleware_is_refused_by_name():
    from fastapi import FastAPI

    with pytest.raises(RuntimeError, match=f"no {request_timeout.MLFLOWS} to replace.*requirements.lock"):
        request_timeout.replace_mlflows(FastAPI())


def test_monitoring_runs_after_the_answer_is_sent_and_before_the_request_is_counted():
    """The per-image metrics and drift window (serving_metrics.after_answer) add nothing to a client's
    latency, and a scrape that sees a request counted sees its images."""
    import asyncio

    events: list[str] = []
    metrics = serving_metrics.ServingMetrics()
    metrics.request_done = lambda status, kind, seconds: events.append(f"counted {status}")

    async def answer(scope, receive, send):
        serving_metrics.after_answer(lambda: events.append("monitored"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ids"})

    async def sent(message):
        events.append(message["type"])

    counted = serving_metrics._CountRequests(answer, metrics)
    asyncio.run(counted({"type": "http", "path": segment_route.PATH}, None, sent))
    assert events == ["http.response.start", "http.response.body", "monitored", "counted 200"]
    serving_metrics.after_answer(lambda: events.append("outside a request: at once"))
    assert events[-1] == "outside a request: at once"


def _scenes(seed: int, n: int, shift: bool = False) -> list[np.ndarray]:
    images = [render(64, 128, seed, "val", i)[0] for i in range(n)]
    if shift:  # night: dark, blue, noisy (the kind of change the BDD100K-layout domain brings)
        rng = np.random.default_rng(seed)
        images = [np.clip(im * np.array([0.6, 0.65, 0.9]) * 0.3 + rng.normal(0, 6, im.shape), 0, 255).astype(np.uint8)
                  for im in images]
    return images


def test_drift_stays_under_the_threshold_in_domain_and_crosses_it_when_shifted(smoke_model):
    engine = inference.load_engine(smoke_model["checkpoint_best"])

    def segment(image: np.ndarray) -> np.ndarray:
        return inference.segment(engine, image, 64)

    reference = drift.build_reference(drift.rows_of(_scenes(11, 24), segment), window=4, step=4, false_alarm=0.01,
                                      rounds=300)
    assert len(reference.calibration) == 300 and 0 < reference.threshold < 1
    rows = drift.rows_of(_scenes(12, 12), segment)
    in_domain = drift.score_windows(reference, rows)
    shifted = drift.score_windows(reference, drift.rows_of(_scenes(12, 8, shift=True), segment))
    assert len(in_domain) == 3 and len(shifted) == 2
    assert not any(w["alarm"] for w in in_domain), [w["score"] for w in in_domain]
    assert all(w["alarm"] for w in shifted), [w["score"] for w in shifted]
    # the server's window scores the same windows
    window = drift.DriftWindow(reference)
    scored = [window.add(row) for row in rows[:8]]
    assert [s is not None for s in scored] == [False, False, False, True] * 2
    assert scored[3][0] == pytest.approx(in_domain[0]["score"])
    loaded = drift.Reference.load(reference.save(Path(engine.path).parent / "reference.json"))
    assert loaded.threshold == reference.threshold and np.allclose(loaded.rows, reference.rows)


def test_js_distance_bounds():
    p, q = np.array([1.0, 0, 0]), np.array([0, 0.5, 0.5])
    assert drift.js_distance(p, p) == 0 and drift.js_distance(p, q) == pytest.approx(1.0)


def test_monitor_scores_a_folder_and_a_request_log(registered, tiny_root, tmp_path, capsys):  # noqa: F811
    cfg = registered["cfg"]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_scenes(12, 2) + _scenes(12, 2, shift=True)):
        (folder / f"{i:02d}_leftImg8bit.png").write_bytes(_png(image))
    (folder / "00_labelIds.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))  # a label file: not an input
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in sorted(folder.glob("*_leftImg8bit.png"))]
    log = tmp_path / "requests.jsonl"  # every form the server answers 200, then three it refuses
    log.write_text("\n".join([json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encoded[0]]]}}),
                              json.dumps({"dataframe_records": [{"image": encoded[1]}]}),
                              json.dumps({"instances": [encoded[2]]}), json.dumps({"inputs": {"image": [encoded[3]]}}),
                              '{"not": "a request"}', json.dumps({"inputs": ["%%% not base64"]}), "[" * 100_000])
                   + "\n")
    sets = ["--profile", "smoke", "--set", "tracking.backend=mlflow", f"output_root={cfg.output_root}",
            f"data.root={cfg.data.root}", "data.generate=false"]
    plot = tmp_path / "drift.png"
    assert main(["monitor", "--model", "models:/segstudy-custom@champion", "--input", str(folder), "--plot", str(plot),
                 *sets]) == 0
    out = capsys.readouterr().out
    assert "Jensen-Shannon distance" in out and "4 images, 2 windows" in out and plot.is_file()
    assert main(["monitor", "--model", "models:/segstudy-custom@champion", "--input", str(log), "--json", *sets]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 4 and len(result["windows"]) == 2
    assert [u["input"] for u in result["unreadable"]] == ["requests.jsonl:5", "requests.jsonl:6:0", "requests.jsonl:7"]
    assert "(RecursionError: maximum recursion depth exceeded" in result["unreadable"][2]["reason"]
    assert result["unreadable"][0]["reason"].startswith("not a request the server reads: The input must be a JSON "
                                                        "dictionary with exactly one of the input fields")
    assert result["unreadable"][1]["reason"].startswith("line 6 image 0 is not valid base64")
    # nothing readable: every input named with its reason, up to ten, then how many more; exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(['{"inputs": ["not base64!"]}'] * 12) + "\n")
    assert main(["monitor", "--model", "models:/segstudy-custom@champion", "--input", str(bad), *sets]) == 2
    err = capsys.readouterr().err
    assert "12 inputs unreadable, skipped:\n  bad.jsonl:1:0: line 1 image 0 is not valid base64" in err
    assert "  bad.jsonl:10:0: " in err and "bad.jsonl:11:0" not in err
    assert "  ... and 2 more (--json lists them all)" in err
    assert f"none of the 12 inputs in {bad} could be read (each named above with its reason)" in err


def test_feedback_sample_keeps_its_cap_across_workers(tmp_path):
    image = _scenes(1, 1)[0]
    ids = inference.segment(inference.Engine("torch", "x", lambda x: x[:, :1].repeat(1, 19, 1, 1)), image, 64)
    from segstudy.deploy.serving import encode

    row = encode(ids)
    first, second = (serving_metrics.Feedback(tmp_path, cap=3, rate=1.0, seed=0) for _ in range(2))
    kept = [first.offer(image, *row) for _ in range(2)] + [second.offer(image, *row) for _ in range(3)]
    assert sum(k is not None for k in kept) == 3
    assert len(list(tmp_path.glob("*_image.png"))) == len(list(tmp_path.glob("*_labelIds.png"))) == 3
    meta = json.loads((tmp_path / "000000.json").read_text())
    assert meta["height"] == 64 and sum(meta["class_pixels"].values()) == 64 * 128
    off = serving_metrics.Feedback(tmp_path / "off", cap=3, rate=0.0)
    assert off.offer(image, *row) is None and not list((tmp_path / "off").iterdir())


def test_notebook_07_on_smoke_and_its_report_section(tmp_path, tiny_root, smoke_model):
    """Notebook 02's model (copied: 07 never trains), the registry off (smoke): the reference is
    computed from the checkpoint; no cross dataset: the generator's BDD100K domain is the shift."""
    import shutil

    from segstudy.config_profiles import load_config
    from segstudy.notebook_runner import run_notebooks
    from segstudy.studies import monitoring as study

    overrides = {"data.root": str(tiny_root), "data.generate": False, "output_root": str(tmp_path / "out"),
                 "cross.bdd100k.root": "", "cross.nuimages.root": ""}
    shutil.copytree(smoke_model["run_dir"], tmp_path / "out" / "smoke" / "runs" / "custom")
    run_notebooks("smoke", overrides, only=["07"], progress=False)
    out = tmp_path / "out" / "smoke" / "07_monitoring"
    result = json.loads((out / "results.json").read_text())
    s = result["summary"]
    assert s["in_domain_windows"] == s["shifted_windows"] == 2 and len(result["windows"]) == 4
    assert "held-out val + 4 train" in s["in_domain"] and "bdd100k domain" in s["shifted"]
    assert s["statistic"].startswith("Jensen-Shannon") and (out / "drift.png").is_file()
    part = study.part(load_config("smoke", overrides))
    html = part._repr_html_()
    assert "False alarms:" in html and "drift.png" in html and not part.notes


def test_a_reference_too_small_to_calibrate_sets_no_threshold_and_says_so():
    """The rehearsal's single val image: no window can be held out, so no alarm, and the study says why."""
    from segstudy.studies import monitoring as study

    rows = np.full((3, drift.WIDTH), 0.1)
    reference = drift.build_reference(rows, window=2, step=2, false_alarm=0.05, rounds=10)
    assert reference.calibration == [] and reference.threshold == float("inf")
    assert not drift.score_windows(reference, list(rows) * 2)[0]["alarm"]
    summary = {"threshold": None, "in_domain_windows": 1, "shifted_windows": 1, "delay_windows": None}
    assert study.statement(summary).startswith("No threshold (too few reference images")
