"""Inference shared by `segstudy predict` and the served MLflow model: one decode, one
pre-processing, one post-processing, so a served mask equals a predicted one pixel for pixel.

Pre-processing is exactly the evaluation preset (`transforms.eval_preset`: shorter side resized to
`base_size`, ImageNet normalisation). Post-processing upsamples the *logits* bilinearly to the input
image's size and takes the argmax there (as mmsegmentation does for `ori_shape`), rather than
resizing the label map with nearest neighbour: the models themselves end in a bilinear upsampling
of logits, so this keeps class boundaries smooth at full resolution instead of blocky at the
base_size grid, and costs nothing when the image is already at base_size.
"""

from __future__ import annotations

import binascii
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imagecodecs
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors

from segstudy.data import labels
from segstudy.data.transforms import eval_preset
from segstudy.errors import UserError
from segstudy.models.checkpoint import model_format

# Largest image accepted (served or predicted): 4x a Cityscapes frame (2048x1024). The labels come
# back at this size: the logits upsampled to it take 19 x 4 B = 76 B per pixel, 0.64 GB here.
MAX_PIXELS = 4096 * 2048
# Street scenes are 2:1 (Cityscapes) or 16:9 (BDD100K), ultra-wide and stitched panoramas 4-6:1;
# beyond 8:1 an image is a strip, and since pre-processing scales its shorter side *up* to
# base_size, the network's input grows with the ratio (1x8,000,000 at base_size 64: a 393 GB tensor).
MAX_ASPECT = 8
# Largest network input after pre-processing: a full Cityscapes frame, the largest the study runs
# (full profile, base_size 1024). The forward pass takes up to ~1.4 KB per input pixel (U-Net
# width 64; the ResNet-50 models 0.3-0.7 KB at output stride 16-8, measured on CPU), so ~3 GB at
# most, plus the 0.64 GB of upsampled logits above.
MAX_NETWORK_PIXELS = 2048 * 1024
IMAGE_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class SizeLimits:
    """What decode_image refuses from an image's header, before any pixel is decoded."""

    base_size: int  # pre-processing scales the shorter side to this
    max_pixels: int = MAX_PIXELS
    max_aspect: float = MAX_ASPECT
    max_network_pixels: int = MAX_NETWORK_PIXELS

    def __post_init__(self) -> None:
        if self.base_size ** 2 > self.max_network_pixels:
            raise UserError(f"base_size {self.base_size} makes even a square image larger than the limit of "
                            f"{self.max_network_pixels:,} network pixels; use a base_size of at most "
                            f"{math.isqrt(self.max_network_pixels)}")


class ImageTooLarge(UserError):
    """An image refused by its size. `reason` names it and the limit; predict and the server each add
    what to do: `kind` "pixels" (downscale it to at most `limit`) or "aspect" (crop it to at most `limit`)."""

    def __init__(self, reason: str, kind: Literal["pixels", "aspect"], limit: str):
        super().__init__(reason)
        self.reason, self.kind, self.limit = reason, kind, limit


@dataclass
class Engine:
    """A loaded model: `run(x)` maps a (1, 3, h, w) float32 tensor to (1, C, h', w') logits.
    `image_classes(image)`, where the engine does the whole path itself (OpenVINO), maps an (H, W, 3)
    uint8 RGB image already at the network's size to (H, W) uint8 train ids."""

    kind: str  # model_format: torch | onnx | openvino
    path: str
    run: Callable[[torch.Tensor], torch.Tensor]
    fixed_size: tuple[int, int] | None = None  # (h, w) of an ONNX graph exported with a static shape
    architecture: str | None = None  # unet | deeplabv3_resnet50 | custom, when the file says
    image_classes: Callable[[np.ndarray], np.ndarray] | None = None


