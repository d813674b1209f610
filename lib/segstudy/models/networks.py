"""The study's three models, built by one factory. Each returns {"out": logits[, "aux": logits]}
at the input resolution, like torchvision's segmentation models.

- unet: the classic encoder-decoder U-Net with skip connections (the baseline).
- deeplabv3_resnet50: torchvision's DeepLabV3 (ASPP) on a dilated ResNet-50, output stride 8/16.
- custom: the study's hybrid, ResNet-50 backbone -> conv-BN-ReLU layers -> 1x1 classifier ->
  bilinear upsampling to the input size (no skip connections), output stride 8/16/32.
"""

from __future__ import annotations

import contextlib
import io
import socket
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from segstudy.config import MODELS
from segstudy.errors import UserError

BACKBONE_WEIGHTS = ResNet50_Weights.IMAGENET1K_V1

# ResNet's replace_stride_with_dilation for layer2..layer4 per output stride
_DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Ronneberger et al. (2015) with BatchNorm and padded convs: 4 downsamplings, skip connections,
    transposed-conv upsampling. `base` is the first level's width (64 in the paper)."""

    def __init__(self, num_classes: int, base: int = 64, depth: int = 4):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(3, widths[0])] +
                                  [_double_conv(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.dec = nn.ModuleList([_double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        self.stride = 2**depth

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        # pad to a multiple of 2**depth so every skip connection lines up, crop at the end
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return {"out": self.classifier(x)[..., :h, :w]}


class HybridFCN(nn.Module):
    """ResNet-50 features -> `layers` x (3x3 conv-BN-ReLU) -> 1x1 classifier -> bilinear upsampling."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_channels: int = 256, layers: int = 2):
        super().__init__()
        self.backbone = backbone
        blocks: list[nn.Module] = []
        cin = 2048
        for _ in range(layers):
            blocks += [nn.Conv2d(cin, head_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True)]
            cin = head_channels
        self.head = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)["out"]
        logits = self.classifier(self.head(features))
        return {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}


class PaddingAwareConv2d(nn.Conv2d):
    """A stride-1 3x3 convolution at dilation d, padded by d (DeepLabV3's ASPP branches), that skips
    the kernel rows (columns) which meet only zero padding: those of a map no taller (wider) than d.
    Hand-written because oneDNN computes them anyway, and at the demo's 96x192 crops (a 6x12 map, rates
    6, 12, 18) they are most of ASPP's work (docs/results.md). The output is the same, the parameters are
    the same 3x3 tensor (the skipped taps get zero gradients, as they did), and at Cityscapes'
    resolution nothing is skipped. Tracers and exporters record the plain convolution: their graph
    must serve every input size."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return super()._conv_forward(x, weight, bias)
        (dh, dw), (ph, pw) = self.dilation, self.padding
        h, w = x.shape[-2:]
        if dh >= h:
            weight, dh, ph = weight[:, :, 1:2], 1, 0
        if dw >= w:
            weight, dw, pw = weight[..., 1:2], 1, 0
        return F.conv2d(x, weight, bias, self.stride, (ph, pw), (dh, dw), self.groups)


def _padding_aware_aspp(aspp: ASPP) -> ASPP:
    """ASPP with its dilated 3x3 convolutions as PaddingAwareConv2d (same parameters, same state_dict)."""
    for module in aspp.modules():
        if type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1) \
                and module.padding == module.dilation and module.dilation != (1, 1):
            module.__class__ = PaddingAwareConv2d
    return aspp


def plain_convs(model: nn.Module) -> nn.Module:
    """`model` with every PaddingAwareConv2d an nn.Conv2d again, for code that matches modules by
    their exact type (FX quantization's patterns)."""
    for module in model.modules():
        if type(module) is PaddingAwareConv2d:
            module.__class__ = nn.Conv2d
    return model


def backbone_weights(pretrained: str | bool, weights_dir: str = "") -> dict[str, torch.Tensor] | None:
    """The ImageNet ResNet-50 state dict, or None for random init.

    Sources in order: `weights_dir` (air-gapped boxes; the file must be there), the torch hub cache,
    a download through torchvision's weights API. auto: when neither answers, say so in one line and
    train from scratch. true: fail clearly. false: random init.
    """
    mode = str(pretrained).lower()
    if mode in ("false", "no", "0"):
        return None
    if mode not in ("auto", "true", "yes", "1"):
        raise UserError(f"model.pretrained = {pretrained!r}; use auto, true or false")
    if weights_dir:
        return _local_weights(Path(weights_dir))
    try:
        return _cached_or_downloaded()
    except Exception as exc:  # no network, proxy, disk, bad hash: all mean "not available"
        name, cache = _weights_file(Path()).name, _hub_checkpoints()
        if mode != "auto":
            raise UserError(f"model.pretrained = true but the ImageNet ResNet-50 weights are not in {cache} and "
                            f"could not be downloaded ({type(exc).__name__}: {exc}); copy {name} there, or set "
                            f"model.weights_dir to a folder holding it, or set pretrained: auto") from exc
        print(f"[segstudy] ImageNet weights unavailable (no {name} in {cache}, download failed: "
              f"{type(exc).__name__}): the ResNet-50 backbone starts from random init")
        return None


def weights_on_disk(weights_dir: str = "") -> Path | None:
    """The ImageNet ResNet-50 file that backbone_weights would read without a download: in
    `weights_dir` when set, else in the torch hub cache; None when it is not there."""
    file = _weights_file(Path(weights_dir) if weights_dir else _hub_checkpoints())
    return file if file.is_file() else None


def _weights_file(folder: Path) -> Path:
    return folder / Path(BACKBONE_WEIGHTS.url).name


def _hub_checkpoints() -> Path:
    """Where torchvision's weights API caches (and looks for) downloaded files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _local_weights(folder: Path) -> dict[str, torch.Tensor]:
    file = _weights_file(folder)
    if not file.is_file():
        raise UserError(f"model.weights_dir = {folder} holds no {file.name}; copy torchvision's ImageNet "
                        f"ResNet-50 weights ({BACKBONE_WEIGHTS.url}) there, or set model.weights_dir to \"\" "
                        f"to use the torch hub cache or a download")
    return torch.load(file, map_location="cpu", weights_only=True)


def _cached_or_downloaded() -> dict[str, torch.Tensor]:
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # a network that does not answer should cost seconds, not minutes
    try:
        # the hub cache if the file is there, else a download into it (sha256 checked against the file
        # name; a progress bar once the network answers). torch's "Downloading" line is dropped so that
        # a box without network prints one line: the fallback's
        with contextlib.redirect_stdout(io.StringIO()):
            return BACKBONE_WEIGHTS.get_state_dict(progress=True, check_hash=True, map_location="cpu",
                                                   weights_only=True)
    finally:
        socket.setdefaulttimeout(old_timeout)


def backbone_init(model: nn.Module) -> str:
    """How build_model initialised the backbone: imagenet | random | none (U-Net) | unknown."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    inner = getattr(inner, "module", inner)  # DDP
    return getattr(inner, "backbone_init", "unknown")


def _resnet_backbone(state: dict | None, output_stride: int, layers: dict[str, str]) -> nn.Module:
    if output_stride not in _DILATION:
        raise UserError(f"model.output_stride = {output_stride}; choose one of 8, 16, 32")
    net = resnet50(replace_stride_with_dilation=_DILATION[output_stride])
    if state is not None:
        net.load_state_dict(state)
    return IntermediateLayerGetter(net, return_layers=layers)


def build_model(name: str, num_classes: int = 19, pretrained: str | bool = "auto", output_stride: int = 16,
                aux_loss: bool = False, unet_base: int = 64, head_channels: int = 256,
                head_layers: int = 2, weights_dir: str = "") -> nn.Module:
    """One of MODELS, returning {"out"[, "aux"]} logits at the input size. `model.backbone_init`
    records imagenet | random | none: the same profile scores very differently with and without."""
    if name not in MODELS:
        raise UserError(f"model.name = '{name}' is unknown; choose one of {', '.join(MODELS)}")
    if name == "unet":
        model: nn.Module = UNet(num_classes, base=unet_base)
        model.backbone_init = "none"
        return model
    state = backbone_weights(pretrained, weights_dir)
    if name == "deeplabv3_resnet50":
        if output_stride not in (8, 16):
            raise UserError(f"model.output_stride = {output_stride}; DeepLabV3 uses 8 or 16")
        layers = OrderedDict(layer4="out", **({"layer3": "aux"} if aux_loss else {}))
        backbone = _resnet_backbone(state, output_stride, layers)
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)  # as in the DeepLabV3 paper
        aux = FCNHead(1024, num_classes) if aux_loss else None
        head = DeepLabHead(2048, num_classes, rates)
        _padding_aware_aspp(head[0])
        model = DeepLabV3(backbone, head, aux)
    else:
        model = HybridFCN(_resnet_backbone(state, output_stride, {"layer4": "out"}), num_classes,
                          head_channels, head_layers)
    model.backbone_init = "random" if state is None else "imagenet"
    return model
