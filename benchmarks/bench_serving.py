"""Load figure for the served model: bounded request loops against `mlflow models serve` on
loopback, for the fp32 checkpoint and an int8 ONNX model, with the bare model latency measured in
the same run.

    python benchmarks/bench_serving.py [--profile demo] [--checkpoint PATH.pt] [--int8 PATH | --make-int8]
                                       [--models fp32 int8] [--format png|jpeg] [--requests 50]
                                       [--concurrency 1 4] [--height 512 --width 1024]

Each model is registered in a temporary MLflow registry (pre-processing base_size = --height, so
the network runs at the stated size), served with the documented command on 127.0.0.1 (1 worker),
and sent --requests requests of one --width x --height PNG (or JPEG) street scene at each concurrency.
Prints p50/p95 latency, images/s, and served p50 / bare, where "bare" is the network's own
forward pass on the pre-processed tensor (no decode, no PNG, no HTTP), measured before and after
the served loops; the in-process request path stage by stage; and "work": MLflow's scoring
function on one request in this process with the network replaced by its result, i.e. all that the
server adds except the HTTP transport, without the forward pass's run-to-run noise (a machine with
a faster forward keeps the 1.1x when work + HTTP stays under 0.1x its forward). Target for int8:
served p50 <= 1.1x the bare forward (SERVED_TARGET), judged at concurrency 1 on the per-request
ratios' bootstrap interval: met only when the whole interval is below it.
Metrics overhead: each model is also served twice at once, with GET /metrics and its counting
(deploy/serving_metrics.py, the default) and without (SEGSTUDY_METRICS=0), and sent --overhead-requests
requests to each in turn (the order alternating every round, one request at a time), so both see the
same moments of the machine: the served p50 of each and their ratio (target: at most 1.05x), and
the median of the per-round ratios.
The int8 model is notebook 05's (outputs/<profile>/05_quantization/*int8*.onnx) when it exists,
--int8 PATH to name one (.onnx or OpenVINO .xml), or --make-int8 to export and statically quantize (ONNX Runtime QDQ,
per-channel int8 weights, uint8 activations, MinMax) the checkpoint in a temporary folder.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segstudy.config_profiles import load_config
from segstudy.data.synthetic.scene import render
from segstudy.deploy import inference, registry, segment_route
from segstudy.deploy.serving import answer, serve_command, serve_env
from segstudy.engine import measure
from segstudy.errors import UserError
from segstudy.models.checkpoint import model_format
from segstudy.studies import results_files, verdicts
from segstudy.tracking import mlflow_uri

ROUTES = {"segment": segment_route.PATH, "invocations": "/invocations"}  # the server's two routes that segment
SERVED_TARGET = 1.1  # served p50 / bare forward, at concurrency 1 (issue 37)


def deployed_int8(cfg) -> Path | None:
    """Notebook 05's deployed int8 form (results.json "deployed_int8": ONNX Runtime's or OpenVINO's), if written."""
    try:
        d, _, _ = results_files.read(cfg, "quantization")
    except UserError:
        return None
    name = ((d or {}).get("deployed_int8") or {}).get("variant")
    path = d.get("variants", {}).get(name, {}).get("path") if name else None
    return Path(path) if path and Path(path).is_file() else None


def scenes(height: int, width: int, n: int = 4) -> list[Image.Image]:
    return [Image.fromarray(render(height, width, seed=1234, split="val", index=i)[0]) for i in range(n)]


def make_int8(checkpoint: Path, images: list[Image.Image], base_size: int, out_dir: Path) -> Path:
    """Export the checkpoint to ONNX (dynamic H/W) and quantize it statically with ONNX Runtime."""
    import onnxruntime.quantization as oq
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from segstudy.models.checkpoint import load_trained

    model = load_trained(checkpoint)

    class Logits(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)["out"]

    batches = [inference.preprocess(np.asarray(im), base_size) for im in images]
    fp32, pre, int8 = out_dir / "fp32.onnx", out_dir / "pre.onnx", out_dir / "int8.onnx"
    torch.onnx.export(Logits(model).eval(), (batches[0],), str(fp32), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {2: "height", 3: "width"}, "logits": {2: "height", 3: "width"}})
    quant_pre_process(str(fp32), str(pre))

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"image": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.it, None)

    # Resize (the final bilinear upsampling of logits) stays float
    oq.quantize_static(str(pre), str(int8), Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                       weight_type=oq.QuantType.QInt8, activation_type=oq.QuantType.QUInt8,
                       op_types_to_quantize=["Conv", "Add", "Relu", "MaxPool", "Concat", "ConvTranspose"],
                       calibrate_method=oq.CalibrationMethod.MinMax)
    return int8


