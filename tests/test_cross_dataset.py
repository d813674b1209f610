"""The cross-dataset path: the BDD100K and nuImages readers on samples the tests write, the mixed
sampler's documented shares, `segstudy evaluate --dataset` against a hand computation, and one clear
error for each kind of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segstudy.cli import main
from segstudy.data import nuimages
from segstudy.data.bdd100k import BDD100KSegmentation
from segstudy.data.datasets import MixedDatasets, check_files
from segstudy.data.labels import IGNORE_INDEX, TRAIN_ID_TO_LABEL_ID, name_to_train_id
from segstudy.data.nuimages import NuImagesSegmentation, mask_encode
from segstudy.engine.metrics import ConfusionMatrix, scored_on
from segstudy.errors import UserError

ROAD, PERSON, CAR, BUILDING = (name_to_train_id(n) for n in ("road", "person", "car", "building"))


# ------------------------------------------------------------------ a tiny nuImages sample

def _token(*parts) -> str:
    return "-".join(map(str, parts))


def write_nuimages(root: Path, categories=None, image_size=(12, 8), mask_size=(12, 8), key_frame=True) -> dict:
    """One key-frame image (w x h = 12 x 8) with: a road surface (rows 4-7), a car over the road (rows
    5-6, cols 0-3), a barrier (unmapped) over the road (row 7, cols 8-11), a child (person) at rows
    1-3, cols 5-6, and an ego-vehicle surface nowhere. Returns the expected train ids."""
    w, h = mask_size
    categories = categories or [*nuimages.NUIMAGES_TO_TRAIN, *nuimages.UNMAPPED]
    folder = root / "v1.0-val"
    folder.mkdir(parents=True)
    (root / "samples" / "CAM_FRONT").mkdir(parents=True)
    Image.new("RGB", image_size, (90, 90, 90)).save(root / "samples/CAM_FRONT/frame_a.jpg")

    def mask(rows, cols):
        m = np.zeros((h, w), np.uint8)
        m[rows, cols] = 1
        return mask_encode(m)

    cat = {c: _token("cat", c) for c in categories}
    surfaces = [{"token": "s1", "sample_data_token": "sd1", "category_token": cat["flat.driveable_surface"],
                 "mask": mask(slice(4, 8), slice(0, w))}] if "flat.driveable_surface" in cat else []
    objects = [  # token order decides the drawing order: the barrier (o3) is drawn last
        {"token": "o1", "sample_data_token": "sd1", "category_token": cat["vehicle.car"],
         "mask": mask(slice(5, 7), slice(0, 4)), "attribute_tokens": [], "bbox": [0, 5, 4, 7]},
        {"token": "o2", "sample_data_token": "sd1", "category_token": cat["human.pedestrian.child"],
         "mask": mask(slice(1, 4), slice(5, 7)), "attribute_tokens": [], "bbox": [5, 1, 7, 4]},
        {"token": "o3", "sample_data_token": "sd1", "category_token": cat["movable_object.barrier"],
         "mask": mask(slice(7, 8), slice(8, 12)), "attribute_tokens": [], "bbox": [8, 7, 12, 8]},
    ]
    tables = {
        "category": [{"token": t, "name": c, "description": ""} for c, t in cat.items()],
        "sample_data": [{"token": "sd1", "sample_token": "s", "filename": "samples/CAM_FRONT/frame_a.jpg",
                         "fileformat": "jpg", "width": image_size[0], "height": image_size[1],
                         "timestamp": 1, "is_key_frame": key_frame}],
        "object_ann": objects, "surface_ann": surfaces,
    }
    for name, rows in tables.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))
    expected = np.full((h, w), IGNORE_INDEX, np.uint8)
    expected[4:8, :] = ROAD
    expected[5:7, 0:4] = CAR
    expected[1:4, 5:7] = PERSON
    expected[7, 8:12] = IGNORE_INDEX
    return {"train_ids": expected}


def test_nuimages_masks_map_onto_the_train_ids_exactly(tmp_path):
    want = write_nuimages(tmp_path)
    ds = NuImagesSegmentation(tmp_path, "val")
    check_files(ds, "val")
    assert [s.stem for s in ds.samples] == ["frame_a"]  # named like segstudy predict's outputs
    np.testing.assert_array_equal(ds.load_train_ids(ds.samples[0]), want["train_ids"])
    image, target = ds[0]
    assert tuple(image.shape) == (3, 8, 12) and int((target == IGNORE_INDEX).sum()) == int(
        (want["train_ids"] == IGNORE_INDEX).sum())
    assert ds.classes == tuple(sorted(name_to_train_id(n) for n in
                                      ("road", "person", "car", "truck", "bus", "motorcycle", "bicycle")))


def test_a_dataset_is_scored_only_on_the_classes_it_labels():
    """A building predicted on a nuImages road pixel is a missed road pixel, not a building error:
    building's IoU is absent, and the mean is over the labelled classes."""
    cm = ConfusionMatrix(per_image=True)
    import torch
    target = torch.tensor([[ROAD, ROAD, ROAD, CAR]])
    pred = torch.tensor([[ROAD, ROAD, BUILDING, CAR]])
    cm.update(target, pred)
    scored = ConfusionMatrix.from_per_image(scored_on(cm.per_image, nuimages.LABELLED)).compute()
    assert scored["iou"]["road"] == pytest.approx(2 / 3) and scored["iou"]["car"] == 1.0
    assert math.isnan(scored["iou"]["building"])
    assert scored["miou"] == pytest.approx((2 / 3 + 1) / 2)
    assert cm.compute()["iou"]["building"] == 0.0  # unrestricted, building would drag the mean down


