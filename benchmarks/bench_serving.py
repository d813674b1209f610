"""Load figure for the served model: bounded request loops against `mlflow models serve` on
loopback, for the fp32 checkpoint and an int8 ONNX model, with the bare model latency measured in
the same run.

    python benchmarks/bench_serving.py [--params demo] [--checkpoint PATH.pt] [--onnx PATH.onnx | --make-int8]
                                       [--requests 50] [--concurrency 1 4] [--height 512 --width 1024]

Each model is registered in a temporary MLflow registry (pre-processing base_size = --height, so
the network runs at the stated size), served with the documented command on 127.0.0.1 (1 worker),
and sent --requests requests of one --width x --height PNG street scene at each concurrency.
Prints p50/p95 latency, images/s, and served p50 / bare p50, where "bare" is the network's own
forward pass on the pre-processed tensor (no decode, no PNG, no HTTP). Target for int8: <= 1.3x.
The int8 model is notebook 05's (outputs/<profile>/05_quantization/*int8*.onnx) when it exists,
--onnx PATH to name one, or --make-int8 to export and statically quantize (ONNX Runtime QDQ,
per-channel int8 weights, uint8 activations, MinMax) the checkpoint in a temporary folder.
"""

from __future__ import annotations

import argparse
import base64
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segstudy import inference, measure, registry
from segstudy.config import load_config
from segstudy.scene import render
from segstudy.serving import serve_command, serve_env
from segstudy.tracking import mlflow_uri


def scenes(height: int, width: int, n: int = 4) -> list[Image.Image]:
    return [Image.fromarray(render(height, width, seed=1234, split="val", index=i)[0]) for i in range(n)]


def make_int8(checkpoint: Path, images: list[Image.Image], base_size: int, out_dir: Path) -> Path:
    """Export the checkpoint to ONNX (dynamic H/W) and quantize it statically with ONNX Runtime."""
    import onnxruntime.quantization as oq
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from segstudy.models import load_trained

    model = load_trained(checkpoint)

    class Logits(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)["out"]

    batches = [inference.preprocess(im, base_size) for im in images]
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


def bare_ms(path: Path, image: Image.Image, base_size: int, iters: int) -> tuple[float, float]:
    """(median forward ms on the pre-processed tensor, median in-process request ms: base64
    decode + pre-processing + forward + post-processing + PNG + base64 encode)."""
    engine = inference.load_engine(path)
    x = inference.preprocess(image, base_size)
    for _ in range(2):
        engine.run(x)
    fwd = []
    for _ in range(iters):
        t = time.perf_counter()
        engine.run(x)
        fwd.append(time.perf_counter() - t)
    payload = base64.b64encode(png_bytes(image)).decode()
    full = []
    for _ in range(iters):
        t = time.perf_counter()
        ids = inference.segment(engine, inference.decode_base64_image(payload), base_size)
        base64.b64encode(inference.label_ids_png(ids))
        inference.class_pixels(ids)
        full.append(time.perf_counter() - t)
    return 1000 * statistics.median(fwd), 1000 * statistics.median(full)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, body: bytes) -> float:
    t = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - t


def serve(uri: str, tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        proc = subprocess.Popen(serve_command(uri, port=port), env=serve_env(tracking_uri), stdout=fh,
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="demo")
    p.add_argument("--checkpoint", help="fp32 checkpoint (default outputs/<profile>/runs/custom/checkpoint_best.pt)")
    p.add_argument("--onnx", help="int8 ONNX model (default: notebook 05's, if written)")
    p.add_argument("--make-int8", action="store_true", help="quantize the checkpoint here when no --onnx is given")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--iters", type=int, default=10, help="repetitions of the bare measurements")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server it started
    cfg = load_config(args.params)
    info = measure.cpu_info()
    print(f"CPU: {info['cpu']}  threads: {info['threads']}  " +
          "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in info.items() if k not in ("cpu", "threads")))
    load1 = os.getloadavg()[0]
    print(f"load average (1 min) at start: {load1:.2f}" + ("  (machine busy: figures are not reliable)"
                                                           if load1 > 1.5 else ""))
    images = scenes(args.height, args.width)
    bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png_bytes(im))
                                                                              .decode()]]}}).encode() for im in images]
    checkpoint = Path(args.checkpoint or cfg.output_dir / "runs" / "custom" / "checkpoint_best.pt")
    models = [("fp32 torch", checkpoint)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = sorted((cfg.output_dir / "05_quantization").glob("*int8*.onnx"))
        if args.onnx or found:
            models.append(("int8 onnx", Path(args.onnx) if args.onnx else found[0]))
        elif args.make_int8:
            t = time.perf_counter()
            models.append(("int8 onnx", make_int8(checkpoint, images, args.height, tmp)))
            print(f"quantized {checkpoint} to int8 ONNX in {time.perf_counter() - t:.0f} s")
        else:
            print("no int8 ONNX model (notebook 05 not run): give --onnx PATH or --make-int8")
        reg_cfg = load_config(args.params, {"output_root": str(tmp), "tracking.backend": "mlflow",
                                            "tracking.uri": ""})
        print("others: CPU used by other processes on this machine during that loop (% of one core)")
        print(f"input {args.width}x{args.height} PNG ({len(bodies[0]) / 1e6:.2f} MB as JSON), model run at "
              f"base_size {args.height}; {args.requests} requests per concurrency, 1 server worker\n")
        print(f"{'model':11s} {'bare ms':>8s} {'in-proc ms':>10s} {'conc':>4s} {'p50 ms':>8s} {'p95 ms':>8s} "
              f"{'img/s':>6s} {'p50/bare':>8s} {'others':>7s}")
        for label, path in models:
            before, start = cpu_ticks(-1), time.perf_counter()
            bare, inproc = bare_ms(path, images[0], args.height, args.iters)
            after, wall = cpu_ticks(-1), time.perf_counter() - start
            others = sum(t - before.get(pid, 0) for pid, t in after.items()) / os.sysconf("SC_CLK_TCK")
            print(f"{label}: bare forward {bare:.1f} ms, in-process request {inproc:.1f} ms "
                  f"(others {100 * others / wall:.0f}%)", flush=True)
            name = "bench-" + label.replace(" ", "-")
            uri = registry.register(reg_cfg, path, name, base_size=args.height)["uri"]
            port = free_port()
            proc = serve(uri, mlflow_uri(reg_cfg.tracking, reg_cfg.output_root), port, tmp / f"{name}.log")
            url = f"http://127.0.0.1:{port}/invocations"
            try:
                for body in bodies[:2]:
                    post(url, body)  # warm-up
                for conc in args.concurrency:
                    before, start = cpu_ticks(proc.pid), time.perf_counter()
                    with ThreadPoolExecutor(conc) as pool:
                        lat = list(pool.map(post, [url] * args.requests,
                                            [bodies[i % len(bodies)] for i in range(args.requests)]))
                    wall = time.perf_counter() - start
                    after = cpu_ticks(proc.pid)
                    others = sum(t - before.get(pid, 0) for pid, t in after.items()) / os.sysconf("SC_CLK_TCK")
                    p50, p95 = 1000 * np.percentile(lat, 50), 1000 * np.percentile(lat, 95)
                    print(f"{label:11s} {bare:8.1f} {inproc:10.1f} {conc:4d} {p50:8.1f} {p95:8.1f} "
                          f"{args.requests / wall:6.2f} {p50 / bare:7.2f}x {100 * others / wall:6.0f}%", flush=True)
            finally:
                stop(proc)
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
