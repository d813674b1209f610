"""Peak host memory of int8 calibration (ONNX Runtime and torch FX) at 1 and at N images.

    python benchmarks/bench_calibration.py [--height 1024 --width 2048] [--images 16] [--threads N]
                                           [--engines ort fx] [--before [--batch 8]]

Each (engine, image count) runs in a fresh process of its own, so its peak resident memory
(VmHWM) is that configuration's alone; the parent prints the CPU, its ISA flags, the thread
count, each peak, the process's peak before calibration starts (imports, model, ONNX file) and
the N/1 ratio per engine (PASS when <= 1.3: calibration memory does not grow with the images).
The model is the custom model as the full profile builds it (output stride 8, head 512, aux
head), with random weights; the images are random tensors at height x width, each made when
calibration asks for it, so the inputs' own 25 MB each at 2048x1024 are not what is measured.
ORT calibrates with onnx_export.quantize_int8 (full's quant.ort_activation), FX with
quantize.fx_ptq (full's quant.observer).

`--before` measures what notebook 05 ran before issue 34 instead: ORT's quantize_static with one
data reader over all the images stacked in batches of --batch (default: full's data.batch_size),
and the FX observers fed those batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from segstudy.compress import onnx_export, quantize
from segstudy.config import Config
from segstudy.config_profiles import load_config
from segstudy.data.labels import NUM_CLASSES
from segstudy.engine import measure
from segstudy.models.networks import build_model

ENGINES = ("ort", "fx")
RATIO_LIMIT = 1.3


def full_profile() -> Config:
    """The full profile's model and quant settings; its dataset roots are not used here."""
    return load_config("full", {"data.root": "/unused", "cross.bdd100k.root": "/unused",
                                "cross.nuimages.root": "/unused"})


def full_model(cfg: Config) -> torch.nn.Module:
    torch.manual_seed(0)
    mc = dataclasses.asdict(cfg.model) | {"pretrained": False}
    return build_model(num_classes=NUM_CLASSES, **mc).eval()


class RandomImages(Sequence[torch.Tensor]):
    """n random (3, height, width) images, image i made from seed i whenever it is asked for."""

    def __init__(self, n: int, height: int, width: int, first: int = 0):
        self.n, self.height, self.width, self.first = n, height, width, first

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, _ = i.indices(self.n)
            return RandomImages(max(0, stop - start), self.height, self.width, self.first + start)
        if not -self.n <= i < self.n:
            raise IndexError(i)
        seed = self.first + i % self.n
        return torch.randn(3, self.height, self.width, generator=torch.Generator().manual_seed(seed))


def peak_gb() -> float:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space.
    Not ru_maxrss: Linux carries the parent's resident size at fork over exec into that."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # no /proc: an upper bound


def ort_before(fp32_path: Path, out: Path, images: Sequence[torch.Tensor], batch: int, activation: str) -> None:
    """notebook 05's ORT calibration before issue 34: quantize_static and its own calibrator over
    one reader of every batch, the batches stacked in advance."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name("preprocessed.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
    quantize_static(str(pre), str(out), onnx_export._Reader(quantize.batched(images, batch), "image"),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                    op_types_to_quantize=onnx_export.INT8_OPS, calibrate_method=CalibrationMethod.MinMax)


def fx_before(model: torch.nn.Module, images: Sequence[torch.Tensor], batch: int, observer: str) -> None:
    """notebook 05's FX calibration before issue 34: the observers fed batches of `batch` images."""
    example = images[0][None]
    prepared, _ = quantize.fx_prepare(model, example, observer)
    with torch.inference_mode():
        for b in quantize.batched(images, batch):
            prepared(b)
    quantize.fx_convert(prepared, example)


def child(engine: str, n: int, args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process: calibrate on n images, report the peak."""
    cfg, threads = full_profile(), quantize.set_threads(args.threads)
    images = RandomImages(n, args.height, args.width)
    batch = args.batch or cfg.data.batch_size
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Path(tmp) / "int8.onnx"
        model = None if engine == "ort" else full_model(cfg)
        setup, start = peak_gb(), time.perf_counter()
        if engine == "ort" and args.before:
            ort_before(Path(args.onnx), out, images, batch, cfg.quant.ort_activation)
        elif engine == "ort":
            onnx_export.quantize_int8(args.onnx, out, images, cfg.quant.ort_activation)
        elif args.before:
            fx_before(model, images, batch, cfg.quant.observer)
        else:
            quantize.fx_ptq(model, images, [n], observer=cfg.quant.observer)
        seconds = time.perf_counter() - start
    return {"engine": engine, "images": n, "peak_gb": peak_gb(), "setup_gb": setup, "seconds": seconds,
            "threads": threads}


def run_child(engine: str, n: int, args: argparse.Namespace, onnx_path: Path) -> dict:
    argv = [sys.executable, __file__, "--child", engine, str(n), "--onnx", str(onnx_path),
            "--height", str(args.height), "--width", str(args.width), "--threads", str(args.threads)]
    if args.before:
        argv += ["--before", "--batch", str(args.batch or full_profile().data.batch_size)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:  # e.g. killed for memory (-9): say so and go on with the others
        print(f"  {engine} at {n} images failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        return {"engine": engine, "images": n, "failed": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--images", type=int, default=16, help="the N compared with 1 image")
    p.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0: torch's default)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--before", action="store_true", help="the calibration notebook 05 ran before issue 34")
    p.add_argument("--batch", type=int, default=0, help="--before's batch size (default: full's data.batch_size)")
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return

    threads = quantize.set_threads(args.threads)
    info = measure.cpu_info()
    print(measure.cpu_line(info, threads))
    cfg = full_profile()
    what = (f"before issue 34 (quantize_static / FX at batch {args.batch or cfg.data.batch_size})" if args.before
            else "onnx_export.quantize_int8 / quantize.fx_ptq (one image at a time)")
    print(f"torch {torch.__version__}, onnxruntime {onnx_export.ort.__version__}; custom model as full builds it "
          f"(output stride {cfg.model.output_stride}, head {cfg.model.head_channels}, random weights); "
          f"{args.width}x{args.height}; {what}; one fresh process per row", flush=True)
    counts = (1, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = onnx_export.export(full_model(cfg), Path(tmp) / "custom_fp32.onnx",
                                       torch.zeros(1, 3, args.height, args.width))
        rows = {}
        for engine in args.engines:
            for n in counts:
                rows[engine, n] = row = run_child(engine, n, args, onnx_path)
                if "failed" not in row:
                    print(f"  {engine} {n:3d} images: peak {row['peak_gb']:6.2f} GB (before calibration "
                          f"{row['setup_gb']:5.2f} GB), {row['seconds']:7.1f} s", flush=True)
    print(f"\n{'engine':8s} {'peak at 1 (GB)':>15s} {f'peak at {args.images} (GB)':>17s} {'ratio':>7s}  "
          f"<= {RATIO_LIMIT}")
    for engine in args.engines:
        one, many = rows[engine, 1], rows[engine, args.images]
        if "failed" in one or "failed" in many:
            print(f"{engine:8s} a run failed (see above)")
            continue
        ratio = many["peak_gb"] / one["peak_gb"]
        print(f"{engine:8s} {one['peak_gb']:15.2f} {many['peak_gb']:17.2f} {ratio:7.2f}  "
              f"{'PASS' if ratio <= RATIO_LIMIT else 'FAIL'}")


if __name__ == "__main__":
    main()