def test_nuimages_bad_input_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(UserError, match=r"not in nuImages layout: expected the folder .*v1.0-val"):
        NuImagesSegmentation(tmp_path, "val")
    write_nuimages(tmp_path / "sizes", mask_size=(10, 8))  # masks 10 wide, the image 12
    with pytest.raises(UserError, match=r"mask of .*frame_a.jpg .* is 10x8, but the image is 12x8"):
        check_files(NuImagesSegmentation(tmp_path / "sizes", "val"), "val")
    write_nuimages(tmp_path / "empty", key_frame=False)
    with pytest.raises(UserError, match=r"sample_data.json lists no key-frame image .* split is empty"):
        NuImagesSegmentation(tmp_path / "empty", "val")
    no_bus = [c for c in [*nuimages.NUIMAGES_TO_TRAIN, *nuimages.UNMAPPED] if not c.startswith("vehicle.bus")]
    write_nuimages(tmp_path / "mapping", categories=no_bus)
    with pytest.raises(UserError, match=r"category.json has none of the categories vehicle.bus.bendy, "
                                        r"vehicle.bus.rigid, so the class 'bus' would be unlabelled everywhere"):
        NuImagesSegmentation(tmp_path / "mapping", "val")


# ------------------------------------------------------------------ BDD100K

def write_bdd(root: Path, masks: list[np.ndarray], split: str = "val") -> list[str]:
    img_dir, mask_dir = root / "images/10k" / split, root / "labels/sem_seg/masks" / split
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    names = []
    for k, m in enumerate(masks):
        name = f"0000000{k}-aaaaaaaa"
        Image.new("RGB", (m.shape[1], m.shape[0])).save(img_dir / f"{name}.jpg")
        Image.fromarray(m.astype(np.uint8)).save(mask_dir / f"{name}.png")
        names.append(name)
    return names


def test_bdd100k_reads_train_ids_and_keeps_ignored_pixels(tmp_path):
    mask = np.array([[ROAD, ROAD, 255], [CAR, PERSON, 255]])
    write_bdd(tmp_path, [mask])
    ds = BDD100KSegmentation(tmp_path, "val")
    check_files(ds, "val")
    np.testing.assert_array_equal(ds.load_train_ids(ds.samples[0]), mask)
    assert ds.classes == tuple(range(19))


def test_bdd100k_bad_input(tmp_path):
    with pytest.raises(UserError, match=r"not in BDD100K layout: expected the folder .*images/10k/val"):
        BDD100KSegmentation(tmp_path, "val")
    write_bdd(tmp_path / "ids", [np.array([[ROAD, 30]])])
    ds = BDD100KSegmentation(tmp_path / "ids", "val")
    with pytest.raises(UserError, match=r"is not a BDD100K sem_seg mask: expected one channel of train ids"):
        ds.load_train_ids(ds.samples[0])
    names = write_bdd(tmp_path / "sizes", [np.zeros((4, 6))])
    Image.new("RGB", (5, 4)).save(tmp_path / "sizes/images/10k/val" / f"{names[0]}.jpg")
    with pytest.raises(UserError, match=r"size mismatch in the val split: image .*jpg is 5x4 but its label"):
        check_files(BDD100KSegmentation(tmp_path / "sizes", "val"), "val")
    (tmp_path / "empty/images/10k/val").mkdir(parents=True)
    (tmp_path / "empty/labels/sem_seg/masks/val").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds no .jpg images"):
        BDD100KSegmentation(tmp_path / "empty", "val")