def load_engine(path: str | Path, device: str | torch.device = "cpu") -> Engine:
    """A segstudy checkpoint (fp32 or pruned, via models.checkpoint.load_trained), an ONNX file (fp32/int8)
    or an OpenVINO int8 IR (.xml). `device`: where a checkpoint's network runs (the logits come back to
    the CPU); ONNX and OpenVINO run on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; give a checkpoint (.pt), an .onnx file, an OpenVINO "
                        f".xml or an MLflow model URI (models:/NAME@ALIAS)")
    if model_format(path) == "onnx":
        return _onnx_engine(path)
    if model_format(path) == "openvino":
        return _openvino_engine(path)
    from segstudy.models.checkpoint import load_checkpoint, load_trained

    ckpt = load_checkpoint(path)
    model = load_trained(path, ckpt).eval().to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # .to() and .cpu() return the tensor itself on the CPU: no copy
            return model(x.to(device))["out"].cpu()

    return Engine("torch", str(path), run, architecture=ckpt.get("meta", {}).get("model"))


def _onnx_engine(path: Path) -> Engine:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UserError(f"{path} is an ONNX model; it needs onnxruntime: pip install onnxruntime") from exc
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # the same cores torch would use
        opts.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(path), opts, providers=ort.get_available_providers())
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(f"{path} is not a loadable ONNX model ({str(exc).splitlines()[0]}); export it "
                        f"again") from exc
    inp = session.get_inputs()[0]
    h, w = inp.shape[2:4] if len(inp.shape) == 4 else (None, None)
    fixed = (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def run(x: torch.Tensor) -> torch.Tensor:
        # the first output is the logits ("out"); an aux head, if exported, comes after it
        return torch.from_numpy(session.run(None, {inp.name: x.numpy()})[0])

    return Engine("onnx", str(path), run, fixed)


def _openvino_engine(path: Path) -> Engine:
    from segstudy.compress import openvino_int8

    why = openvino_int8.unavailable()
    if why:
        raise UserError(f"{path} is an OpenVINO model; {why}")
    module = openvino_int8.OvModule(openvino_int8.compiled(path))  # torch's thread count, as ONNX's session
    shape = module.model.input(0).get_partial_shape()
    fixed = (shape[2].get_length(), shape[3].get_length()) if shape.rank.get_length() == 4 and shape[2].is_static \
        and shape[3].is_static else None
    served = openvino_int8.OvModule(openvino_int8.compiled(path, served=True))  # image in, class ids out
    return Engine("openvino", str(path), lambda x: module(x)["out"], fixed,
                  image_classes=lambda image: served.run(np.ascontiguousarray(image)[None], copy=True)[0, 0])


def decode_image(data: bytes, what: str = "image", limits: SizeLimits | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8 RGB; every way the bytes can be wrong is a UserError saying which.

    PIL reads the header (format, and size against `limits`, are checked before any pixel is
    decoded) and decodes JPEG and unusual PNGs (grey, palette, alpha, 16 bit: PIL's `convert("RGB")`).
    An 8-bit RGB PNG, what cameras and Cityscapes give, goes to libpng through imagecodecs, which is
    faster than PIL (decoding is the largest cost of a served request after the forward pass;
    docs/serving.md has the figures). torchvision's decode_png is not an option for untrusted bytes:
    a corrupt IDAT checksum crashes the process."""
    if not data:
        raise UserError(f"{what} is empty; send PNG or JPEG bytes")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own limit, far above ours
        limit = f"{(limits.max_pixels if limits else MAX_PIXELS) / 1e6:.1f} MP"
        raise ImageTooLarge(f"{what} is far too large ({exc})", "pixels", limit) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{what} is not an image ({len(data)} bytes that are neither PNG nor JPEG)") from exc
    if im.format not in IMAGE_FORMATS:
        raise UserError(f"{what} is a {im.format} image; send PNG or JPEG")
    if limits:
        check_size(im.width, im.height, limits, what)
    try:
        turned = _orientation(im) not in (None, 1)
        if im.format == "PNG" and im.mode == "RGB" and not turned:
            pixels = imagecodecs.png_decode(data)
            # 16 bit (uint16) or a transparent colour (tRNS: RGBA out) is rare: PIL converts those
            if pixels.dtype == np.uint8 and pixels.shape[2:] == (3,):
                return pixels
        im.load()
        if turned:  # a phone photo stores its pixels sideways and says how to turn them (EXIF Orientation)
            im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, imagecodecs.PngError) as exc:
        raise UserError(f"{what} is a truncated or corrupt {im.format} ({exc})") from exc
    return to_rgb8(im)


