"""`segstudy predict`: a trained model (checkpoint, ONNX file or MLflow model URI) on new images.

For each input image `X[_leftImg8bit].png` it writes, under --out (mirroring input sub-folders):
    X_labelIds.png   Cityscapes labelIds (what `segstudy evaluate` scores; matched by {city}_{seq}_{frame})
    X_color.png      the image with the predicted Cityscapes colours blended over it (evaluate skips it)
The decode, pre- and post-processing are segstudy.deploy.inference's, shared with the served model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segstudy.config import Config
from segstudy.deploy import inference
from segstudy.errors import UserError
from segstudy.files import atomic_path, write_bytes
from segstudy.models.checkpoint import CHECKPOINT_SUFFIXES, FORMATS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MODEL_SUFFIXES = (*CHECKPOINT_SUFFIXES, *FORMATS)


def is_model_uri(model: str) -> bool:
    return model.startswith(("models:/", "runs:/")) or "://" in model


@dataclass(frozen=True)
class Segmenter:
    segment: Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 RGB -> (H, W) train ids
    description: str
    limits: inference.SizeLimits  # the sizes it accepts, checked from each file's header


def load_segmenter(model: str | Path, cfg: Config) -> Segmenter:
    """The segmenter of a checkpoint, an .onnx file or an MLflow model URI.

    A file is pre-processed with the profile's data.base_size; a registered model carries the
    base_size and pixel limit it was registered with (so predict and the server agree)."""
    if is_model_uri(str(model)):
        from segstudy.deploy import registry

        seg = registry.load(cfg, str(model))  # a missing model/alias fails here, naming what exists
        return Segmenter(seg.segment, f"{model} ({seg.engine.kind}, base_size {seg.base_size})", seg.limits)
    engine = inference.load_engine(model)
    base_size = cfg.data.base_size
    arch = f"{engine.architecture} " if engine.architecture else ""
    if engine.architecture and engine.architecture != cfg.model.name:
        print(f"[segstudy] {model} holds a {engine.architecture} model, not the profile's model.name "
              f"({cfg.model.name}): predicting with {engine.architecture}")
    return Segmenter(lambda image: inference.segment(engine, image, base_size),
                     f"{model} ({arch}{engine.kind}, base_size {base_size})", inference.SizeLimits(base_size))


def read_image(path: Path, limits: inference.SizeLimits) -> np.ndarray:
    """Decode one input file; a file refused by its size or content is a UserError naming it and the fix."""
    try:
        return inference.decode_image(path.read_bytes(), str(path), limits)
    except inference.ImageTooLarge as exc:
        fix = "downscale" if exc.kind == "pixels" else "crop"
        raise UserError(f"{exc.reason}; {fix} it to at most {exc.limit}, or leave it out of --input") from None
    except UserError as exc:
        raise UserError(f"{exc}; replace the file, or leave it out of --input") from None


def find_images(inputs: Sequence[str | Path], exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """(image file, its path relative to the input it was found under), sorted, per input."""
    found: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not (exclude and p.resolve().is_relative_to(exclude)))
            found += [(p, p.relative_to(item)) for p in files]
        elif item.is_file():
            if item.suffix.lower() in MODEL_SUFFIXES:
                raise UserError(f"--input {item} is a model file; pass it as --model, and images as --input")
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"--input {item} is not a .png/.jpg image; give images or folders of them")
            found.append((item, Path(item.name)))
        else:
            raise UserError(f"--input {item} does not exist; give image files or folders of images")
    if not found:
        raise UserError(f"no .png/.jpg images under {', '.join(map(str, inputs))}")
    return found


def output_stem(relative: Path) -> Path:
    """aachen/aachen_000000_000019_leftImg8bit.png -> aachen/aachen_000000_000019"""
    name = relative.stem
    return relative.with_name(name[: -len("_leftImg8bit")] if name.endswith("_leftImg8bit") else name)


def predict(model: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, cfg: Config,
            progress: bool = True) -> dict:
    """Segment every image of `inputs`, write labelIds PNGs and colour overlays to `out_dir`. A file
    that cannot be segmented (empty, corrupt, too large) is said in one line and skipped; the others
    are written, and then a UserError counts the refused ones.
    Returns {"images", "seconds", "out_dir", "model"}."""
    out_dir = Path(out_dir)
    images = find_images(inputs, exclude=out_dir.resolve())
    segmenter = load_segmenter(model, cfg)  # before any output is written: fail early
    start, refused = time.perf_counter(), []
    for path, relative in tqdm(images, desc="predict", unit="img", disable=not progress, mininterval=2.0):
        try:
            image = read_image(path, segmenter.limits)
            train_ids = segmenter.segment(image)
        except UserError as exc:
            print(f"[segstudy] refused: {exc}", file=sys.stderr, flush=True)
            refused.append(path)
            continue
        stem = out_dir / output_stem(relative)
        stem.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(stem.with_name(stem.name + "_labelIds.png"), inference.label_ids_png(train_ids))
        with atomic_path(stem.with_name(stem.name + "_color.png")) as tmp:
            inference.overlay(image, train_ids).save(tmp, format="PNG")
    written = len(images) - len(refused)
    if refused:
        raise UserError(f"{len(refused)} of {len(images)} input files were refused (each named above); "
                        f"the other {written} were segmented into {out_dir}")
    return {"images": written, "seconds": time.perf_counter() - start, "out_dir": str(out_dir),
            "model": segmenter.description}