def test_evaluate_dataset_bdd100k_equals_a_hand_computation(tmp_path, capsys):
    """Two 2x3 images. Road: truth 5 px, predicted 4 of them + 1 car px -> IoU 4/6. Car: truth 2 px,
    1 hit, 1 predicted road, plus the road px predicted car -> 1/3. Person: truth 1, hit -> 1.
    Ignored pixels count nowhere. mIoU = (4/6 + 1/3 + 1) / 3."""
    gts = [np.array([[ROAD, ROAD, ROAD], [CAR, PERSON, 255]]), np.array([[ROAD, ROAD, 255], [CAR, 255, 255]])]
    preds = [np.array([[ROAD, ROAD, CAR], [CAR, PERSON, BUILDING]]), np.array([[ROAD, ROAD, CAR], [ROAD, 0, 0]])]
    names = write_bdd(tmp_path / "bdd", gts)
    (tmp_path / "pred").mkdir()
    for name, pred in zip(names, preds):
        Image.fromarray(TRAIN_ID_TO_LABEL_ID[pred]).save(tmp_path / "pred" / f"{name}_labelIds.png")
    main(["evaluate", "--dataset", "bdd100k", "--data-root", str(tmp_path / "bdd"), "--pred-dir",
          str(tmp_path / "pred"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["iou"]["road"] == pytest.approx(4 / 6)
    assert result["iou"]["car"] == pytest.approx(1 / 3)
    assert result["iou"]["person"] == pytest.approx(1.0)
    assert result["miou"] == pytest.approx((4 / 6 + 1 / 3 + 1) / 3)
    assert result["n_images"] == 2 and result["dataset"] == "bdd100k"


def test_evaluate_dataset_names_a_missing_prediction(tmp_path, capsys):
    write_bdd(tmp_path / "bdd", [np.zeros((2, 2))])
    (tmp_path / "pred").mkdir()
    code = main(["evaluate", "--dataset", "bdd100k", "--data-root", str(tmp_path / "bdd"), "--pred-dir",
                 str(tmp_path / "pred")])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "no prediction for 1 of 1 images" in err and "the image's name + _labelIds.png" in err


# ------------------------------------------------------------------ the mixed sampler

class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("sampling, sizes, shares", [
    ("equal", [10, 3], [5, 5]),          # the small dataset gives as many as the large one (cycled)
    ("equal", [7, 40, 5], [3, 2, 2]),    # 7 / 3: the remainder to the first
    ("proportional", [10, 30], [3, 7]),  # 10 x 10/40 = 2.5, 10 x 30/40 = 7.5: ties to the first
])
def test_mixed_epoch_draws_the_documented_shares(sampling, sizes, shares):
    mixed = MixedDatasets([_Sized(n) for n in sizes], sampling)
    assert mixed.epoch_size == sizes[0] and mixed.shares() == shares
    order = mixed.order(seed=0, epoch=0)
    assert len(order) == sizes[0]
    bounds = np.cumsum([0, *sizes])
    drawn = [[i - bounds[k] for i in order if bounds[k] <= i < bounds[k + 1]] for k in range(len(sizes))]
    assert [len(d) for d in drawn] == shares
    for d, n in zip(drawn, sizes):  # without replacement until a dataset runs out
        assert len(set(d)) == min(len(d), n)
    assert order == mixed.order(seed=0, epoch=0) and order != mixed.order(seed=0, epoch=1)


def test_a_mixed_training_takes_as_many_steps_as_alone(tmp_path, tiny_root):
    from segstudy.config import SynthConfig
    from segstudy.config_profiles import load_config
    from segstudy.data.synthetic.dataset import generate
    from segstudy.engine.training import train
    from segstudy.studies.cross_dataset import train_mixed

    bdd = tmp_path / "bdd"
    generate(bdd, SynthConfig(train=3, val=2, height=72, width=128, seed=1), workers=1, progress=False,
             layout="bdd100k")
    cfg = load_config("smoke", {"data.root": str(tiny_root), "data.generate": False, "train.epochs": 1,
                                "output_root": str(tmp_path / "out"), "tracking.backend": "none",
                                "cross.bdd100k.root": str(bdd), "cross.bdd100k.generate": False,
                                "cross.nuimages.root": "", "cross.mix": ["bdd100k"]})
    alone = train(cfg, progress=False)
    mixed = train_mixed(cfg)["custom+bdd100k"]
    assert mixed["steps"] == alone["steps"] == 8 // cfg.data.batch_size  # the tiny set: 8 training images
    assert mixed["settings"]["data.mix_with"] == ["bdd100k"] and "data.mix_with" not in alone["settings"]


def test_a_bad_mask_in_a_mixed_dataset_stops_the_training_before_it_starts(tmp_path, tiny_root):
    from segstudy.config import SynthConfig
    from segstudy.config_profiles import load_config
    from segstudy.data.synthetic.dataset import generate
    from segstudy.studies.cross_dataset import train_mixed

    bdd = tmp_path / "bdd"
    generate(bdd, SynthConfig(train=3, val=2, height=72, width=128, seed=1), workers=1, progress=False,
             layout="bdd100k")
    bad = sorted((bdd / "labels/sem_seg/masks/train").glob("*.png"))[-1]
    Image.fromarray(np.full((72, 128), 40, np.uint8)).save(bad)
    cfg = load_config("smoke", {"data.root": str(tiny_root), "data.generate": False, "output_root": str(tmp_path / "o"),
                                "tracking.backend": "none", "cross.bdd100k.root": str(bdd),
                                "cross.bdd100k.generate": False, "cross.nuimages.root": "", "cross.mix": ["bdd100k"]})
    with pytest.raises(UserError, match=f"{bad.name} is not a BDD100K sem_seg mask"):
        train_mixed(cfg)
    assert not list((tmp_path / "o").rglob("checkpoint_*.pt"))


def test_the_drop_off_the_training_domain_is_scored_over_the_other_datasets_classes():
    """A model perfect on its own road and car pixels but not on its buildings, and half right on another
    dataset that labels only road and car: the drop is measured over road and car (100 -> 50), not 19."""
    from segstudy.studies.cross_dataset import add_drops

    def image(truth: list[int], pred: list[int]) -> np.ndarray:
        m = np.zeros((19, 20), np.int64)
        for t, p in zip(truth, pred):
            m[t, p] += 1
        return m

    home = np.stack([image([ROAD, CAR, BUILDING], [ROAD, CAR, ROAD])] * 6)
    away = np.stack([image([ROAD, ROAD, CAR, CAR], [ROAD, CAR, CAR, ROAD])] * 6)
    rows = [{"model": "m", "dataset": "cityscapes", "classes": [], "per_image": home},
            {"model": "m", "dataset": "nuimages", "classes": ["road", "car"], "per_image": away}]
    add_drops(rows, "cityscapes")
    assert rows[1]["drop"]["mean"] == pytest.approx(1 / 3 - 1.0)  # IoU 1/3 each away (2 of 6), 1 at home
    assert "drop" not in rows[0]


def test_the_tables_of_a_one_image_split_say_no_spread():
    """The rehearsal's val splits hold one image: its bounds are saved as null (JSON has no infinity)."""
    from segstudy.studies.cross_dataset import drop_figure, drop_table, table

    rows = [{"model": "custom", "trained on": ["cityscapes"], "dataset": "cityscapes", "miou": 0.1, "low": None,
             "high": None, "classes": list(range(19))},
            {"model": "custom", "trained on": ["cityscapes"], "dataset": "nuimages", "miou": 0.2, "low": None,
             "high": None, "classes": list(range(7)), "drop": {"mean": 0.05, "low": None, "high": None}}]
    assert table(rows).iloc[0].tolist() == ["10.0 [no spread]", "20.0 [no spread]"]
    assert drop_table(rows).loc["custom", "nuimages"] == "+5.0 [no spread]"
    assert drop_figure(rows) is not None