def forward_ms(engine: inference.Engine, x: torch.Tensor, iters: int, warmup: bool = True) -> list[float]:
    """Times (ms) of the network's own forward pass on a pre-processed tensor: the bare model."""
    if warmup:
        engine.run(x)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        engine.run(x)
        times.append(1000 * (time.perf_counter() - t))
    return times


def request_stages(engine: inference.Engine, payload: str, base_size: int, iters: int) -> dict[str, float]:
    """Median ms of each stage of the served path, run in this process on one base64 request image:
    what the server adds besides HTTP, JSON and MLflow's DataFrame handling. "segment" is
    inference.segment: pre-processing, the forward pass and the argmax (all inside the engine where it
    takes them: OpenVINO, for an image at the network's size)."""
    stages: dict[str, list[float]] = {"decode": [], "segment": [], "answer": [], "total": []}
    for i in range(iters + 1):
        t0 = time.perf_counter()
        image = inference.decode_base64_image(payload)
        t1 = time.perf_counter()
        train_ids = inference.segment(engine, image, base_size)
        t2 = time.perf_counter()
        answer(train_ids)
        t3 = time.perf_counter()
        if i:  # the first pass warms up
            for name, (a, b) in zip(stages, [(t0, t1), (t1, t2), (t2, t3), (t0, t3)]):
                stages[name].append(1000 * (b - a))
    return {name: statistics.median(v) for name, v in stages.items()}


def server_work_ms(uri: str, requests: dict[str, bytes], engine: inference.Engine, image: np.ndarray,
                   base_size: int, iters: int) -> dict[str, float]:
    """Median ms, per route, of the server's handling of one request in this process with the network
    replaced by its result: MLflow's scoring function for /invocations (JSON, DataFrame, decode, pre-
    and post-processing, the answer's JSON), the model's segment_file for /segment. What the server
    does per request besides the forward pass and the HTTP transport, free of the forward's
    run-to-run noise, so it can be compared across machines and against the budget."""
    from mlflow.pyfunc import load_model, scoring_server

    model = load_model(uri)
    served = model.unwrap_python_model().engine
    logits = engine.run(inference.preprocess(image, base_size))
    served.run = lambda _: logits
    if served.image_classes is not None:  # the whole path inside the engine
        ids = inference.segment(engine, image, base_size)
        served.image_classes = lambda _: ids
    schema = model.metadata.get_input_schema()

    def invocations() -> None:
        scored = scoring_server.invocations(requests["invocations"], "application/json", model, schema)
        assert scored.status == 200, scored.response[:500]

    calls = {"invocations": invocations, "segment": lambda: model.unwrap_python_model().segment_file(
        requests["segment"])}
    times: dict[str, list[float]] = {route: [] for route in requests}
    for i in range(iters + 1):
        for route in requests:
            t = time.perf_counter()
            calls[route]()
            if i:  # the first pass warms up
                times[route].append(1000 * (time.perf_counter() - t))
    return {route: statistics.median(v) for route, v in times.items()}


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def post(url: str, body: bytes, content_type: str = "application/json") -> float:
    t = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - t