def _orientation(im: Image.Image) -> int | None:
    """The EXIF Orientation tag, read from the header only (PIL's PNG getexif() would decode the
    pixels to look for a late eXIf chunk: a PNG's orientation counts only before its image data)."""
    if im.format == "PNG" and "exif" not in im.info:
        return None
    return im.getexif().get(0x0112)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB, a writable copy as torch wants. 16-bit greyscale (PIL modes I;16* and I)
    is scaled to 8 bits (v / 257, exact for an 8-bit picture saved as 16 bit): PIL's convert("RGB")
    would clip every value above 255, turning the picture white."""
    if im.mode == "RGB":
        return np.array(im)
    if im.mode.startswith("I"):
        grey = np.asarray(im, dtype=np.float64)
        grey8 = np.clip(np.rint(grey / 257), 0, 255).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    return np.array(im.convert("RGB"))


def decode_base64_image(text: str, what: str = "image", limits: SizeLimits | None = None) -> np.ndarray:
    if not isinstance(text, str):
        raise UserError(f"{what} is not a string (got {type(text).__name__}); send base64 PNG/JPEG bytes")
    try:
        # strict a2b_base64 validates in C; b64decode(validate=True) first runs a regex over the
        # whole payload, which is slower
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise UserError(f"{what} is not valid base64 ({exc}); send base64-encoded PNG or JPEG bytes") from exc
    return decode_image(data, what, limits)


def resized_size(width: int, height: int, base_size: int) -> tuple[int, int]:
    """(width, height) after pre-processing: the shorter side scaled to base_size, as torchvision's
    Resize(base_size) computes it (the longer side rounded down)."""
    short, long = sorted((width, height))
    new_long = int(base_size * long / short)
    return (base_size, new_long) if width <= height else (new_long, base_size)


def check_size(width: int, height: int, limits: SizeLimits, what: str = "image") -> None:
    """Raise ImageTooLarge for an image over the pixel limit, the aspect limit, or the network-input
    limit once pre-processing has scaled it; the last two are fixed by cropping, the first by
    downscaling."""
    pixels = width * height
    if not pixels:
        raise UserError(f"{what} is {width}x{height}: it has no pixels")
    if pixels > limits.max_pixels:
        raise ImageTooLarge(f"{what} is {width}x{height} ({pixels:,} pixels), more than the limit of "
                            f"{limits.max_pixels:,} ({limits.max_pixels / 1e6:.1f} MP)", "pixels",
                            f"{limits.max_pixels / 1e6:.1f} MP")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise ImageTooLarge(f"{what} is {width}x{height}, an aspect ratio of {_ratio(aspect)} (longer to "
                            f"shorter side), more than the limit of {_ratio(limits.max_aspect)}", "aspect",
                            _ratio(limits.max_aspect))
    net_w, net_h = resized_size(width, height, limits.base_size)
    if net_w * net_h > limits.max_network_pixels:
        fits = min(limits.max_aspect, limits.max_network_pixels / limits.base_size ** 2)
        raise ImageTooLarge(f"{what} is {width}x{height}; with its shorter side scaled to base_size "
                            f"{limits.base_size}, the network would run at {net_w}x{net_h} ({net_w * net_h:,} "
                            f"pixels), more than the limit of {limits.max_network_pixels:,}", "aspect",
                            _ratio(math.floor(fits * 10) / 10))


def _ratio(aspect: float) -> str:
    return f"{aspect:,.0f}:1" if aspect >= 100 else f"{aspect:.3g}:1"


def preprocess(image: np.ndarray, base_size: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, h, w) float32, through the evaluation preset itself."""
    # channels first and contiguous while still uint8 (1.5 MB): the preset's float steps on the
    # permuted HWC view would read strided memory and end in a layout copy, twice as slow
    x = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
    return eval_preset(base_size)(x).as_subclass(torch.Tensor).unsqueeze(0).contiguous()


