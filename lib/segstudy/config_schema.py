"""How `config.Config` is checked: pydantic v2 validates the plain dataclasses, the rules sit on the fields.

A field declares its rules next to its type, `batch_size: Annotated[int, AT_LEAST_ONE] = 8`: a `Choice`, a
`Range` (both checked on a scalar, on each item of a list and on each value of a mapping), a `Length`, or
a special rule (`Spelled`, `MinMax`, `Check`). pydantic coerces and checks the types strictly (no "3" -> 3,
no True -> 1; an int or a YAML 1.1 float string such as 1e-4 -> float), refuses unknown keys and runs the
rules; `check` turns its first error into one line that names the key, the value, what is valid and where
the value was set. The section classes stay plain dataclasses: building one by hand or with
`dataclasses.replace` checks nothing, as before; only `load_config` and `validate` check.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ConfigDict, GetCoreSchemaHandler, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError, core_schema

from segstudy.errors import UserError

Where = Callable[[str], str]  # key -> where its value came from ("set in params/demo.yaml")


class Section:
    """Base of the config's dataclasses: their fields are strict, and unknown keys are refused."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        schema = handler(source)
        schema["strict"] = False  # a section is read from a mapping; its fields keep strict=True
        return schema


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot, no exponent sign) as a string: a float field takes it as the number."""
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


Float = Annotated[float, BeforeValidator(_yaml_float)]


class Rule:
    """A check declared on a field with `Annotated`, run by pydantic once the type is right."""

    each = False  # True: a list's items and a mapping's values are each checked
    rank = 3  # which error a message reports first: choices, then ranges, then lengths, then the rest
    sub = ""  # the message names this key under the field (a check over a whole section)

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def _check(self, value: Any) -> Any:
        for label, item in _members(value) if self.each else [(f" = {value!r}", value)]:
            problem = self.problem(item)
            if problem is not None:
                self._fail(f"{label} {problem}")
        return value

    def _fail(self, text: str) -> None:
        raise PydanticCustomError("segstudy", "{text}", {"text": text, "rank": self.rank, "sub": self.sub})


def _members(value: Any) -> list[tuple[str, Any]]:
    """(how a message names it after the key, value) for a scalar, each list item, each mapping value."""
    if isinstance(value, list):
        return [(f" = {value!r}: {item!r}", item) for item in value]
    if isinstance(value, dict):
        return [(f".{name} = {item!r}", item) for name, item in value.items()]
    return [(f" = {value!r}", value)]


@dataclass(frozen=True)
class Choice(Rule):
    values: tuple
    each = True
    rank = 0

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else f"is unknown; choose one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class Range(Rule):
    """Numbers from `low` (to `high`; None: no upper bound), each end closed unless marked open."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""
    each = True
    rank = 1

    def __contains__(self, value: float) -> bool:
        above = value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                    f"{')' if self.high_open else ']'}")
        return f"{text} ({self.note})" if self.note else text

    def problem(self, value: Any) -> str | None:
        return None if value in self else f"must be {self}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Length(Rule):
    """A list's number of items (None: any number but at least one) and what the items are."""

    count: int | None
    what: str
    rank = 2

    def problem(self, value: Any) -> str | None:
        if (self.count is None or len(value) == self.count) and value:
            return None
        return f"must have {f'{self.count} items' if self.count else 'at least one item'}: {self.what}"


@dataclass(frozen=True)
class Spelled(Rule):
    """A value whose text matches `pattern` (a device such as cuda:1, a YAML boolean); `shown` in messages."""

    pattern: str
    shown: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        return None if re.fullmatch(self.pattern, str(value)) else f"is unknown; choose one of {', '.join(self.shown)}"


@dataclass(frozen=True)
class MinMax(Rule):
    """A [min, max] pair in order."""

    def problem(self, value: Any) -> str | None:
        return None if value[0] <= value[1] else "must be [min, max] with min <= max"


@dataclass(frozen=True)
class Check(Rule):
    """A check across the fields of a section: `test` returns the message after `<section>.<sub>`, or None."""

    test: Callable[[Any], str | None]
    sub: str = ""

    def _check(self, value: Any) -> Any:
        text = self.test(value)
        if text is not None:
            self._fail(text)
        return value


R = TypeVar("R", bound=Rule)


