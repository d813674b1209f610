"""Checkpoints: one dict (model, optimizer, scheduler, scaler, RNG states, step, meta), written
atomically and read back with `torch.load(weights_only=True)`."""

from __future__ import annotations

import inspect
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segstudy.errors import UserError
from segstudy.files import atomic_path
from segstudy.models.networks import build_model

# what a model file is, by its suffix: every reader (load_engine, the registry's tags, the servable's
# requirements, predict's file check) asks model_format
FORMATS = {".onnx": "onnx", ".xml": "openvino"}  # anything else: a segstudy checkpoint ("torch")
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def model_format(path: str | Path) -> str:
    """torch (a segstudy checkpoint), onnx or openvino (IR: the .xml, its weights in the .bin beside it)."""
    return FORMATS.get(Path(path).suffix, "torch")


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Written atomically (segstudy.files): a crash never leaves a truncated checkpoint, and two
    processes never write the same temporary file."""
    with atomic_path(path, needed=_tensor_bytes(state)) as tmp:
        torch.save(state, tmp)
    return Path(path)


def _tensor_bytes(obj) -> int:
    """The tensors' bytes in a (nested) checkpoint: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_model(model: nn.Module, meta: dict, path: str | Path, **info) -> Path:
    """A model-only checkpoint (weights + meta + free-form info, e.g. pruning settings and metrics)
    that `load_trained` below reads back. Weights are saved contiguous (not channels_last)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return save_checkpoint({"model": state, "meta": meta, **info}, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train first (segstudy train) or "
                        f"point at an existing checkpoint")
    if other := other_kind(path):
        raise UserError(f"{path} is {other}, not a model checkpoint; {PASS_A_MODEL}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError,
            TypeError, AttributeError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path} is not a readable checkpoint (corrupt, truncated, or not saved by segstudy: "
                        f"{first}); {PASS_A_MODEL}, or train that run again (its folder is kept until a new "
                        f"run finishes)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is a torch file but not a segstudy checkpoint (no 'model' entry); "
                        f"point at a checkpoint written by segstudy train")
    return ckpt


PASS_A_MODEL = ("pass a checkpoint written by segstudy (runs/<model>/checkpoint_best.pt, "
                "04_pruning_sweeps/pruned_structured.pt), an .onnx file, or models:/NAME@ALIAS")


def other_kind(path: Path) -> str | None:
    """What a file that is not a checkpoint is, when it is another output of the study (so the
    message can say so, and never advises deleting it): JSON, ONNX, TorchScript; None otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file (a results or settings file of the study)"
    if model_format(path) != "torch":
        kind = {"onnx": "an ONNX", "openvino": "an OpenVINO"}[model_format(path)]
        return f"{kind} model (predict and serving read it as it is: give it as the model, not as a checkpoint)"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist()):
                return ("a TorchScript model (notebook 05's int8 export, read by torch.jit.load; predict "
                        "takes notebook 05's custom_int8.onnx or the registered int8 model instead)")
    return None


def check_meta(ckpt: dict, model_name: str, num_classes: int, path: str | Path) -> None:
    meta = ckpt.get("meta", {})
    if meta.get("model") != model_name or meta.get("num_classes") != num_classes:
        raise UserError(f"checkpoint {path} holds a '{meta.get('model')}' model with "
                        f"{meta.get('num_classes')} classes, but the params ask for '{model_name}' "
                        f"with {num_classes}; use that model's checkpoint or another run folder")


def load_model_state(model: nn.Module, state: dict, path: str | Path, assign: bool = False) -> None:
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:3]
        raise UserError(f"checkpoint {path} does not match the model built from the params "
                        f"({'; '.join(first)}); check model.* settings (output_stride, "
                        f"head_channels, unet_base) against the run that wrote it") from exc


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        # this process's GPU only: get_rng_state_all holds one state per visible GPU, and restoring
        # it where fewer are visible (a resume with other train.gpus, or on CPU) fails
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    saved = state.get("cuda")
    if saved is not None and torch.cuda.is_available():
        if isinstance(saved, (list, tuple)):  # written by an older segstudy: one state per visible GPU
            saved = saved[min(torch.cuda.current_device(), len(saved) - 1)] if len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(saved)


def load_trained(checkpoint: str | Path, ckpt: dict | None = None) -> nn.Module:
    """Rebuild a model from a segstudy checkpoint (its meta says which, and whether it was
    structurally pruned) and load its weights; `ckpt`: the checkpoint when already read."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    if "meta" not in ckpt or "model_config" not in ckpt["meta"]:
        raise UserError(f"{checkpoint} has no segstudy model metadata; it was not written by segstudy train")
    mc = ckpt["meta"]["model_config"]
    known = set(inspect.signature(build_model).parameters)
    if not isinstance(mc, dict) or set(mc) - known:
        unknown = sorted(set(mc) - known) if isinstance(mc, dict) else mc
        raise UserError(f"{checkpoint}: its model metadata has keys this segstudy does not know ({unknown}); "
                        f"it was written by another version: retrain, or load it with that version")
    # the checkpoint holds every weight: no pretrained ones to look for, and no random init to throw
    # away (most of a ResNet-50's load): built on the meta device, then given the checkpoint's tensors,
    # copied contiguous (they may be saved channels_last, and the caller's ckpt stays its own)
    with torch.device("meta"):
        model = build_model(num_classes=ckpt["meta"].get("num_classes", 19), **(mc | {"pretrained": False}))
    state = {k: v.clone(memory_format=torch.contiguous_format) if isinstance(v, torch.Tensor) else v
             for k, v in ckpt["model"].items()}
    if ckpt["meta"].get("pruned") == "structured":
        reshape_to(model, state)  # fewer channels than build_model makes
    load_model_state(model, state, checkpoint, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{checkpoint} lacks {', '.join(left[:3])}: it was written by another version of the model")
    return model.eval()


def reshape_to(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize a freshly built model's convs and BNs to a pruned checkpoint's tensor shapes, so that
    load_state_dict fits. Only channel counts change under structured pruning."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state.get(prefix + "weight")
        if w is None or not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
            continue
        for pname, param in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            saved = state.get(prefix + pname)
            if saved is not None and saved.shape != param.shape:
                new = torch.empty(saved.shape, dtype=param.dtype, device=param.device)
                if isinstance(param, nn.Parameter):
                    setattr(module, pname, nn.Parameter(new, requires_grad=param.requires_grad))
                else:
                    setattr(module, pname, new)
        if isinstance(module, nn.BatchNorm2d):
            module.num_features = w.shape[0]
        elif isinstance(module, nn.ConvTranspose2d):
            module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
        elif isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    return model
