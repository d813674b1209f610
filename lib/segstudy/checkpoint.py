"""Checkpoints: one dict (model, optimizer, scheduler, scaler, RNG states, step, meta), written
atomically and read back with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segstudy.errors import UserError


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write to a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def save_model(model: nn.Module, meta: dict, path: str | Path, **info) -> Path:
    """A model-only checkpoint (weights + meta + free-form info, e.g. pruning settings and metrics)
    that `models.load_trained` reads back. Weights are saved contiguous (not channels_last)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return save_checkpoint({"model": state, "meta": meta, **info}, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train first (segstudy train) or "
                        f"point at an existing checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError(f"{path} is not a readable checkpoint (corrupt, truncated or not saved by "
                        f"segstudy: {str(exc).splitlines()[0]}); delete it and train again") from exc


def check_meta(ckpt: dict, model_name: str, num_classes: int, path: str | Path) -> None:
    meta = ckpt.get("meta", {})
    if meta.get("model") != model_name or meta.get("num_classes") != num_classes:
        raise UserError(f"checkpoint {path} holds a '{meta.get('model')}' model with "
                        f"{meta.get('num_classes')} classes, but the params ask for '{model_name}' "
                        f"with {num_classes}; use that model's checkpoint or another run folder")


def load_model_state(model: nn.Module, state: dict, path: str | Path) -> None:
    try:
        model.load_state_dict(state)
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
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
