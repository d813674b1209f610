"""The images `segstudy monitor` and notebook 07 feed a model: image files, folders of them, and request
logs (.jsonl: one /invocations body per line, in any of the four forms the server reads), each image
decoded as the server decodes a request and each unreadable input kept with its reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segstudy.deploy import drift, inference
from segstudy.deploy.predict import IMAGE_SUFFIXES
from segstudy.errors import UserError

NOT_INPUTS = ("_labelIds", "_color", "_instanceIds", "_labelTrainIds")  # label files beside images
REQUEST_LOG_SUFFIXES = (".jsonl", ".json")


@dataclass
class Input:
    """One input of `segstudy monitor`: an image, or the reason it could not be read."""

    name: str
    image: np.ndarray | None = None
    reason: str = ""


def read_image(path: str | Path) -> np.ndarray:
    """One image file, decoded as the server decodes a request (drift.decoded); a UserError names it."""
    return next(iter(drift.decoded([Path(path)])))


def read_inputs(inputs: Sequence[str | Path]) -> Iterator[Input]:
    """Every image of the folders and files given, in order, each unreadable one with its reason; a
    .jsonl/.json file is a request log: one /invocations body per line."""
    for item in map(Path, inputs):
        if not item.exists():
            raise UserError(f"{item} does not exist; give image files, folders or a request log (.jsonl)")
        if item.suffix in REQUEST_LOG_SUFFIXES:
            yield from _request_log(item)
            continue
        files = sorted(p for p in item.rglob("*") if _is_input(p)) if item.is_dir() else [item]
        for path in files:
            try:
                yield Input(str(path), read_image(path))
            except UserError as exc:
                yield Input(str(path), reason=str(exc))


def _is_input(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.stem.endswith(NOT_INPUTS)


def _request_log(path: Path) -> Iterator[Input]:
    """The images of each body in the log, read as the server reads them (serving.request_images)."""
    from mlflow.exceptions import MlflowException

    from segstudy.deploy.serving import request_images

    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            values = request_images(line)
        except MlflowException as exc:
            yield Input(f"{path.name}:{n}", reason=f"not a request the server reads: {_first_line(exc.message)}")
            continue
        for i, value in enumerate(values):
            try:
                yield Input(f"{path.name}:{n}:{i}", inference.decode_base64_image(value, f"line {n} image {i}"))
            except UserError as exc:
                yield Input(f"{path.name}:{n}:{i}", reason=str(exc))


def _first_line(text: str, limit: int = 200) -> str:
    """MLflow's message up to its first line break (it quotes the body after one), at most `limit` characters."""
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line if len(line) <= limit else line[:limit] + "..."
