"""The quantization targets, measured side by side in one process on this machine.

    python benchmarks/bench_quantize.py [--profile demo] [--model custom] [--iters N] [--warmup N]
                                        [--threads N] [--height H --width W] [--calib N]

Batch-1 latency at the bench size (the profile's bench.height x bench.width, 512x1024 in demo) of the trained
model (outputs/<profile>/runs/<model>/checkpoint_best.pt; random weights when it is missing, which
does not change the speed): fp32 eager, fp32 channels_last, bf16 autocast + channels_last, ONNX
Runtime fp32, torch FX int8 (x86), ONNX Runtime static int8 QDQ with uint8 and with int8
activations, and the pruned model of notebook 04 (fp32 and int8) when it exists. Prints the CPU and
its ISA flags, the median per variant, the speed-up against fp32 eager, the ratio to the fastest int8
engine, and for each dense int8 form timed in turn with fp32 eager the target (>= 5x on VNNI/AMX
CPUs, >= 3x AVX2-only; within 1.2x of the fastest int8 engine) judged as notebook 05 judges it
(int8_choice.check_targets: yes | no | not distinguishable, on the intervals over the rounds).
Writes outputs/<profile>/benchmarks/quantize_<model>.json. On a CUDA machine it adds
fp32 / fp16 / bf16 GPU latency.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
from pathlib import Path

import torch

from segstudy.compress import onnx_export, openvino_int8, quantize
from segstudy.config_profiles import load_config
from segstudy.data.datasets import prepare_data
from segstudy.data.labels import NUM_CLASSES
from segstudy.engine import measure
from segstudy.models.checkpoint import load_trained
from segstudy.models.networks import build_model
from segstudy.studies import int8_choice, quantization, results_files, verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", "--params", dest="params", default="demo",
                   metavar="NAME", help="profile (params/) or YAML file: bench size, quant settings, the model")
    p.add_argument("--model", default="custom", help="custom | deeplabv3_resnet50 (the pruned rows are custom's)")
    p.add_argument("--height", type=int, help="default: bench.height")
    p.add_argument("--width", type=int, help="default: bench.width")
    p.add_argument("--warmup", type=int, help="default: bench.warmup")
    p.add_argument("--iters", type=int, help="default: bench.iters")
    p.add_argument("--threads", type=int, help="default: quant.threads")
    p.add_argument("--calib", type=int, help="calibration images, default: quant.calib_images")
    p.add_argument("--rounds", type=int, default=15,
                   help="rounds of fp32 eager and every int8 form timed in turn, for the paired ratios (default 15)")
    args = p.parse_args()
    cfg = load_config(args.params)
    h, w = args.height or cfg.bench.height, args.width or cfg.bench.width
    warmup, iters = args.warmup if args.warmup is not None else cfg.bench.warmup, args.iters or cfg.bench.iters
    n_calib = args.calib or cfg.quant.calib_images
    threads = quantize.set_threads(args.threads if args.threads is not None else cfg.quant.threads)
    info = measure.cpu_info()
    print(measure.cpu_line(info, threads))
    print(f"torch {torch.__version__} (quantized engine {quantize.BACKEND}), onnxruntime "
          f"{onnx_export.ort.__version__}; batch 1 at {w}x{h}, median of {iters} after {warmup} warm-up")

    prepare_data(cfg)
    ckpt = cfg.output_dir / "runs" / args.model / "checkpoint_best.pt"
    if ckpt.is_file():
        model, source = load_trained(ckpt), str(ckpt)
    else:
        mc = dataclasses.asdict(cfg.model) | {"name": args.model, "pretrained": False}
        model, source = build_model(num_classes=NUM_CLASSES, **mc).eval(), "random weights (no checkpoint)"
    calib = quantize.calibration_images(cfg, n_calib)
    print(f"model: {args.model} from {source}; calibration: {n_calib} training images")

    rows: dict[str, dict] = {}

    def torch_row(name: str, net, **kw) -> None:
        rows[name] = measure.latency(net, h, w, warmup=warmup, iters=iters, **kw)
        print(f"  measured {name:34s} {rows[name]['median_ms']:9.1f} ms", flush=True)

    def ort_row(name: str, path: Path) -> None:
        rows[name] = onnx_export.latency(onnx_export.session(path, threads), h, w, warmup, iters)
        print(f"  measured {name:34s} {rows[name]['median_ms']:9.1f} ms", flush=True)

    x = torch.randn(1, 3, h, w)
    feed = x.numpy()

    def ov_row(name: str, path: Path) -> None:
        module = openvino_int8.OvModule(openvino_int8.compiled(path, threads))
        rows[name] = openvino_int8.latency(module, h, w, warmup, iters)
        print(f"  measured {name:34s} {rows[name]['median_ms']:9.1f} ms", flush=True)

    def ort_runner(path: Path):
        sess = onnx_export.session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda: sess.run(None, {name: feed})

    def ov_runner(path: Path):
        module = openvino_int8.OvModule(openvino_int8.compiled(path, threads))
        return lambda: module.run(feed)

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        tmp = Path(tmp)
        torch_row("fp32 eager", model)
        torch_row("fp32 channels_last", copy.deepcopy(model), channels_last=True)
        torch_row("bf16 autocast + channels_last", copy.deepcopy(model), channels_last=True, dtype=torch.bfloat16)
        fp32_onnx = onnx_export.export(model, tmp / "fp32.onnx", calib[0][None])
        ort_row("ONNX Runtime fp32", fp32_onnx)
        int8_fx = quantize.fx_ptq(model, calib, [n_calib], cfg.quant.observer)["models"][n_calib]
        torch_row("int8 torch FX (x86)", int8_fx)
        for act in onnx_export.ACTIVATIONS:
            ort_row(f"int8 ONNX Runtime ({act} act.)",
                    onnx_export.quantize_int8(fp32_onnx, tmp / f"int8_{act}.onnx", calib, act))
        in_turn = {"fp32 eager": lambda: model(x), quantization.FX_INT8: lambda: int8_fx(x),
                   quantization.ORT_INT8: ort_runner(tmp / f"int8_{cfg.quant.ort_activation}.onnx")}
        ov_why = openvino_int8.unavailable()
        if ov_why:
            print(f"OpenVINO rows skipped: {ov_why}")
        else:
            ov_row(quantization.OV_INT8, openvino_int8.quantize_int8(fp32_onnx, tmp / "int8_ov.xml", calib))
            in_turn[quantization.OV_INT8] = ov_runner(tmp / "int8_ov.xml")
        pruned_path = quantization.pruned_checkpoint(cfg)
        if args.model != "custom":
            print("pruned rows: only for the custom model")
        elif pruned_path.is_file():
            pruned = load_trained(pruned_path)
            torch_row("pruned fp32", pruned)
            pruned_fx = quantize.fx_ptq(pruned, calib, [n_calib], cfg.quant.observer)["models"][n_calib]
            torch_row("pruned + int8 torch FX", pruned_fx)
            pruned_onnx = onnx_export.export(pruned, tmp / "pruned.onnx", calib[0][None])
            ort_row(quantization.PRUNED_ORT_INT8, onnx_export.quantize_int8(
                pruned_onnx, tmp / "pruned_int8.onnx", calib, cfg.quant.ort_activation))
            in_turn |= {quantization.PRUNED_INT8: lambda: pruned_fx(x),
                        quantization.PRUNED_ORT_INT8: ort_runner(tmp / "pruned_int8.onnx")}
            if not ov_why:
                ov_row(quantization.PRUNED_OV_INT8,
                       openvino_int8.quantize_int8(pruned_onnx, tmp / "pruned_int8_ov.xml", calib))
                in_turn[quantization.PRUNED_OV_INT8] = ov_runner(tmp / "pruned_int8_ov.xml")
        else:
            print(f"pruned rows skipped: no pruned model at {pruned_path} (notebook 04 writes it)")
        paired = paired_rounds(in_turn, warmup, args.rounds, f"{w}x{h}")

    dense_int8 = [k for k in rows if k.startswith("int8")]
    fp32_ms = rows["fp32 eager"]["median_ms"]
    fastest_int8 = min(rows[k]["median_ms"] for k in dense_int8)
    print(f"\n{'variant':42s} {'median ms':>10s} {'min ms':>9s} {'vs fp32 eager':>14s} {'/ fastest int8':>15s}")
    for name, r in rows.items():
        ratio = f"{r['median_ms'] / fastest_int8:14.2f}x" if "int8" in name else " " * 15
        print(f"{name:42s} {r['median_ms']:10.1f} {r['min_ms']:9.1f} {fp32_ms / r['median_ms']:13.2f}x {ratio}")
    # the targets on the rounds timed in turn, by notebook 05's rule (speed only: no mIoU here)
    targets = int8_choice.check_targets(info, paired, [k for k in results_files.INT8_VARIANTS if k in paired])
    for name, t in targets.items():
        print(f"target {name}: >= {t['speedup_target']:.0f}x fp32 eager ({t['speedup_interval']}) and within 1.2x "
              f"of the fastest int8 ({t['ratio_to_fastest_int8']:.2f}x): {t['met']}")
    fastest = min(rows, key=lambda k: rows[k]["median_ms"])
    print(f"fastest variant: {fastest}")
    gpu = gpu_rows(model, h, w, warmup, iters)
    deployed = int8_choice.deployed_int8(paired, quantization.SERVABLE_INT8, openvino=quantization.OV_INT8)
    if deployed and "time_vs_openvino" in deployed:
        low, high = deployed["time_vs_openvino_interval"]
        print(f"deployed int8 ({deployed['why']}): {deployed['variant']}, {deployed['time_vs_openvino']:.2f}x "
              f"OpenVINO int8's time [{low:.2f}, {high:.2f}] over {args.rounds} rounds in turn: "
              f"{'PASS' if deployed['time_vs_openvino'] <= 1.0 else 'FAIL'} (<= 1.0x)")

    out = cfg.output_dir / "benchmarks" / f"quantize_{args.model}.json"
    results_files.write_json(out, {"cpu": info, "threads": threads, "size": f"{w}x{h}", "warmup": warmup,
                                   "iters": iters, "model": args.model, "weights": source,
                                   "calibration_images": n_calib, "latency": rows, "targets": targets,
                                   "fastest": fastest, "gpu": gpu, "in_turn": paired, "deployed_int8": deployed})
    print("wrote", out)


def paired_rounds(runners: dict, warmup: int, rounds: int, size: str) -> dict[str, dict]:
    """fp32 eager and every int8 form timed in turn (one pass each per round); prints each one's speed-up
    over fp32 eager and its time against OpenVINO int8's, both the median of the per-round ratios with
    a bootstrap interval (verdicts.speedup, paired). Returns rows with "latency_times_ms" of the rounds."""
    timed = measure.timed_in_turn(runners, warmup, rounds, size=size)
    rows = {k: {"latency_ms": t["median_ms"], "latency_times_ms": t["times_ms"]} for k, t in timed.items()}
    ref, ov = rows["fp32 eager"]["latency_times_ms"], rows.get(quantization.OV_INT8, {}).get("latency_times_ms")
    print(f"\n{rounds} rounds in turn ({size}): median ms, speed-up vs fp32 eager, time / OpenVINO int8's [95%]")
    for name, r in rows.items():
        fast = verdicts.speedup(r["latency_times_ms"], ref, paired=True)
        vs = verdicts.speedup(ov, r["latency_times_ms"], paired=True) if ov else None
        against = f"{vs.mean:6.2f}x [{vs.low:.2f}, {vs.high:.2f}]" if vs else ""
        print(f"  {name:34s} {r['latency_ms']:9.1f} {fast.mean:7.2f}x [{fast.low:.2f}, {fast.high:.2f}]  {against}")
    return rows


def gpu_rows(model: torch.nn.Module, h: int, w: int, warmup: int, iters: int) -> dict:
    """fp32, fp16 and bf16 autocast (channels_last) batch-1 latency on a CUDA GPU, when there is one."""
    if not torch.cuda.is_available():
        print("GPU: none in this session (fp16/bf16 GPU rows skipped)")
        return {}
    name, rows = torch.cuda.get_device_name(), {}
    net = copy.deepcopy(model)
    rows["fp32"] = measure.latency(net, h, w, "cuda", warmup=warmup, iters=iters)["median_ms"]
    for label, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        rows[f"{label} autocast + channels_last"] = measure.latency(net, h, w, "cuda", warmup=warmup, iters=iters,
                                                                    channels_last=True, dtype=dtype)["median_ms"]
    for k, v in rows.items():
        print(f"GPU {name}: {k:30s} {v:8.2f} ms ({rows['fp32'] / v:4.2f}x vs fp32)")
    return {"device": name, "latency_ms": rows}


if __name__ == "__main__":
    main()
