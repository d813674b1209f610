"""Malformed annotations of every dataset reader: each is one line naming the file, the record and what
was expected (RLE, JSON, table shapes, sizes, ids, empty folders); unknown nuImages categories are
reported once per reader; a wrong ground truth is blamed on its own file, not on the prediction."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segstudy.cli import main
from segstudy.data.bdd100k import BDD100KSegmentation
from segstudy.data.cityscapes import cityscapes_samples
from segstudy.data.datasets import check_files, check_labels
from segstudy.data.labels import IGNORE_INDEX
from segstudy.data.nuimages import NuImagesSegmentation, mask_encode
from segstudy.errors import UserError
from tests.test_cross_dataset import write_bdd, write_nuimages


def _edit_table(root: Path, table: str, edit) -> Path:
    path = root / "v1.0-val" / f"{table}.json"
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))
    return path


def _evaluate(dataset: str, data_root: Path, pred_dir: Path, capsys) -> tuple[int, str]:
    code = main(["evaluate", "--dataset", dataset, "--data-root", str(data_root), "--pred-dir", str(pred_dir),
                 "--json"])
    return code, capsys.readouterr().err


def _predict_zeros(pred_dir: Path, names: list[str], size: tuple[int, int]) -> None:
    pred_dir.mkdir()
    for name in names:
        Image.new("L", size).save(pred_dir / f"{name}_labelIds.png")


# ------------------------------------------------------------------ nuImages masks

def _valid_counts() -> str:
    mask = np.zeros((8, 12), np.uint8)
    mask[5:7, 0:4] = 1
    return mask_encode(mask)["counts"]


@pytest.mark.parametrize("counts, why", [
    ("not base64!", "not base64 text"),
    (base64.b64encode(b"zzzzzzzz").decode(), "not a COCO run-length encoding"),
    # valid base64 and valid RLE, but the runs stop short of 8 x 12 pixels: pycocotools would fill
    # the rest of the mask with whatever memory held
    (base64.b64encode(base64.b64decode(_valid_counts())[:-2]).decode(), "do not cover its 12x8 pixels exactly"),
])
def test_a_corrupt_nuimages_mask_is_one_line_naming_the_table_and_annotation(tmp_path, capsys, counts, why):
    write_nuimages(tmp_path / "nu")
    table = _edit_table(tmp_path / "nu", "object_ann", lambda rows: rows[0]["mask"].update(counts=counts))
    with pytest.raises(UserError, match=rf"{table}: annotation o1 \(vehicle.car\) .*{why}"):
        check_labels(NuImagesSegmentation(tmp_path / "nu", "val"), "val", tmp_path / "cache")  # training's check
    _predict_zeros(tmp_path / "pred", ["frame_a"], (12, 8))
    code, err = _evaluate("nuimages", tmp_path / "nu", tmp_path / "pred", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "annotation o1" in err


def test_the_run_length_check_is_the_labels_check_not_every_load(tmp_path):
    """Re-encoding every mask to check its runs is paid once (datasets.check_labels, segstudy evaluate:
    check_label), not in every load of a training."""
    write_nuimages(tmp_path)
    short = base64.b64encode(base64.b64decode(_valid_counts())[:-2]).decode()
    _edit_table(tmp_path, "object_ann", lambda rows: rows[0]["mask"].update(counts=short))
    ds = NuImagesSegmentation(tmp_path, "val")
    assert ds.load_train_ids(ds.samples[0]).shape == (8, 12)
    with pytest.raises(UserError, match=r"annotation o1 \(vehicle.car\) .*do not cover its 12x8 pixels exactly"):
        ds.check_label(ds.samples[0])


def test_a_nuimages_mask_of_another_size_names_its_table_and_annotation(tmp_path):
    write_nuimages(tmp_path, mask_size=(10, 8))
    ds = NuImagesSegmentation(tmp_path, "val")
    with pytest.raises(UserError, match=r"surface_ann.json: annotation s1: the flat.driveable_surface mask of "
                                        r".*frame_a.jpg \(sample_data sd1\) is 10x8, but the image is 12x8"):
        ds.load_train_ids(ds.samples[0])


# ------------------------------------------------------------------ nuImages tables

@pytest.mark.parametrize("table, text, found", [
    ("object_ann", "[{\"token\": \"o1\",", r"object_ann.json is not valid JSON \(.*line 1"),
    ("category", "{\"token\": \"c\"}", r"category.json: expected a JSON list of records"),
    ("object_ann", "[3]", r"object_ann.json: record 0: expected a record \(a JSON object\)"),
])
def test_a_nuimages_table_that_is_no_list_of_records_is_one_line(tmp_path, table, text, found):
    write_nuimages(tmp_path)
    (tmp_path / "v1.0-val" / f"{table}.json").write_text(text)
    with pytest.raises(UserError, match=found):
        NuImagesSegmentation(tmp_path, "val")


@pytest.mark.parametrize("table, edit, found", [
    ("object_ann", lambda rows: rows[1].pop("category_token"),
     r"object_ann.json: record 1 \(token o2\): category_token is missing; each record must hold token, "
     r"sample_data_token, category_token"),
    ("sample_data", lambda rows: rows[0].update(width="wide"),
     r"sample_data.json: record 0 \(token sd1\): width .*'wide'.*; each record must hold token, filename, "
     r"width, height"),
    ("object_ann", lambda rows: rows[2]["mask"].update(size=[8]),
     r"object_ann.json: record 2 \(token o3\): mask.size is \[8\] .*; each record must hold .*"
     r"mask \(\{'size': \[h, w\], 'counts'"),
])
def test_a_nuimages_record_of_the_wrong_shape_names_the_record_and_field(tmp_path, table, edit, found):
    write_nuimages(tmp_path)
    _edit_table(tmp_path, table, edit)
    with pytest.raises(UserError, match=found):
        NuImagesSegmentation(tmp_path, "val")


def test_an_empty_or_incomplete_nuimages_split_folder_names_its_own_split(tmp_path):
    (tmp_path / "empty" / "v1.0-val").mkdir(parents=True)
    with pytest.raises(UserError, match=r"v1.0-val lacks category.json, sample_data.json, object_ann.json, "
                                        r"surface_ann.json"):
        NuImagesSegmentation(tmp_path / "empty", "val")
    write_nuimages(tmp_path / "part")
    (tmp_path / "part" / "v1.0-val" / "surface_ann.json").unlink()
    with pytest.raises(UserError, match=r"v1.0-val lacks surface_ann.json") as raised:
        NuImagesSegmentation(tmp_path / "part", "val")
    assert "v1.0-train" not in str(raised.value) and "holds v1.0-val/ and samples/" in str(raised.value)


def test_unknown_nuimages_categories_are_reported_once_per_reader(tmp_path, capsys):
    write_nuimages(tmp_path)
    _edit_table(tmp_path, "category", lambda rows: rows.extend(
        [{"token": "new1", "name": "vehicle.hovercraft", "description": ""},
         {"token": "new2", "name": "animal.moose", "description": ""}]))
    _edit_table(tmp_path, "object_ann", lambda rows: rows.append(
        {"token": "o4", "sample_data_token": "sd1", "category_token": "new1", "mask": rows[0]["mask"]}))
    ds = NuImagesSegmentation(tmp_path, "val")
    for _ in range(3):
        assert (ds.load_train_ids(ds.samples[0])[5:7, 0:4] == IGNORE_INDEX).all()  # the hovercraft over the car
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "animal.moose, vehicle.hovercraft" in err[0] and "ignored (255)" in err[0] and "category.json" in err[0]


# ------------------------------------------------------------------ BDD100K and Cityscapes wording

@pytest.mark.parametrize("mask, found", [
    (np.array([[7, 26], [255, 11]]), r"found 26; its values 7, 11, 26 look like Cityscapes label ids \(0..33\)"),
    (np.array([[0, 200], [255, 11]]), r"found 200; use the masks of BDD100K's labels/sem_seg/masks/"),
    (np.zeros((2, 2, 3)), r"found 3 channels \(a colour PNG\?\)"),
])
def test_a_bdd100k_mask_that_is_not_train_ids_says_what_it_holds(tmp_path, mask, found):
    write_bdd(tmp_path, [mask])
    ds = BDD100KSegmentation(tmp_path, "val")
    expected = "is not a BDD100K sem_seg mask: expected one channel of train ids 0..18 or 255"
    with pytest.raises(UserError, match=rf"{ds.samples[0].label} {expected}, {found}"):
        ds.load_train_ids(ds.samples[0])


def test_the_split_check_names_the_fix_of_the_one_label_size_rule(tmp_path):
    names = write_bdd(tmp_path, [np.zeros((4, 6))])
    Image.new("RGB", (5, 4)).save(tmp_path / "images/10k/val" / f"{names[0]}.jpg")
    with pytest.raises(UserError, match=r"size mismatch in the val split: image .*jpg is 5x4 but its label .*png is "
                                        r"6x4; labels must have their image's size: replace the label file"):
        check_files(BDD100KSegmentation(tmp_path, "val"), "val")


def test_a_bdd100k_ground_truth_of_the_wrong_size_is_blamed_on_the_mask(tmp_path, capsys):
    names = write_bdd(tmp_path / "bdd", [np.zeros((4, 6))])
    label = tmp_path / "bdd/labels/sem_seg/masks/val" / f"{names[0]}.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(label)
    _predict_zeros(tmp_path / "pred", names, (6, 4))  # the image's size: the prediction is right
    code, err = _evaluate("bdd100k", tmp_path / "bdd", tmp_path / "pred", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"ground truth {label} is 5x4 but its image" in err and "is 6x4" in err and "predict at full size" not in err


def test_a_cityscapes_ground_truth_of_the_wrong_size_is_blamed_on_the_label(tiny_root, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root / "gtFine" / "val", root / "gtFine" / "val")
    (root / "leftImg8bit").symlink_to(tiny_root / "leftImg8bit")
    samples = cityscapes_samples(root, "val")
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(samples[0].label)
    _predict_zeros(tmp_path / "pred", [s.stem for s in samples], (128, 64))
    code, err = _evaluate("cityscapes", root, tmp_path / "pred", capsys)
    assert code == 2 and f"ground truth {samples[0].label} is 20x10 but its image" in err
    assert "predict at full size" not in err


def test_a_prediction_of_the_wrong_size_is_still_blamed_on_the_prediction(tmp_path, capsys):
    names = write_bdd(tmp_path / "bdd", [np.zeros((4, 6))])
    _predict_zeros(tmp_path / "pred", names, (5, 4))  # the image and its mask are 6x4
    code, err = _evaluate("bdd100k", tmp_path / "bdd", tmp_path / "pred", capsys)
    assert code == 2 and "prediction" in err and "predict at full size" in err