def rules(root: type, kind: type[R]) -> dict[str, R]:
    """Dotted key -> the rule of this kind declared on that field (CHOICES, RANGES, LENGTHS)."""
    found = {key: getattr(hint, "__metadata__", ()) for key, hint in _leaves(root)}
    return {key: rule for key, metadata in found.items() for rule in metadata if isinstance(rule, kind)}


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    hints = _hints(cls, extras=True)
    for f in dataclasses.fields(cls):
        plain = _hints(cls)[f.name]
        if dataclasses.is_dataclass(plain):
            yield from _leaves(plain, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


@functools.cache
def _hints(cls: type, extras: bool = False) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=extras)


@functools.cache
def _adapter(root: type) -> TypeAdapter:
    return TypeAdapter(root)


def check(root: type, raw: dict, source: str, where: Where) -> Any:
    """`raw` (a mapping of sections) -> a checked instance of `root`, or a UserError naming the first problem."""
    try:
        return _adapter(root).validate_python(raw)
    except ValidationError as exc:
        raise UserError(_message(root, exc.errors(), source, where)) from None


OVERRIDES = "--set/overrides"


def origin(path: object, overridden: set[str]) -> Where:
    """key -> where its value came from: the --set/overrides that name it or a section above it, else the file."""
    def where(key: str) -> str:
        if any(key == k or key.startswith(f"{k}.") for k in overridden):
            return f"set by {OVERRIDES}"
        return f"set in {path}"
    return where


_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")
# keys a profile may still set that are gone, and the key that holds their fact now (docs/changes.md)
RETIRED = {"prune.target_loss": "report.keep_loss", "quant.max_loss": "report.keep_loss"}


# pydantic's own texts name neither the file nor the fix and locate by tuples: this turns its first error
# (unknown keys, then types, then the rules) into the project's one-line message, as before the move to pydantic
def _message(root: type, errors: list, source: str, where: Where) -> str:
    unknown = sorted((e for e in errors if e["type"] in _UNKNOWN), key=lambda e: (len(e["loc"]), *map(str, e["loc"])))
    error = unknown[0] if unknown else min(errors, key=lambda e: e.get("ctx", {}).get("rank", -1))
    loc, value = error["loc"], error["input"]
    if error["type"] == "segstudy":
        key = ".".join(map(str, loc + ((error["ctx"]["sub"],) if error["ctx"]["sub"] else ())))
        return f"{key}{error['ctx']['text']}; {where(key)}"
    if error["type"] in _UNKNOWN:
        *parents, name = map(str, loc)
        section = functools.reduce(lambda cls, part: _hints(cls)[part], parents, root)
        at = f"section '{'.'.join(parents)}'" if parents else "the top level"
        key = ".".join((*parents, name))
        given = OVERRIDES if where(key) == f"set by {OVERRIDES}" else source  # the key's writer, not the profile
        if key in RETIRED:
            return (f"{given}: '{key}' is no longer a key: {RETIRED[key]} holds that threshold now; "
                    f"set that instead (docs/changes.md)")
        return (f"{given}: unknown key '{key}'; valid keys at {at}: "
                f"{', '.join(f.name for f in dataclasses.fields(section))}")
    try:
        key, hint, rest = _field(root, loc)
    except KeyError:  # not a shape the project's messages know: pydantic's own words
        return f"{source}: '{'.'.join(map(str, loc))}' = {value!r}: {error['msg']}"
    kind, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return f"{source}: '{key}' must be a section (a mapping)"
    if kind in (typing.Union, types.UnionType):
        need = f"one of {hint}"
    elif kind is list:
        need = f"of type {_name(args[0])}" if rest else f"a list of {_name(args[0])}"
    elif kind is dict and not rest:
        need = f"a mapping of {_name(args[0])} to {_name(args[1])}"
    elif kind is dict and rest[-1] == "[key]":
        need = f"of type {_name(args[0])}"
    elif kind is dict:
        key, need = f"{key}.{rest[0]}", f"of type {_name(args[1])}"
    else:
        need = f"of type {_name(hint)}"
    return f"{source}: '{key}' = {value!r} must be {need}"


def _field(root: type, loc: tuple) -> tuple[str, Any, tuple]:
    """A location -> (the field's dotted key, its type, what lies below it: a list index, a mapping key)."""
    cls, parts = root, []
    for i, part in enumerate(loc):
        hint = _hints(cls)[part]
        parts.append(str(part))
        if not dataclasses.is_dataclass(hint) or i + 1 == len(loc):
            return ".".join(parts), hint, loc[i + 1:]
        cls = hint
    return ".".join(parts), root, ()


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
