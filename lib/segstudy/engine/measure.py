"""Measurements every notebook reports: latency, throughput, parameters, FLOPs, size, CPU."""

from __future__ import annotations

import copy
import io
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def cpu_info() -> dict:
    """CPU model and vendor, the ISA flags int8/bf16 speed depends on, and the thread count in use."""
    model, vendor, flags = platform.processor() or "unknown", "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {"cpu": model, "vendor": vendor, "threads": torch.get_num_threads(),
            **{f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")}}


def cpu_line(info: dict | None = None, threads: int | None = None) -> str:
    """The line every benchmark opens with: the CPU, its vendor and thread count, and each ISA flag."""
    info = info or cpu_info()
    flags = "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in info.items() if k not in ("cpu", "vendor", "threads"))
    return f"CPU: {info['cpu']} ({info['vendor']})  threads: {threads or info['threads']}  {flags}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(model: nn.Module, height: int = 512, width: int = 1024, device: str | torch.device = "cpu",
            warmup: int = 2, iters: int = 5, channels_last: bool = False,
            dtype: torch.dtype | None = None) -> dict:
    """Median (and min/max, and every one in "times_ms") wall time of one batch-1 forward pass at
    height x width.

    The model is moved (and converted to channels_last when asked) in place, outside
    inference mode, so it stays trainable afterwards.
    """
    return latencies({"model": model}, height, width, device, warmup, iters, channels_last, dtype)["model"]


def latencies(models: dict[str, nn.Module], height: int = 512, width: int = 1024,
              device: str | torch.device = "cpu", warmup: int = 2, iters: int = 5, channels_last: bool = False,
              dtype: torch.dtype | None = None) -> dict[str, dict]:
    """latency() of several models, timed in turn (one pass of each per round): a speed-up is read
    from models timed side by side, since the same model timed a few minutes apart on the same
    2-core machine differed by up to 30% (docs/results.md)."""
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {name: m.eval().to(device, memory_format=fmt) for name, m in models.items()}
    x = torch.randn(1, 3, height, width, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        runners = {name: (lambda m=model: m(x)) for name, model in models.items()}
        return timed_in_turn(runners, warmup, iters, device, f"{width}x{height}")


# a pause before each timed call: ONNX Runtime's pool threads spin for a while after a run, and in turn
# they slowed whatever ran next, enough to reverse the order of two int8 engines (docs/results.md, "What
# does int8 buy?"); a served model, too, starts a request on idle cores
SETTLE_S = 0.05


def timed_in_turn(runners: dict[str, Callable[[], object]], warmup: int, iters: int,
                  device: str | torch.device = "cpu", size: str = "") -> dict[str, dict]:
    """Each runner (one forward pass of a model, an ONNX Runtime session, ...) called in turn, one
    call of each per round, `warmup` rounds untimed then `iters` timed: the round-robin every
    side-by-side timing of the study goes through (latencies, notebook 05's variants)."""
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + iters):
        for name, run in runners.items():
            _sync(device)
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            run()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    # every timing too: speed-ups are compared with an interval over them (studies.verdicts.speedup)
    return {name: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t), "max_ms": 1000 * max(t),
                   "times_ms": [1000 * v for v in t], "iters": iters, "size": size,
                   "threads": torch.get_num_threads(), "device": str(device)} for name, t in times.items()}


def flops(model: nn.Module, height: int, width: int) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter; a multiply-add counts as 2), counted on
    a copy on the meta device: shapes only, no arithmetic, so counting at 2048x1024 costs nothing
    (a model whose operators have no meta kernel is counted by running it)."""
    try:
        return _count_flops(copy.deepcopy(model).to("meta"), height, width, torch.device("meta"))
    except (NotImplementedError, RuntimeError):
        return _count_flops(model, height, width, next(model.parameters()).device)


def _count_flops(model: nn.Module, height: int, width: int, device: torch.device) -> int:
    x = torch.zeros(1, 3, height, width, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return int(counter.get_total_flops())


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_state(model: nn.Module) -> memoryview:
    """The state_dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer()


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the saved state_dict."""
    return len(saved_state(model))


def train_throughput(model: nn.Module, batch: int, height: int, width: int, steps: int = 4,
                     amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                     device: str | torch.device = "cpu") -> float:
    """Images per second of SGD steps (forward, cross-entropy, backward, update) on random data."""
    import torch.nn.functional as F

    device = torch.device(device)
    model = model.train().to(device)
    x = torch.randn(batch, 3, height, width, device=device)
    y = torch.randint(0, 19, (batch, height, width), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for i in range(steps + 1):  # the first step is warm-up
        if i == 1:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x)["out"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)
