"""Label mapping, the generator, the readers and transforms, and every bad-input error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cs_labels
from PIL import Image

from segstudy.config import SynthConfig
from segstudy.data import labels
from segstudy.data.bdd100k import BDD100KSegmentation
from segstudy.data.cityscapes import CityscapesSegmentation, cityscapes_samples, label_ids_to_train_ids
from segstudy.data.datasets import build_loader
from segstudy.data.synthetic.dataset import MARKER, ensure_dataset, generate
from segstudy.data.synthetic.scene import render
from segstudy.data.transforms import eval_preset, train_preset
from segstudy.errors import UserError


def test_label_mapping_matches_cityscapesscripts():
    for lb in cs_labels:
        if lb.id < 0:
            continue
        expected = lb.trainId if 0 <= lb.trainId < 255 else 255
        assert labels.ID_TO_TRAIN_ID[lb.id] == expected, lb.name
    assert labels.NUM_CLASSES == 19
    assert labels.CLASS_NAMES[0] == "road" and labels.CLASS_NAMES[18] == "bicycle"
    for i, name in enumerate(labels.CLASS_NAMES):
        lb = next(lb for lb in cs_labels if lb.name == name)
        assert tuple(labels.PALETTE[i]) == lb.color
        assert labels.TRAIN_ID_TO_LABEL_ID[i] == lb.id
    ids = np.arange(34, dtype=np.uint8)
    roundtrip = labels.to_train_ids(labels.to_label_ids(labels.to_train_ids(ids)))
    assert (roundtrip == labels.to_train_ids(ids)).all()
    # the uint8 lookup table (predictions) and the general path (int64, -1) agree; 255 and -1 -> 0
    train_ids = np.array([0, 5, 18, 19, 255], dtype=np.uint8)
    assert labels.to_label_ids(train_ids).tolist() == [7, 17, 33, 0, 0]
    assert labels.to_label_ids(train_ids.astype(np.int64)).tolist() == [7, 17, 33, 0, 0]
    assert labels.to_label_ids(np.array([-1, 18])).tolist() == [0, 33]


def test_generator_is_deterministic_and_in_layout(tiny_root, tmp_path):
    a = render(64, 128, seed=5, split="train", index=3)
    b = render(64, 128, seed=5, split="train", index=3)
    c = render(64, 128, seed=6, split="train", index=3)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[0] == c[0]).all()
    # a second generation with the same seed writes byte-identical label files
    again = tmp_path / "again"
    from tests.conftest import TINY
    generate(again, TINY, workers=2, progress=False)
    for s in cityscapes_samples(tiny_root, "val"):
        twin = again / s.label.relative_to(tiny_root)
        assert s.label.read_bytes() == twin.read_bytes()
    assert (tiny_root / MARKER).is_file()
    city_dir = tiny_root / "gtFine" / "train" / "synthburg"
    stem = "synthburg_000000_000019"
    for suffix in ("labelIds", "color", "instanceIds"):
        assert (city_dir / f"{stem}_gtFine_{suffix}.png").is_file()
    assert (tiny_root / "leftImg8bit" / "train" / "synthburg" / f"{stem}_leftImg8bit.png").is_file()


def test_generator_covers_all_classes_with_imbalance():
    counts = np.zeros(256, dtype=np.int64)
    for i in range(30):
        _, lab, _ = render(128, 256, seed=0, split="train", index=i)
        counts += np.bincount(lab.ravel(), minlength=256)
    train = np.bincount(labels.to_train_ids(np.nonzero(counts)[0].astype(np.uint8)), minlength=256)
    assert (train[:19] > 0).all(), "every one of the 19 classes appears"
    freq = {labels.label_name(i): counts[i] / counts.sum() for i in range(34)}
    for big in ("road", "building", "sky"):
        for small in ("pole", "traffic light", "traffic sign", "bicycle"):
            assert freq[big] > 10 * freq[small], (big, small)


def test_reader_and_transforms(tiny_root):
    ds = CityscapesSegmentation(tiny_root, "train", transforms=train_preset(64, [48, 96], [0.5, 2.0], 0.5, 0.3))
    img, mask = ds[0]
    assert img.shape == (3, 48, 96) and img.dtype == torch.float32
    assert mask.shape == (48, 96) and mask.dtype == torch.int64
    valid = mask[mask != 255]
    assert valid.numel() > 0 and int(valid.max()) < 19
    raw = CityscapesSegmentation(tiny_root, "val")
    image, target = raw.load(0)
    evald = CityscapesSegmentation(tiny_root, "val", transforms=eval_preset(32))
    _, small = evald[0]
    # nearest-neighbour only: every resized label value existed in the original
    assert set(small.unique().tolist()) <= set(np.unique(target).tolist())


def test_loader_is_deterministic(tiny_root):
    ds = CityscapesSegmentation(tiny_root, "train", transforms=train_preset(64, [32, 64], [0.5, 2.0], 0.5, 0.3))
    first = [m for _, m in build_loader(ds, 2, train=True, seed=1, num_workers=1)]
    second = [m for _, m in build_loader(ds, 2, train=True, seed=1, num_workers=1)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_decoded_cache_gives_the_same_samples_and_respects_its_budget(tiny_root, tmp_path, monkeypatch):
    from segstudy.data import cityscapes

    monkeypatch.setattr(cityscapes, "DECODED", cityscapes.DecodedCache())
    reads = []
    real_read = cityscapes.read_image
    monkeypatch.setattr(cityscapes, "read_image", lambda path: reads.append(path) or real_read(path))
    plain = CityscapesSegmentation(tiny_root, "val")
    cached = CityscapesSegmentation(tiny_root, "val", cache_mb=64)
    n = len(plain)
    for _ in range(2):  # the second pass is served from memory
        for i in range(n):
            a, b = plain[i], cached[i]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(reads) == 2 * n + n  # plain decodes twice, cached once
    b[0].fill_(0)  # a caller writing into a sample does not change the cached pair
    assert torch.equal(cached[n - 1][0], plain[n - 1][0])
    # a budget smaller than one decoded pair keeps nothing
    monkeypatch.setattr(cityscapes, "DECODED", cityscapes.DecodedCache())
    tiny = CityscapesSegmentation(tiny_root, "val", cache_mb=0)
    tiny.cache_bytes = 1
    tiny[0]
    assert cityscapes.DECODED.bytes == 0 and not cityscapes.DECODED.pairs
    # a file written again (new modification time) is decoded again
    copy = tmp_path / "copy"
    shutil.copytree(tiny_root, copy)
    again = CityscapesSegmentation(copy, "val", cache_mb=64)
    again[0]
    before = len(reads)
    image = again.samples[0].image
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    assert torch.equal(again[0][0], CityscapesSegmentation(copy, "val")[0][0]) and len(reads) == before + 2


def test_bdd100k_reader(tmp_path):
    img_dir = tmp_path / "images" / "10k" / "val"
    mask_dir = tmp_path / "labels" / "sem_seg" / "masks" / "val"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(img_dir / "abc.jpg")
    Image.fromarray(np.full((8, 16), 13, np.uint8)).save(mask_dir / "abc.png")
    image, target = BDD100KSegmentation(tmp_path, "val").load(0)
    assert (target == 13).all() and labels.CLASS_NAMES[13] == "car"
    Image.fromarray(np.full((8, 16), 40, np.uint8)).save(mask_dir / "abc.png")
    with pytest.raises(UserError, match="not a BDD100K sem_seg mask"):
        BDD100KSegmentation(tmp_path, "val").load(0)


# ---- bad input: each gives one clear error naming the path and the fix ----

def test_missing_or_empty_root(tmp_path):
    with pytest.raises(UserError, match="does not exist.*segstudy synth"):
        cityscapes_samples(tmp_path / "nope", "train")
    with pytest.raises(UserError, match=r"expected the folder .*leftImg8bit/train"):
        cityscapes_samples(tmp_path, "train")
    (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
    (tmp_path / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no"):
        cityscapes_samples(tmp_path, "train")


@pytest.fixture
def broken_root(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    return root


def test_image_without_label(broken_root):
    s = cityscapes_samples(broken_root, "val")[0]
    s.label.unlink()
    with pytest.raises(UserError, match=f"has no label file: expected {s.label}"):
        cityscapes_samples(broken_root, "val")


def test_corrupt_png(broken_root):
    s = cityscapes_samples(broken_root, "val")[0]
    s.image.write_bytes(s.image.read_bytes()[:200])
    with pytest.raises(UserError, match=f"{s.image.name} is not a readable image"):
        CityscapesSegmentation(broken_root, "val")[0]


def test_label_ids_out_of_range(broken_root):
    s = cityscapes_samples(broken_root, "val")[0]
    arr = np.array(Image.open(s.label))
    arr[0, 0] = 40
    Image.fromarray(arr).save(s.label)
    with pytest.raises(UserError, match="outside 0..33"):
        CityscapesSegmentation(broken_root, "val")[0]


def test_license_plate_minus_one_is_ignored(tmp_path):
    # -1 (license plate) cannot be stored in a PNG, but arrays from other tools may carry it
    arr = np.array([[-1, 7], [26, 33]], dtype=np.int32)
    assert label_ids_to_train_ids(arr, tmp_path / "x.png").tolist() == [[255, 0], [13, 18]]


def test_size_mismatch(broken_root):
    s = cityscapes_samples(broken_root, "val")[0]
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(s.label)
    with pytest.raises(UserError, match="size mismatch"):
        CityscapesSegmentation(broken_root, "val")[0]


def test_generated_dataset_with_other_settings_is_not_reused(tiny_root):
    from tests.conftest import TINY
    assert ensure_dataset(tiny_root, TINY) is False
    with pytest.raises(UserError, match="was generated with"):
        ensure_dataset(tiny_root, SynthConfig(train=9, val=6, height=64, width=128, seed=3))


def test_corrupt_or_mismatched_files_stop_before_training(tmp_path, tiny_root):
    from segstudy.data.datasets import check_files

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    val = CityscapesSegmentation(root, "val")
    check_files(val, "val")  # intact
    val.samples[1].image.write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match=rf"{val.samples[1].image.name} \(val image\) is not a readable image"):
        check_files(val, "val")
    Image.new("L", (8, 8)).save(val.samples[1].image.with_suffix(".png"))  # readable, but the wrong size
    with pytest.raises(UserError, match="size mismatch in the val split"):
        check_files(val, "val")


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise UserError(f"frame {index} is broken; replace it")


def test_worker_errors_are_one_line():
    loader = build_loader(_Broken(), batch_size=2, train=False, seed=0, num_workers=1)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert str(info.value) == "frame 0 is broken; replace it"


def test_no_dataset_is_generated_at_a_mistyped_root(tmp_path):
    from segstudy.config_profiles import load_config
    from segstudy.data.datasets import prepare_data

    cfg = load_config("smoke", {"data.root": str(tmp_path / "synht-smoke"), "output_root": str(tmp_path)})
    with pytest.raises(UserError, match="does not exist, and data.generate would create a new synthetic dataset"):
        prepare_data(cfg)
    assert not (tmp_path / "synht-smoke").exists()


def test_a_profile_outside_params_is_held_to_its_own_root(tmp_path):
    """The root a profile file gives is recorded when it is loaded (Config.profile_roots), not read again
    from params/: a file of another name has its own, and a mistyped --set root is refused there too."""
    from segstudy.config_profiles import load_config
    from segstudy.data.datasets import prepare_data

    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: smoke\ndata:\n  root: synth-mine\n")
    cfg = load_config(mine, {"data.root": str(tmp_path / "synht-mine"), "output_root": str(tmp_path)})
    assert cfg.profile_roots["data.root"] == str(tmp_path / "synth-mine")
    with pytest.raises(UserError, match=f"the profile's own root is {tmp_path / 'synth-mine'}"):
        prepare_data(cfg, ["cityscapes"])
    assert not (tmp_path / "synht-mine").exists()


def test_prepare_data_checks_a_dataset_once_per_process(tmp_path, tiny_root):
    """The runner's, a notebook's and each training's call: the second finds the dataset ready and reads
    nothing; one whose folder went away since is checked again."""
    import dataclasses
    import json

    from segstudy.config_profiles import load_config
    from segstudy.data.datasets import prepare_data

    root = tmp_path / "synth-tiny"
    shutil.copytree(tiny_root, root)
    made = json.loads((root / MARKER).read_text())  # the tiny set's generation settings, as the profile's
    overrides = {"data.root": str(root), "output_root": str(tmp_path)} | {
        f"synth.{f.name}": made[f.name] for f in dataclasses.fields(SynthConfig)}
    assert prepare_data(load_config("smoke", overrides), ["cityscapes"]) == ["cityscapes"]  # its marker read
    (root / MARKER).write_text("{}")  # a check now would find settings that differ: none is made
    assert prepare_data(load_config("smoke", overrides), ["cityscapes"]) == []
    with pytest.raises(UserError, match="was generated with"):  # other settings: checked
        prepare_data(load_config("smoke", overrides | {"synth.seed": 4}), ["cityscapes"])
    shutil.rmtree(root)
    with pytest.raises(UserError, match="does not exist, and data.generate would create"):
        prepare_data(load_config("smoke", overrides), ["cityscapes"])


def test_mlflow_tracking_uri_from_the_environment(monkeypatch, tmp_path):
    from segstudy import tracking
    from segstudy.config import TrackingConfig
    from segstudy.tracking import mlflow_uri

    monkeypatch.setattr(tracking, "ENV_TRACKING_URI", None)
    assert mlflow_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # what mlflow.set_tracking_uri leaves
    assert mlflow_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setattr(tracking, "ENV_TRACKING_URI", "http://mlflow:5000")  # the user's, at start
    assert mlflow_uri(TrackingConfig(), tmp_path) == "http://mlflow:5000"
    assert mlflow_uri(TrackingConfig(uri="sqlite:///x.db"), tmp_path) == "sqlite:///x.db"  # the profile's wins