def serve(uri: str, tracking_uri: str, port: int, log: Path, metrics: bool = True) -> subprocess.Popen:
    env = serve_env(tracking_uri) | ({} if metrics else {"SEGSTUDY_METRICS": "0"})
    with open(log, "w") as fh:
        proc = subprocess.Popen(serve_command(uri, port=port), env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    sys.exit("server did not answer /ping within 180 s")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the group this script started (mlflow + its uvicorn)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_ticks(server_session: int) -> dict[int, int]:
    """utime + stime (clock ticks) of every process but this script and its server's session:
    the load average counts our own threads, this shows what others used meanwhile."""
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        pid = int(stat.parent.name)
        if pid != os.getpid() and int(fields[3]) != server_session:  # fields[3] is the session id
            ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def metrics_overhead(uri: str, tracking_uri: str, bodies: list[bytes], requests: int, tmp: Path) -> dict:
    """Served latency (ms) with metrics on and off: two servers of the same model, the requests
    interleaved (on, off, then off, on, ...) so that both sides share every slow or fast moment."""
    procs = {}
    try:
        for on in (True, False):
            port = free_port()
            procs[on] = (serve(uri, tracking_uri, port, tmp / f"overhead-{on}.log", metrics=on),
                         f"http://127.0.0.1:{port}/invocations")
        with urllib.request.urlopen(procs[True][1].replace("/invocations", "/metrics"), timeout=30) as r:
            assert b"segstudy_requests_total" in r.read()  # the metrics side does count
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(requests + 2):
            body = bodies[i % len(bodies)]
            for on in ((True, False) if i % 2 else (False, True)):
                t = post(procs[on][1], body)
                if i >= 2:  # two rounds warm both up
                    times[on].append(1000 * t)
    finally:
        for proc, _ in procs.values():
            stop(proc)
    p50 = {on: float(np.percentile(v, 50)) for on, v in times.items()}
    ratios = [a / b for a, b in zip(times[True], times[False])]
    return {"on": p50[True], "off": p50[False], "ratio": p50[True] / p50[False],
            "round_ratio": statistics.median(ratios)}


def served_loops(url: str, requests: dict[str, tuple[list[bytes], str]], concurrency: list[int], n: int,
                 proc: subprocess.Popen, bare: Callable[[], float]) -> list[dict]:
    """`n` requests per route and concurrency: their p50, p95, images/s, the others' CPU, and at
    concurrency 1 the bare forward timed in this process before each request (the server idle
    meanwhile), so that both see the same moments of the machine ("bare" and the per-round ratio)."""
    for route, (bodies, content_type) in requests.items():
        for body in bodies[:2]:
            post(url + ROUTES[route], body, content_type)  # warm-up
    served = []
    for conc in concurrency:
        for route, (bodies, content_type) in requests.items():
            before, start, forward = cpu_ticks(proc.pid), time.perf_counter(), []
            if conc == 1:
                lat = []
                for i in range(n):
                    forward.append(bare())
                    lat.append(1000 * post(url + ROUTES[route], bodies[i % len(bodies)], content_type))
            else:
                with ThreadPoolExecutor(conc) as pool:
                    lat = [1000 * t for t in pool.map(post, [url + ROUTES[route]] * n,
                                                      [bodies[i % len(bodies)] for i in range(n)], [content_type] * n)]
            wall = time.perf_counter() - start
            served.append({"route": route, "conc": conc, "p50": float(np.percentile(lat, 50)), "times": lat,
                           "p95": float(np.percentile(lat, 95)), "ips": n / (wall - sum(forward) / 1000),
                           "others": others_pct(before, cpu_ticks(proc.pid), wall), "bare": forward,
                           "rounds": statistics.median(a / b for a, b in zip(lat, forward)) if forward else None})
    return served


def against_target(label: str, row: dict) -> str:
    """The served/bare target judged on one concurrency-1 loop: the median of each request's latency
    over the bare forward just before it, with its bootstrap interval (verdicts.speedup, paired), and
    verdicts.threshold's rule: met when the whole interval is below SERVED_TARGET."""
    ratio = verdicts.speedup(row["bare"], row["times"], paired=True)  # served time / bare time
    answer = verdicts.threshold("served p50 over the bare forward", ratio, SERVED_TARGET).answer
    verdict = {"no": "met", "yes": "not met"}.get(answer, f"{verdicts.NOT_DISTINGUISHABLE}: the interval contains it")
    return (f"target {label} {ROUTES[row['route']]}: served / bare {ratio.mean:.3f}x [{ratio.low:.3f}, "
            f"{ratio.high:.3f}] ({ratio.how}) against <= {SERVED_TARGET}x: {verdict}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def others_pct(before: dict[int, int], after: dict[int, int], wall: float) -> float:
    return 100 * sum(t - before.get(pid, 0) for pid, t in after.items()) / os.sysconf("SC_CLK_TCK") / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", "--params", dest="params", default="demo",
                   metavar="NAME", help="profile (params/) or YAML file whose models are served (default: demo)")
    p.add_argument("--checkpoint", help="fp32 checkpoint (default outputs/<profile>/runs/custom/checkpoint_best.pt)")
    p.add_argument("--int8", help="int8 model, .onnx or OpenVINO .xml (default: notebook 05's deployed int8 form)")
    p.add_argument("--make-int8", action="store_true", help="quantize the checkpoint here when no --int8 is given")
    p.add_argument("--models", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    p.add_argument("--format", choices=["png", "jpeg"], default="png", help="request image format (JPEG quality 90)")
    p.add_argument("--routes", nargs="+", choices=list(ROUTES), default=list(ROUTES),
                   help="POST /segment (the image file as the body) and/or /invocations (base64 in MLflow's JSON)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--iters", type=int, default=10, help="repetitions of the bare and in-process measurements")
    p.add_argument("--overhead-requests", type=int, default=40,
                   help="requests to each of the two servers (metrics on, off) for the metrics overhead; 0: skip")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server it started
    cfg = load_config(args.params)
    info = measure.cpu_info()
    print(measure.cpu_line(info))
    load1 = os.getloadavg()[0]
    print(f"load average (1 min) at start: {load1:.2f}" + ("  (machine busy: figures are not reliable)"
                                                           if load1 > 1.5 else ""))
    images = scenes(args.height, args.width)
    payloads = [base64.b64encode(encode(im, args.format.upper())).decode() for im in images]
    bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b]]}}).encode() for b in payloads]
    requests = {"segment": ([base64.b64decode(b) for b in payloads], f"image/{args.format}"),
                "invocations": (bodies, "application/json")}
    requests = {route: requests[route] for route in args.routes}
    checkpoint = Path(args.checkpoint or cfg.output_dir / "runs" / "custom" / "checkpoint_best.pt")
    models = [("fp32 torch", checkpoint)] if "fp32" in args.models else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = deployed_int8(cfg)
        if "int8" in args.models:
            if args.int8 or found:
                path = Path(args.int8) if args.int8 else found
                models.append((f"int8 {model_format(path)}", path))
            elif args.make_int8:
                t = time.perf_counter()
                models.append(("int8 onnx", make_int8(checkpoint, images, args.height, tmp)))
                print(f"quantized {checkpoint} to int8 ONNX in {time.perf_counter() - t:.0f} s")
            else:
                print("no int8 model (notebook 05 not run): give --int8 PATH or --make-int8")
        # the drift reference each registration stores: 8 val images at the bench size are enough here
        reg_cfg = load_config(args.params, {"output_root": str(tmp), "tracking.backend": "mlflow",
                                            "tracking.uri": "", "monitoring.reference_images": 8,
                                            "monitoring.window": 4})
        print(f"input {args.width}x{args.height} {args.format.upper()} ({len(payloads[0]) * 3 / 4e6:.2f} MB, "
              f"{len(bodies[0]) / 1e6:.2f} MB as JSON), model run at base_size {args.height}; {args.requests} "
              f"requests per concurrency and route, 1 server worker")
        print("bare: the network's forward pass alone (logits): at concurrency 1 timed in this process before each"
              " request (the server idle\nmeanwhile), else before and after the served loops (median of both);"
              " rounds: the median of each request's\nlatency over the bare forward just before it;"
              "\nin-proc: the served request path in this process (decode, segment: pre-processing, network"
              " and argmax, answer);\nwork: the server's handling of one request in this process with the forward"
              " replaced by its result\n(everything the server adds but HTTP); added: served p50 - bare; others: CPU"
              " used by other processes meanwhile (% of one core)\n")
        header = (f"{'model':11s} {'route':12s} {'bare ms':>7s} {'in-proc ms':>10s} {'work ms':>7s} {'conc':>4s} "
                  f"{'p50 ms':>8s} {'p95 ms':>8s} {'img/s':>6s} {'added ms':>8s} {'p50/bare':>8s} {'rounds':>8s} "
                  f"{'others':>7s}")
        rows, overhead, judged = [], [], []
        for label, path in models:
            engine = inference.load_engine(path)
            x = inference.preprocess(inference.decode_base64_image(payloads[0]), args.height)
            before, start = cpu_ticks(-1), time.perf_counter()
            bare = forward_ms(engine, x, args.iters)
            stages = request_stages(engine, payloads[0], args.height, args.iters)
            print(f"{label}: bare forward {statistics.median(bare):.1f} ms; in-process request "
                  f"{stages['total']:.1f} ms = " + " + ".join(f"{k} {v:.1f}" for k, v in stages.items() if k != "total")
                  + f" (others {others_pct(before, cpu_ticks(-1), time.perf_counter() - start):.0f}%)", flush=True)
            name = "bench-" + label.replace(" ", "-")
            uri = registry.register(reg_cfg, path, name, base_size=args.height)["uri"]
            work = server_work_ms(uri, {route: sent[0] for route, (sent, _) in requests.items()}, engine,
                                  inference.decode_base64_image(payloads[0]), args.height, args.iters)
            print(f"{label}: the server's own work per request (in this process, the forward replaced by its "
                  f"result, no HTTP) " + ", ".join(f"{ROUTES[route]} {ms:.1f} ms" for route, ms in work.items()),
                  flush=True)
            port = free_port()
            proc = serve(uri, mlflow_uri(reg_cfg.tracking, reg_cfg.output_root), port, tmp / f"{name}.log")
            try:
                served = served_loops(f"http://127.0.0.1:{port}", requests, args.concurrency, args.requests, proc,
                                      functools.partial(lambda e, t: forward_ms(e, t, 1, warmup=False)[0], engine, x))
            finally:
                stop(proc)
            after = forward_ms(engine, x, args.iters)  # the machine may have drifted meanwhile
            print(f"{label}: bare forward after the served loops {statistics.median(after):.1f} ms", flush=True)
            if args.overhead_requests:
                oh = metrics_overhead(uri, mlflow_uri(reg_cfg.tracking, reg_cfg.output_root), bodies,
                                      args.overhead_requests, tmp)
                overhead.append(f"{label:11s} {oh['on']:12.1f} {oh['off']:13.1f} {oh['ratio']:8.3f}x "
                                f"{oh['round_ratio']:14.3f}x")
                print(f"{label}: served p50 with metrics {oh['on']:.1f} ms, without {oh['off']:.1f} ms: "
                      f"{oh['ratio']:.3f}x (target <= 1.05x)", flush=True)
            judged += [against_target(label, row) for row in served if row["bare"] and "int8" in label]
            for row in served:
                b = statistics.median(row["bare"] or bare + after)
                rounds = f"{row['rounds']:7.2f}x" if row["rounds"] else f"{'':8s}"
                rows.append(f"{label:11s} {ROUTES[row['route']]:12s} {b:7.1f} {stages['total']:10.1f} "
                            f"{work[row['route']]:7.1f} {row['conc']:4d} {row['p50']:8.1f} {row['p95']:8.1f} "
                            f"{row['ips']:6.2f} {row['p50'] - b:8.1f} {row['p50'] / b:7.2f}x {rounds} "
                            f"{row['others']:6.0f}%")
        print("\n" + header + "\n" + "\n".join(rows))
        print("\n".join([""] + judged))
        if overhead:
            print(f"\nmetrics on/off, {args.overhead_requests} requests each, interleaved, concurrency 1\n"
                  f"{'model':11s} {'p50 on ms':>12s} {'p50 off ms':>13s} {'on/off':>9s} {'median round':>15s}\n"
                  + "\n".join(overhead))
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
