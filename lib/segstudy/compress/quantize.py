"""Int8 quantization of segstudy models (notebook 05): calibration data, torch FX post-training
quantization and quantization-aware training, saving, and output agreement with fp32.

Why FX graph mode and not PT2E: on this torch (2.14.1) `torch.ao.quantization.quantize_pt2e` no
longer exists, and torchao's X86InductorQuantizer fails on torchvision ResNet graphs ("Input
partition has more than one output node"); FX graph mode with the x86 backend still works and
runs real int8 kernels (oneDNN/FBGEMM) without a compile step. ONNX Runtime's static int8 is the
second engine (see onnx_export.py). Both quantize weights per channel.

The models end with a bilinear upsampling of 19-channel logits to full resolution; it is kept in
float (the classifier's int8 output is dequantized first): measured, that was faster than the
upsampling in uint8 on the custom model, and float keeps the logits the argmax compares at full
precision.
"""

from __future__ import annotations

import copy
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from segstudy.config import OBSERVERS, Config
from segstudy.errors import UserError
from segstudy.files import atomic_path
from segstudy.models.networks import plain_convs

BACKEND = "x86"  # oneDNN or FBGEMM per op, chosen by torch for this CPU
# DeepLabV3's ASPP concatenates branches that FX observed separately; quantized::cat then requantizes
# each input to its output's scale, and warns on every forward. Its cost in accuracy is measured, not
# assumed: notebook 05 scores each FX int8 model against its fp32 one on the same images
warnings.filterwarnings("ignore", message="All inputs of this cat operator must share the same quantization")
_TORCH_DIR = str(Path(torch.__file__).parent)


def set_threads(threads: int) -> int:
    """Use `threads` intra-op threads in torch (0: leave torch's default); returns the count in use.
    ONNX Runtime sessions from onnx_export.session() take the same count."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class LogitsOnly(nn.Module):
    """A segstudy model ({"out": logits[, "aux"]}) as a tensor -> logits tensor function, the form
    FX quantization and ONNX export work with."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # no annotations here: FX copies the root's (string) annotations into its generated code,
    # which TorchScript then cannot resolve when the int8 model is saved
    def forward(self, x):
        return self.model(x)["out"]


class AsDict(nn.Module):
    """The reverse: a tensor -> logits network (int8 GraphModule, ORT session) as a segstudy model,
    so engine.evaluation.validate / engine.finetuning.finetune score it like any other."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.net(x)}


# --- calibration data -----------------------------------------------------------------------------

class CalibrationImages(Sequence[torch.Tensor]):
    """Calibration images read from their dataset when asked for, so a set of 128 full-resolution
    images (25 MB each at 2048x1024) is never held at once; a slice is another such view."""

    def __init__(self, dataset: Sequence, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return CalibrationImages(self.dataset, self.indices[i])
        return self.dataset[self.indices[i]][0]


def as_calibration_batch(i: int, item: object) -> torch.Tensor:
    """Calibration item i as an (N, 3, H, W) float batch: a (3, H, W) image gains a batch dimension;
    anything else is a UserError saying what was found."""
    if not isinstance(item, torch.Tensor):
        raise UserError(f"calibration batch {i} is a {type(item).__name__}; expected a float tensor (N, 3, H, W)")
    batch = item[None] if item.ndim == 3 else item
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[0] == 0 or not batch.is_floating_point():
        raise UserError(f"calibration batch {i} has shape {tuple(item.shape)} and dtype {item.dtype}; expected "
                        f"float images (3, H, W) or batches (N, 3, H, W), normalised like the eval preset")
    return batch


def calibration_batches(items: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The calibration loader of both engines: every image of `items` ((3, H, W) images or
    (N, 3, H, W) batches, read as they come) as a batch of one. Batch 1 because a calibration pass
    holds its batch's activations (GBs per image at 2048x1024 with output stride 8), and MinMax
    ranges do not depend on the batching. The first item is checked now, so an empty or malformed
    set fails before any calibration work; a later bad item fails when it comes."""
    items = iter(items)
    first = next(items, None)
    if first is None:
        raise UserError("the calibration set is empty: int8 ranges need at least one image; "
                        "set quant.calib_images >= 1 and check the training split has images")
    first = as_calibration_batch(0, first)

    def one_by_one() -> Iterator[torch.Tensor]:
        yield from first.split(1)
        for i, item in enumerate(items, start=1):
            yield from as_calibration_batch(i, item).split(1)

    return one_by_one()


def calibration_images(cfg: Config, n: int) -> CalibrationImages:
    """n training images with the eval transforms (no augmentation), a seeded random subset, so that
    the first k of them are also the k-image calibration set (nested subsets for the N sweep); read
    from the dataset each time one is used (CalibrationImages)."""
    from segstudy.data.datasets import build_dataset

    ds = build_dataset(cfg.data, cfg.data.train_split, train=False)
    if n < 1 or len(ds) == 0:
        raise UserError(f"the calibration set is empty (quant.calib_images = {n}, {len(ds)} training "
                        f"images in {cfg.data.root}); int8 ranges need at least one image")
    if n > len(ds):
        raise UserError(f"{n} calibration images asked for (quant.calib_images / quant.calib_sweep), but "
                        f"{cfg.data.root} has {len(ds)} training images; lower those settings")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    return CalibrationImages(ds, order.tolist())


