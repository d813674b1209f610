"""Parameters flow one way: a YAML profile in params/ -> one typed `Config` (config.py) -> functions.

A profile is `params/<name>.yaml` (or any YAML path); `extends: <profile>` starts from another
profile's keys. Relative paths inside it are relative to the YAML file's own folder, `${VAR}` is
expanded from the environment (config_paths.py). `--set KEY=VALUE` (or a mapping of dotted keys)
changes keys after the file is read. Everything is checked at load, before any work: an unknown key, a
wrong type, a value outside its choices or range is an error naming the key, the value, what is valid
and where it was set (config_schema.py).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

from segstudy import config_schema as schema
from segstudy.config import DATASETS, Config
from segstudy.config_paths import PROJECT_ROOT, resolve_paths, unset_variable
from segstudy.errors import UserError

PARAMS_DIR = Path(os.environ.get("SEGSTUDY_PARAMS_DIR", PROJECT_ROOT / "params"))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def resolve_profile(profile: str | os.PathLike) -> Path:
    """A profile name (`demo`) or a path to a YAML file -> the YAML file."""
    text = str(profile)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise UserError(f"params file {path} does not exist; pass a profile name "
                            f"({', '.join(available_profiles())}) or an existing YAML file")
        return path
    path = PARAMS_DIR / f"{text}.yaml"
    if not path.is_file():
        raise UserError(f"unknown profile '{text}': there is no {path}; "
                        f"available profiles: {', '.join(available_profiles())}")
    return path


def load_config(profile: str | os.PathLike = "demo",
                overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load a profile and apply overrides (`{"data.root": "/x"}` or `["data.root=/x"]`)."""
    path = resolve_profile(profile)
    raw = _read_profile(path)
    raw.setdefault("profile", path.stem)
    if "profile_roots" not in raw:  # a params file that launch.py wrote carries its profile's
        raw["profile_roots"] = _own_roots(path, raw)
    parsed = parse_overrides(overrides)
    for key, value in parsed.items():
        _set_dotted(raw, key, value, path)
    cfg = _checked(raw, str(path), schema.origin(path, set(parsed)), base=path.parent.resolve())
    cfg.overrides = parsed
    return cfg


def _checked(raw: dict, source: str, where: schema.Where, base: Path) -> Config:
    cfg = schema.check(Config, raw, source, where)
    resolve_paths(cfg, base)
    return cfg


def _own_roots(path: Path, raw: dict) -> dict[str, str]:
    """Config.profile_roots: each dataset root key -> its folder as the profile file gives it, before any
    --set; none for a root that is empty or names an unset variable, and none when the file does not load
    on its own (its --set values are what make it valid)."""
    try:
        own = _checked(copy.deepcopy(raw), str(path), schema.origin(path, set()), base=path.parent.resolve())
    except UserError:
        return {}
    roots = {"data.root": own.data.root} | {f"cross.{name}.root": getattr(own.cross, name).root for name in DATASETS}
    return {key: root for key, root in roots.items() if root and not unset_variable(root)}


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def _read_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The profile's keys over those of the profile it `extends` (a name in params/ or a YAML path
    relative to it), so a variant such as rehearsal.yaml states only what it changes. Relative paths
    in the merged keys are then read from the extending file's folder."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise UserError(f"{path}: 'extends' goes round in a circle ({chain}); remove one of them")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"{path}: 'extends' = {parent!r} must be a profile name such as full")
    base = path.parent / parent if parent.endswith((".yaml", ".yml")) else parent
    try:
        parent_path = resolve_profile(base)
    except UserError as exc:
        raise UserError(f"{path}: extends '{parent}', but {exc}") from None
    return _merge(_read_profile(parent_path, (*seen, path.resolve())), raw)


# the mappings a child profile's value replaces whole, as `--set KEY=...` does, instead of merging key by key:
# a search space's entries only mean something together (a child's space is the space searched)
REPLACED_WHOLE = ("tune.space",)


def _merge(base: dict, top: dict, at: str = "") -> dict:
    """`top`'s keys over `base`'s: sections merge key by key, except those in REPLACED_WHOLE."""
    merged = dict(base)
    for key, value in top.items():
        dotted = f"{at}{key}"
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict) and dotted not in REPLACED_WHOLE
        merged[key] = _merge(merged[key], value, f"{dotted}.") if both_sections else value
    return merged


def parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """`["data.crop_size=[64, 128]"]` (the CLI's --set) or a mapping -> {dotted key: value}; the values are
    checked by load_config."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value, e.g. data.batch_size=4")
        key, value = item.split("=", 1)
        parsed[key.strip()] = parse_value(key.strip(), value)
    return parsed


def parse_value(key: str, text: str) -> Any:
    """One --set value, read as YAML (`[64, 128]` -> a list); a malformed one names the key and the fix.
    Nothing after the `=` is the empty text (YAML would read None, which no key takes): `--set
    cross.bdd100k.root=` is what a shell passes for `--set cross.bdd100k.root=''`."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"--set {key}={text}: {text!r} is not a valid value ({problem}); write it like "
                        f"{key}={_example(key)}, close any [ or {{, and quote text holding : # [ ] {{ }}") from None


def _example(key: str) -> str:
    """The default of a dotted key as YAML (`[128, 256]`), to show how a value is written."""
    try:
        value = functools.reduce(getattr, key.split("."), Config())
    except AttributeError:
        return "VALUE"
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def _set_dotted(raw: dict, key: str, value: Any, path: Path) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{key}': '{part}' in {path} is not a section")
    node[parts[-1]] = value


def derive(cfg: Config, changes: dict[str, Any]) -> Config:
    """cfg with dotted keys changed (`{"train.epochs": 2, "loss.name": "dice"}`), checked by the same
    rules as a loaded profile: the one way a study derives a config (a loss-study run, a tuning trial,
    a mixed training). The result keeps cfg's profile, profile_roots and overrides; its paths stay as cfg
    resolved them."""
    raw = cfg.to_dict()
    source = f"a config derived from profile {cfg.profile}"
    for key, value in changes.items():
        _set_dotted(raw, key, value, Path(source))
    derived = _checked(raw, source, lambda key: f"derived ({', '.join(changes)})",
                       base=Path.cwd())  # every path is absolute already: unchanged
    derived.overrides = dict(cfg.overrides)
    return derived