def segment(engine: Engine, image: np.ndarray, base_size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 train ids at the image's own size (0..18)."""
    height, width = image.shape[:2]
    network = resized_size(width, height, base_size)[::-1]  # (h, w) after pre-processing
    if engine.fixed_size and network != engine.fixed_size:
        raise UserError(f"{engine.path} was exported for a fixed {engine.fixed_size[1]}x{engine.fixed_size[0]} "
                        f"input, but this {width}x{height} image at base_size {base_size} becomes "
                        f"{network[1]}x{network[0]}; export with dynamic height/width axes")
    if engine.image_classes is not None and network == (height, width):  # nothing to resize either way
        ids = engine.image_classes(image)
        if ids.shape == (height, width):  # every segstudy network ends at its input's size; a foreign one may not
            return ids
        engine.image_classes = None  # such a network needs its logits upsampled: only that path from now on
    return postprocess(engine.run(preprocess(image, base_size)), height, width)


def postprocess(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(1, C, h, w) logits -> (height, width) uint8 train ids: logits upsampled bilinearly to the
    image's size (when they are not at it already), then the argmax."""
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
    return argmax_classes(logits[0].float().numpy())


def argmax_classes(logits: np.ndarray) -> np.ndarray:
    """(C, H, W) logits -> (H, W) uint8 index of the largest, the first one on ties (= argmax).

    A running maximum over the classes, branch-free: where class c beats the best so far, c is
    larger than every index recorded yet, so max(ids, c * beats) records it. np.argmax(axis=0) and
    torch's argmax(dim=0) reduce over the outer, strided axis and are several times slower, and a
    masked `ids[beats] = c` slows down on noisy logits from branch mispredictions (docs/serving.md)."""
    best = logits[0].copy()
    ids = np.zeros(logits.shape[1:], dtype=np.uint8)
    beats = np.empty(logits.shape[1:], dtype=bool)
    candidate = np.empty(logits.shape[1:], dtype=np.uint8)
    for c in range(1, logits.shape[0]):
        np.greater(logits[c], best, out=beats)
        np.maximum(best, logits[c], out=best)
        np.multiply(beats.view(np.uint8), np.uint8(c), out=candidate)
        np.maximum(ids, candidate, out=ids)
    return ids


def label_ids_png(train_ids: np.ndarray) -> bytes:
    """Train ids -> Cityscapes labelIds PNG bytes (what `segstudy evaluate` reads). A label map is long
    runs of one value: without PNG's row filters (PIL always tries them) and with zlib's run-length
    strategy it encodes 4x faster and smaller (docs/serving.md)."""
    return imagecodecs.png_encode(labels.to_label_ids(train_ids), level=1, strategy=imagecodecs.PNG.STRATEGY.RLE,
                                  filter=imagecodecs.PNG.FILTER.NONE)


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The (H, W, 3) uint8 image with the prediction's Cityscapes colours blended over it."""
    return Image.blend(Image.fromarray(image), Image.fromarray(labels.colorize(train_ids)), alpha)


def class_pixels(train_ids: np.ndarray) -> dict[str, int]:
    # torch's bincount counts uint8 as it is (a serial loop, no thread pool); numpy's first casts the
    # map to int64, 8x its size, which takes three times as long (docs/serving.md)
    ids = torch.from_numpy(np.require(train_ids, np.uint8, ["C", "W"])).view(-1)  # torch wants writable
    counts = torch.bincount(ids, minlength=labels.NUM_CLASSES)[: labels.NUM_CLASSES].tolist()
    return {name: int(n) for name, n in zip(labels.CLASS_NAMES, counts)}