def validation_images(cfg: Config, n: int) -> list[torch.Tensor]:
    """The first n validation images (eval preset), for output agreement checks."""
    from segstudy.data.datasets import build_dataset

    ds = build_dataset(cfg.data, cfg.data.val_split)
    return [ds[i][0] for i in range(min(n, len(ds)))]


def batched(images: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack consecutive same-sized (3, H, W) images into batches of at most batch_size."""
    batches, current = [], []
    for image in images:
        if current and (len(current) == batch_size or current[0].shape != image.shape):
            batches.append(torch.stack(current))
            current = []
        current.append(image)
    if current:
        batches.append(torch.stack(current))
    return batches


# --- FX graph mode -----------------------------------------------------------------------------------

def qconfig_mapping(observer: str = "histogram", qat: bool = False) -> QConfigMapping:
    """torch's x86 mapping (per-channel symmetric int8 weights, uint8 activations with reduce_range),
    optionally with MinMax activation observers (cheaper calibration), the final upsampling in float."""
    if observer not in OBSERVERS:
        raise UserError(f"quant.observer = '{observer}'; choose one of {', '.join(OBSERVERS)}")
    if qat:
        mapping = get_default_qat_qconfig_mapping(BACKEND)
    else:
        mapping = get_default_qconfig_mapping(BACKEND)
        if observer == "minmax":
            mapping.set_global(QConfig(
                activation=MinMaxObserver.with_args(reduce_range=True),
                weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)))
    # the first F.interpolate in the segstudy model's own forward is the final upsampling of the
    # logits (custom hybrid, DeepLabV3): float; inner ones (ASPP's image pooling) stay int8
    return mapping.set_module_name_object_type_order("model", F.interpolate, 0, None)


class _WhereTracer(torch.fx.Tracer):
    """Records the module path being traced when tracing fails (the deepest one)."""

    def __init__(self, skip: Sequence[str]):
        super().__init__()
        self.skip, self.stack, self.failed_in = set(skip), [], None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.skip or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _where_untraceable(root: nn.Module, skip: Sequence[str]) -> tuple[str | None, str]:
    """(module path, "file:line `source`") of the code symbolic tracing cannot handle; path None
    when tracing succeeds, "" when it fails in the root's own forward."""
    tracer = _WhereTracer(skip)
    try:
        tracer.trace(root)
        return None, ""
    except Exception as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
        site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "?"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return tracer.failed_in or "", f"{first}, at {site}"


# Tracing and conversion checks run on a crop of the example image: the graph does not depend on its
# size, and ONNX tracing at 2048x1024 took 45 s on 2 cores against 1 s at this one (a multiple of 32)
EXAMPLE_SIZE = (256, 512)


def example_crop(example: torch.Tensor) -> torch.Tensor:
    """The top-left EXAMPLE_SIZE of an (N, 3, H, W) example (all of it when smaller)."""
    return example[..., :EXAMPLE_SIZE[0], :EXAMPLE_SIZE[1]]


def fx_prepare(model: nn.Module, example: torch.Tensor, observer: str = "histogram",
               qat: bool = False) -> tuple[torch.fx.GraphModule, list[str]]:
    """Insert observers (or fake-quant modules for QAT) into a copy of `model`.

    Code FX cannot trace (Python control flow on tensor values, .item(), ...) inside a submodule
    keeps that submodule in float and says so (second return value); in the model's own forward
    it is a UserError naming the line. Returns (prepared GraphModule taking images -> logits, notes)."""
    if BACKEND in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = BACKEND  # the kernels convert_fx will pick
    root = LogitsOnly(plain_convs(copy.deepcopy(model)))  # FX's patterns match nn.Conv2d exactly
    root.train(qat)
    skip: list[str] = []
    notes: list[str] = []
    mapping = qconfig_mapping(observer, qat)
    prepare = prepare_qat_fx if qat else prepare_fx
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FX mode's deprecation notices
                config = PrepareCustomConfig().set_non_traceable_module_names(skip)
                return prepare(root, mapping, (example,), prepare_custom_config=config), notes
        except Exception as exc:
            where, what = _where_untraceable(root, skip)
            if where is None:  # tracing works: the failure is elsewhere in FX's preparation
                raise UserError(f"FX quantization cannot prepare {type(model).__name__}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
            if where in ("", "model") or where in skip:
                raise UserError(f"{type(model).__name__}.forward cannot be quantized with FX graph mode: "
                                f"{what}. Make that code traceable (no Python branching on tensor values) "
                                f"or use the ONNX Runtime path") from None
            name = type(root.get_submodule(where)).__name__
            notes.append(f"{where.removeprefix('model.')} ({name}) kept in float: {what}")
            print(f"[segstudy] FX quantization: {notes[-1]}")
            skip.append(where)


@torch.inference_mode()
def calibrate(prepared: torch.fx.GraphModule, batches: Iterable[torch.Tensor]) -> None:
    """Run calibration images through the observers one at a time (calibration_batches; eval mode:
    BN uses its running stats). The observers keep running statistics, not the activations."""
    prepared.eval()
    for b in calibration_batches(batches):
        prepared(b)


def fx_convert(prepared: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """Replace observers by int8 ops (on a copy, so calibration can go on), then run one example so
    a missing int8 kernel is a UserError naming the op now rather than a crash later."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = convert_fx(copy.deepcopy(prepared).eval())
    try:
        with torch.inference_mode():
            q(example_crop(example))
    except (NotImplementedError, RuntimeError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"the int8 model fails on an example image: {first}. When this names an op without "
                        f"a quantized CPU kernel, keep its module in float (qconfig None) or use the ONNX "
                        f"Runtime path") from None
    return q


def fx_ptq(model: nn.Module, images: Sequence[torch.Tensor], sizes: Sequence[int],
           observer: str = "histogram") -> dict:
    """Post-training static int8 for every calibration size in `sizes` in one pass: the observers
    accumulate over images[:n], one image at a time (calibration_batches: a batch of full-resolution
    images would hold all their activations at once), and a converted copy is taken at each n (nested
    subsets). Returns {"models": {n: int8 model returning {"out": logits}}, "notes": [...],
    "calibrate_s": {n: cumulative calibration seconds}}."""
    sizes = sorted(set(sizes))
    if not images or not sizes or sizes[0] < 1:
        raise UserError(f"the calibration set is empty ({len(images)} images, sizes {list(sizes)}); "
                        f"int8 ranges need at least one image")
    if sizes[-1] > len(images):
        raise UserError(f"calibration size {sizes[-1]} asks for more than the {len(images)} images given")
    example = next(calibration_batches(images[:1]))
    prepared, notes = fx_prepare(model, example, observer)
    models, seconds, done, start = {}, {}, 0, time.perf_counter()
    for n in sizes:
        calibrate(prepared, images[done:n])
        done = n
        seconds[n] = time.perf_counter() - start
        models[n] = AsDict(fx_convert(prepared, example))
    return {"models": models, "notes": notes, "calibrate_s": seconds}


def qat(model: nn.Module, cfg: Config, epochs: float, lr: float | None = None, timing_key: str | None = None) -> dict:
    """Quantization-aware fine-tune of a copy of `model` (fake-quant in the forward pass, x86 QAT
    qconfig, fp32, no channels_last) with engine.finetuning.finetune, then conversion to int8.
    Returns {"model": int8 model returning {"out": logits}, "notes", "train_seconds", "fake_quant_miou"}."""
    from segstudy.engine.finetuning import finetune

    example = calibration_images(cfg, 1)[0][None]
    prepared, notes = fx_prepare(model, example, qat=True)
    result = finetune(AsDict(prepared), cfg, epochs, lr=lr, amp="none", channels_last=False, desc="QAT",
                      timing_key=timing_key)
    # int8 kernels are CPU kernels: convert on the CPU even when the fine-tune ran on a GPU
    return {"model": AsDict(fx_convert(prepared.cpu().eval(), example)), "notes": notes,
            "train_seconds": result["train_seconds"], "fake_quant_miou": result["miou"]}


def save_torchscript(net: nn.Module, path: str | Path) -> Path:
    """Save an int8 model as TorchScript, atomically: torch.jit.load reads it back without segstudy
    (and returns {"out": logits} like every segstudy model)."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), str(tmp))
    return Path(path)


# --- measuring -----------------------------------------------------------------------------------------

def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return out["out"] if isinstance(out, dict) else out


@torch.inference_mode()
def agreement(reference: nn.Module, candidates: Mapping[str, nn.Module], images: Sequence[torch.Tensor]
              ) -> dict[str, dict]:
    """Logits of each candidate against `reference` on the same images (one at a time; the
    reference runs once per image): max and mean absolute difference, and the share of pixels
    whose argmax class agrees. One dict per candidate name."""
    if not images:
        raise UserError("no images to compare outputs on")
    stats = {name: {"max_abs": 0.0, "sum_abs": 0.0, "agree": 0, "pixels": 0} for name in candidates}
    for image in images:
        a = _logits(reference.eval(), image[None]).float()
        for name, candidate in candidates.items():
            b, st = _logits(candidate.eval(), image[None]).float(), stats[name]
            diff = (a - b).abs()
            st["max_abs"], st["sum_abs"] = max(st["max_abs"], diff.max().item()), st["sum_abs"] + diff.mean().item()
            st["agree"] += (a.argmax(1) == b.argmax(1)).sum().item()
            st["pixels"] += a.shape[0] * a.shape[2] * a.shape[3]
    return {name: {"max_abs": st["max_abs"], "mean_abs": st["sum_abs"] / len(images),
                   "pixel_agreement": st["agree"] / st["pixels"], "images": len(images)}
            for name, st in stats.items()}
