"""The config's path fields: how a field is marked as a path, and how load_config resolves it.

A path in a profile is relative to the YAML file's own folder; `${VAR}` is expanded from the
environment. An unset variable is an error at load, except in a field marked `unset_later` (an
optional dataset of a profile), which keeps the path as written until it is used.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segstudy.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

_UNSET_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def path_field(default: str, unset_later: bool = False) -> Any:
    """A path relative to the YAML file; with `unset_later`, a ${VAR} that is not set stays as written
    and is an error only when the path is used (an optional dataset of a profile: load_config works)."""
    return dataclasses.field(default=default, metadata={"path": True, "unset_later": unset_later})


def path_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, the section that holds it, its field) for every path field (path_field) of `obj`,
    a config or one of its sections."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from path_fields(value, f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            yield f"{prefix}{f.name}", obj, f


def resolve_paths(obj: Any, base: Path) -> None:
    """Every path field of `obj` (a config, its sections) made absolute against `base`, in place."""
    for _, section, f in path_fields(obj):
        value = getattr(section, f.name)
        if not (isinstance(value, str) and value):  # empty: unused, not the folder
            continue
        expanded = os.path.expandvars(value)
        missing = _UNSET_VAR.search(expanded)
        if missing and f.metadata.get("unset_later"):
            continue  # said by unset_variable() where the path is used
        if missing:
            raise UserError(f"'{f.name}' = {value!r} uses the environment variable "
                            f"{missing.group(1)}, which is not set; export it "
                            f"(e.g. export {missing.group(1)}=/data/cityscapes)")
        setattr(section, f.name, str((base / Path(expanded).expanduser()).resolve()))


def unset_variable(path: str) -> str | None:
    """The environment variable a path still names because it was not set at load (path_field(unset_later))."""
    missing = _UNSET_VAR.search(path)
    return missing.group(1) if missing else None
