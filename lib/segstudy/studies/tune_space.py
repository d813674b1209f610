"""What every trial of a tuning study shares: the budget it trains with (`tune.model`, `tune.epochs`,
`tune.max_steps`, `tune.max_images`) and the search space `tune.space` it samples from, checked
against the profile before the study's storage is touched, and the signature a continued study must
still match."""

from __future__ import annotations

import json
from typing import Any

import optuna

from segstudy.config import Config
from segstudy.config_profiles import derive, load_config, resolve_profile
from segstudy.errors import UserError


def budget(cfg: Config) -> dict[str, Any]:
    """The overrides every trial trains with: the model, its schedule, a validation per epoch."""
    tune = cfg.tune
    # one process, one GPU per trial (train.gpus > 1 is the profile's DDP, not the trials'): several GPUs
    # run several workers on one storage (tuning.one_gpu_line says how)
    return ({"model.name": tune.model, "train.epochs": tune.epochs, "train.val_every": 1, "train.gpus": 1}
            | ({"train.max_steps": tune.max_steps} if tune.max_steps else {})
            | ({"data.max_images": tune.max_images} if tune.max_images else {}))


def budget_config(cfg: Config) -> Config:
    """cfg as every trial trains it, before its sampled parameters (segstudy plan sizes the study with it)."""
    return derive(cfg, budget(cfg))


def check(cfg: Config, profile: str, overrides: dict) -> None:
    """A space the profile cannot train: one line naming the key (the shape was checked at load)."""
    where = f"tune.space in {resolve_profile(profile)}"
    if not cfg.tune.space:
        raise UserError(f"{where} is empty; declare the keys to search, e.g. "
                        f"train.lr: {{type: log_float, low: 0.0001, high: 0.01}}")
    for key, spec in cfg.tune.space.items():
        for value in _extremes(spec):
            try:
                load_config(profile, overrides | budget(cfg) | {key: value})
            except UserError as exc:
                raise UserError(f"{where}: {key} can take {value!r}, which the profile refuses ({exc})") from None


def _extremes(spec: dict) -> list:
    """The values of a distribution that the config's own rules must accept."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    return [_number(spec, "low"), _number(spec, "high")]


def _number(spec: dict, end: str) -> float | int:
    value = spec[end]
    return int(value) if spec["type"] == "int" else float(value)  # YAML reads 1e-4 as text: float() takes it


def suggest(trial: optuna.Trial, key: str, spec: dict) -> Any:
    """The trial's value of `key`, sampled from its distribution `spec` (an entry of tune.space)."""
    kind = spec["type"]
    if kind == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    low, high = _number(spec, "low"), _number(spec, "high")
    if kind == "int":
        return trial.suggest_int(key, low, high, step=int(spec.get("step", 1)))
    step = float(spec["step"]) if spec.get("step") else None
    return trial.suggest_float(key, low, high, log=kind == "log_float", step=step)


def signature(cfg: Config) -> dict:
    """What a study's trials must share to be compared: the model, the budget, the search space."""
    tune = cfg.tune
    return json.loads(json.dumps({"model": tune.model, "epochs": tune.epochs, "max_steps": tune.max_steps,
                                  "max_images": tune.max_images, "space": tune.space}))


def difference(saved: dict, now: dict) -> str:
    """The first key where a stored study's signature and this profile's differ, in words."""
    for key in now.keys() | saved.keys():
        if key == "space":
            for param in sorted(now["space"].keys() | saved.get("space", {}).keys()):
                if saved["space"].get(param) != now["space"].get(param):
                    return (f"tune.space.{param} = {saved['space'].get(param)}, now "
                            f"{now['space'].get(param)}")
        elif saved.get(key) != now.get(key):
            return f"tune.{key} = {saved.get(key)}, now {now.get(key)}"
    return "another search space"
