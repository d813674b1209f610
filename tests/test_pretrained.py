"""ImageNet backbone weights: a local weights folder, the torch hub cache, a download through
torchvision's weights API (from a file:// URL: never the network) and the fallback to random init."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet50
from torchvision.models._api import Weights, WeightsEnum

from segstudy.config_profiles import PARAMS_DIR, load_config
from segstudy.errors import UserError
from segstudy.models import networks
from segstudy.models.networks import backbone_init, build_model

MARK = 0.123  # conv1 of the fake ImageNet weights: the value shows which weights a model got
SMALL = {"output_stride": 32, "head_channels": 8, "head_layers": 1}
TORCHVISION_NAME = Path(networks.BACKBONE_WEIGHTS.url).name  # resnet50-0676ba61.pth
UNREACHABLE = f"file:///nonexistent/{TORCHVISION_NAME}"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A ResNet-50 state dict with conv1 = MARK, named the way torchvision names its files
    (resnet50-<sha256 prefix>.pth), so the hash check of a download passes."""
    state = resnet50().state_dict()
    state["conv1.weight"].fill_(MARK)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "state.pth")
    digest = hashlib.sha256((folder / "state.pth").read_bytes()).hexdigest()[:8]
    return (folder / "state.pth").rename(folder / f"resnet50-{digest}.pth")


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache for each test, so a user's cached weights never leak in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would win over TORCH_HOME
    return tmp_path / "torch" / "hub" / "checkpoints"


def _serve_from(monkeypatch, url: str) -> None:
    """Point the weights API at `url`: a weights enum like ResNet50_Weights with one member."""
    weights = WeightsEnum("FileWeights", {"IMAGENET1K_V1": Weights(url=url, transforms=None, meta={})})
    monkeypatch.setattr(networks, "BACKBONE_WEIGHTS", weights.IMAGENET1K_V1)


def _conv1(model: torch.nn.Module) -> torch.Tensor:
    return model.backbone.conv1.weight


def test_auto_downloads_into_the_hub_cache(weights_file, hub_cache, monkeypatch):
    _serve_from(monkeypatch, weights_file.as_uri())
    model = build_model("custom", pretrained="auto", **SMALL)
    assert torch.all(_conv1(model) == MARK) and backbone_init(model) == "imagenet"
    assert (hub_cache / weights_file.name).is_file()


def test_weights_dir_is_read_without_the_url(weights_file, tmp_path, hub_cache, monkeypatch):
    _serve_from(monkeypatch, UNREACHABLE)  # a download would fail: the folder must be enough
    folder = tmp_path / "air-gapped"
    folder.mkdir()
    (folder / TORCHVISION_NAME).symlink_to(weights_file)
    model = build_model("deeplabv3_resnet50", pretrained="true", output_stride=16, weights_dir=str(folder))
    assert torch.all(_conv1(model) == MARK) and backbone_init(model) == "imagenet"
    assert not hub_cache.exists()


def test_weights_dir_without_the_file(tmp_path):
    with pytest.raises(UserError, match=f"model.weights_dir = .*empty holds no {TORCHVISION_NAME}; copy"):
        build_model("custom", pretrained="auto", weights_dir=str(tmp_path / "empty"), **SMALL)


def test_auto_falls_back_to_random_init_in_one_line(monkeypatch, capsys):
    _serve_from(monkeypatch, UNREACHABLE)
    model = build_model("custom", pretrained="auto", **SMALL)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "starts from random init" in lines[0]
    assert backbone_init(model) == "random" and not torch.all(_conv1(model) == MARK)


def test_true_without_weights_is_an_error(monkeypatch):
    _serve_from(monkeypatch, UNREACHABLE)
    with pytest.raises(UserError, match="pretrained = true but the ImageNet ResNet-50 weights are not in"):
        build_model("custom", pretrained="true", **SMALL)


def test_backbone_init_of_unet_and_false():
    assert backbone_init(build_model("unet", unet_base=4)) == "none"
    assert backbone_init(torch.nn.Linear(1, 1)) == "unknown"
    # false never looks for weights: neither the folder nor the network
    model = build_model("custom", pretrained="false", weights_dir="/nonexistent", **SMALL)
    assert backbone_init(model) == "random"


def test_weights_dir_config_resolves_like_other_paths():
    assert load_config("smoke").model.weights_dir == ""  # empty: unused, not the params folder
    cfg = load_config("smoke", {"model.weights_dir": "weights"})
    assert cfg.model.weights_dir == str((PARAMS_DIR / "weights").resolve())
