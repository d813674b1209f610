"""nuImages, the 2D part of NuScenes: key-frame camera images with instance masks of objects and
masks of surfaces, mapped onto the 19 Cityscapes train ids where a class exists (NUIMAGES_TO_TRAIN).

Layout (nuImages v1.0, as its devkit reads it):
    ROOT/v1.0-{split}/{category,sample_data,object_ann,surface_ann}.json
    ROOT/samples/CAM_*/<name>.jpg            (sample_data.filename, relative to ROOT)

Masks are COCO run-length encodings whose `counts` are base64 text; decoded as the devkit's
`nuimages.utils.utils.mask_decode` does (base64, then pycocotools). nuscenes-devkit itself is not a
dependency: its 1.2.0 requires numpy<2, and the study's environment has numpy 2.
A semantic mask is drawn as the devkit's `NuImages.get_segmentation` draws it: surfaces first, then
objects in token order, each over what came before; a category outside the mapping is drawn as
ignored (255), so a barrier standing on the road is not road.
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import json
import sys
import typing
import warnings
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask
from pydantic import PositiveInt, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict only from Python 3.12

from segstudy.data.cityscapes import Sample, SegmentationFolder
from segstudy.data.labels import IGNORE_INDEX, name_to_train_id
from segstudy.errors import UserError

TABLES = ("category", "sample_data", "object_ann", "surface_ann")

# nuImages v1.0 category -> Cityscapes train class. Source: the category list of the nuImages paper
# and devkit (nuimages/README, "Categories"), read against the Cityscapes class definitions
# (cityscapesscripts.helpers.labels). Riders are part of their bicycle's or motorcycle's annotation
# in nuScenes, so `rider` has no counterpart; nothing maps to the static classes (building, sky, ...).
NUIMAGES_TO_TRAIN = {
    "flat.driveable_surface": "road",
    "human.pedestrian.adult": "person",
    "human.pedestrian.child": "person",
    "human.pedestrian.construction_worker": "person",
    "human.pedestrian.police_officer": "person",
    "vehicle.car": "car",
    "vehicle.emergency.police": "car",
    "vehicle.truck": "truck",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.bicycle": "bicycle",
}
# The rest of nuImages v1.0's categories: annotated, but ignored (255) here.
UNMAPPED = (
    "animal", "human.pedestrian.personal_mobility", "human.pedestrian.stroller", "human.pedestrian.wheelchair",
    "movable_object.barrier", "movable_object.debris", "movable_object.pushable_pullable",
    "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.construction",
    "vehicle.emergency.ambulance", "vehicle.ego", "vehicle.trailer",
)
LABELLED = tuple(sorted({name_to_train_id(name) for name in NUIMAGES_TO_TRAIN.values()}))  # the classes scored


class RleMask(TypedDict):
    size: tuple[PositiveInt, PositiveInt]  # [h, w]
    counts: str  # base64 of pycocotools' compressed counts


class CategoryRecord(TypedDict):
    token: str
    name: str


class SampleDataRecord(TypedDict):
    token: str
    filename: str
    width: PositiveInt
    height: PositiveInt
    is_key_frame: bool


class AnnotationRecord(TypedDict):  # object_ann and surface_ann
    token: str
    sample_data_token: str
    category_token: str
    mask: RleMask | None  # None: an annotation without a mask, which the devkit skips too


# The fields segstudy reads of each table's records (the tables hold more; the rest is dropped).
RECORDS = {"category": CategoryRecord, "sample_data": SampleDataRecord, "object_ann": AnnotationRecord,
           "surface_ann": AnnotationRecord}
MASK_FORM = "mask ({'size': [h, w], 'counts': base64 text} or null)"


def mask_decode(mask: dict, exact: bool = False) -> np.ndarray:
    """An nuImages mask ({'size': [h, w], 'counts': base64 text}) -> uint8 [h, w] of 0/1; ValueError
    saying why for counts that are not base64 or not a COCO run-length encoding of h x w pixels, and
    with `exact`, for runs that stop short of h x w (found by re-encoding the mask: the labels' one
    check, NuImagesSegmentation.check_label, not every load)."""
    try:
        counts = base64.b64decode(mask["counts"], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"its counts are not base64 text ({exc})") from None
    h, w = mask["size"]
    with warnings.catch_warnings():  # pycocotools 2.0's __array__ predates numpy 2's copy keyword: harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            binary = coco_mask.decode({"size": [h, w], "counts": counts})
        except ValueError as exc:  # pycocotools refuses runs past h x w, and bytes that are no run length
            raise ValueError(f"its counts are not a COCO run-length encoding of {w}x{h} pixels ({exc})") from None
        # runs that stop short of h x w leave the rest of pycocotools' buffer unset (whatever memory held);
        # its own encoding of what it decoded differs from the counts exactly then
        if exact and coco_mask.encode(np.asfortranarray(binary))["counts"] != counts:
            raise ValueError(f"its run lengths do not cover its {w}x{h} pixels exactly")
    return binary


def mask_encode(binary: np.ndarray) -> dict:
    """The inverse of mask_decode (how the generated nuImages-layout set stores its masks)."""
    rle = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": base64.b64encode(rle["counts"]).decode("ascii")}


@functools.cache
def _records(name: str) -> TypeAdapter:
    return TypeAdapter(list[RECORDS[name]])


def _table(folder: Path, name: str) -> list[dict]:
    path = folder / f"{name}.json"
    try:
        return _records(name).validate_json(path.read_bytes())
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc}); download the {folder.name} tables again") from None
    except ValidationError as exc:
        raise UserError(_table_problem(path, name, exc.errors()[0])) from None


def _table_problem(path: Path, name: str, error: dict) -> str:
    """pydantic's first complaint about a table -> one line naming the record, the field and the form."""
    fields = ", ".join(MASK_FORM if f == "mask" else f for f in typing.get_type_hints(RECORDS[name]))
    loc, advice = error["loc"], f"each record must hold {fields}, as in nuImages v1.0"
    if error["type"] == "json_invalid":
        return f"{path} is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')}); download it again"
    if not loc:
        return f"{path}: expected a JSON list of records, found {_short(error['input'])}; {advice}"
    if len(loc) == 1:
        return f"{path}: record {loc[0]}: expected a record (a JSON object), found {_short(error['input'])}; {advice}"
    record = json.loads(path.read_bytes())[loc[0]]  # the failing record as written (the error path only)
    named = list(itertools.takewhile(lambda part: isinstance(part, str), loc[1:]))
    value = functools.reduce(lambda v, key: v.get(key) if isinstance(v, dict) else None, named, record)
    inner = ".".join(map(str, loc[1 + len(named):]))
    why = f"{'item ' + inner + ': ' if inner else ''}{error['msg'][0].lower()}{error['msg'][1:]}"
    found = "is missing" if value is None and error["type"] == "missing" else f"is {_short(value)} ({why})"
    return f"{path}: record {loc[0]} (token {record.get('token', '?')}): {'.'.join(named)} {found}; {advice}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.lru_cache(maxsize=8)
def _index(folder: Path, stamp: float) -> dict:
    """The split's tables, indexed: key-frame sample_data by token, annotations by sample_data token
    (each as (drawing order, category name, mask, table, annotation token))."""
    del stamp  # part of the cache key only: a table rewritten on disk is read again
    tables = {name: _table(folder, name) for name in TABLES}
    names = {c["token"]: c["name"] for c in tables["category"]}
    _check_mapping(folder / "category.json", set(names.values()))
    anns: dict[str, list[tuple[int, str, dict, str, str]]] = {}
    for order, kind in enumerate(("surface_ann", "object_ann")):
        for ann in sorted(tables[kind], key=lambda a: a["token"]) if kind == "object_ann" else tables[kind]:
            if ann["category_token"] not in names:
                raise UserError(f"{folder / (kind + '.json')}: annotation {ann['token']} has category token "
                                f"{ann['category_token']}, which {folder / 'category.json'} does not list; "
                                f"the tables are from different versions: download the split again")
            if ann["mask"] is not None:
                anns.setdefault(ann["sample_data_token"], []).append(
                    (order, names[ann["category_token"]], ann["mask"], kind, ann["token"]))
    frames = {sd["token"]: sd for sd in tables["sample_data"] if sd["is_key_frame"]}
    # predictions are named after the image file (segstudy predict), so samples are too
    stems = {Path(sd["filename"]).stem: token for token, sd in frames.items()}
    unknown = sorted(set(names.values()) - {*NUIMAGES_TO_TRAIN, *UNMAPPED})
    return {"frames": frames, "anns": anns, "stems": stems, "unknown": unknown}


def _check_mapping(path: Path, present: set[str]) -> None:
    """Each class the mapping scores must come from a category the tables have, or its IoU would be
    scored on a dataset that never labels it."""
    for train_id in LABELLED:
        sources = [c for c, t in NUIMAGES_TO_TRAIN.items() if name_to_train_id(t) == train_id]
        if not present & set(sources):
            raise UserError(f"{path} has none of the categories {', '.join(sources)}, so the class "
                            f"'{NUIMAGES_TO_TRAIN[sources[0]]}' would be unlabelled everywhere; use the "
                            f"nuImages v1.0 tables, or update NUIMAGES_TO_TRAIN in {__file__}")


def split_folder(root: str | Path, split: str) -> Path:
    return Path(root) / f"v1.0-{split}"


def _indexed(root: Path, split: str) -> dict:
    folder = split_folder(root, split)
    layout = f"{folder.name}/ with {', '.join(t + '.json' for t in TABLES)}, and samples/CAM_*/*.jpg"
    if not folder.is_dir():
        raise UserError(f"{root} is not in nuImages layout: expected the folder {folder} ({layout})")
    missing = [f"{t}.json" for t in TABLES if not (folder / f"{t}.json").is_file()]
    if missing:
        raise UserError(f"{root} is not in nuImages layout: {folder} lacks {', '.join(missing)} ({layout}); "
                        f"point the root at the folder that holds {folder.name}/ and samples/")
    return _index(folder, max((folder / f"{t}.json").stat().st_mtime for t in TABLES))


def nuimages_samples(root: str | Path, split: str) -> list[Sample]:
    root = Path(root)
    index = _indexed(root, split)
    if not index["frames"]:
        raise UserError(f"{split_folder(root, split) / 'sample_data.json'} lists no key-frame image "
                        f"(is_key_frame: true); the {split} split is empty")
    samples = []
    for token, frame in sorted(index["frames"].items(), key=lambda kv: kv[1]["filename"]):
        image = root / frame["filename"]
        if not image.is_file():
            raise UserError(f"{image} (sample_data {token}) does not exist; download nuImages' samples/ "
                            f"into {root}")
        # the label "file" is the annotation table: its modification time keys the decoded cache
        samples.append(Sample(image, split_folder(root, split) / "object_ann.json", image.stem))
    return samples


class NuImagesSegmentation(SegmentationFolder):
    classes = LABELLED

    def __init__(self, root: str | Path, split: str, transforms=None, max_images: int = 0, cache_mb: int = 0):
        self.root, self.split = Path(root), split
        samples = nuimages_samples(root, split)
        super().__init__(samples[:max_images] if max_images else samples, transforms, cache_mb)
        if unknown := _indexed(self.root, split)["unknown"]:  # once per reader, not per image
            print(f"[segstudy] {split_folder(root, split) / 'category.json'} lists categories segstudy does "
                  f"not know: {', '.join(unknown)}; their annotations count as ignored (255) (map them in "
                  f"NUIMAGES_TO_TRAIN or list them in UNMAPPED in {__file__})", file=sys.stderr, flush=True)

    def _frame(self, sample: Sample) -> tuple[dict, list]:
        index = _indexed(self.root, self.split)
        token = index["stems"][sample.stem]
        return index["frames"][token], index["anns"].get(token, [])

    def label_size(self, sample: Sample) -> tuple[int, int]:
        """(width, height) of every mask of the image, which must all agree with the table's size."""
        frame, anns = self._frame(sample)
        size = (frame["width"], frame["height"])
        for _, category, mask, table, token in anns:
            if tuple(mask["size"][::-1]) != size:
                raise UserError(f"{sample.label.parent / table}.json: annotation {token}: the {category} mask of "
                                f"{sample.image} (sample_data {frame['token']}) is {mask['size'][1]}x"
                                f"{mask['size'][0]}, but the image is {size[0]}x{size[1]} (sample_data.json); "
                                f"the tables do not belong to these images")
        return size

    def load_train_ids(self, sample: Sample) -> np.ndarray:
        return self._train_ids(sample, exact=False)

    def check_label(self, sample: Sample) -> np.ndarray:
        """The train ids, every mask's run lengths checked to cover its pixels exactly (re-encoding it)."""
        return self._train_ids(sample, exact=True)

    def _train_ids(self, sample: Sample, exact: bool) -> np.ndarray:
        frame, anns = self._frame(sample)
        self.label_size(sample)
        out = np.full((frame["height"], frame["width"]), IGNORE_INDEX, np.uint8)
        for _, category, mask, table, token in sorted(anns, key=lambda a: a[0]):  # surfaces, then objects
            try:
                binary = mask_decode(mask, exact)
            except ValueError as exc:
                raise UserError(f"{sample.label.parent / table}.json: annotation {token} ({category}) of "
                                f"{sample.image}: {exc}; expected {MASK_FORM} as nuImages v1.0 writes it: "
                                f"download the {sample.label.parent.name} tables again") from None
            target = NUIMAGES_TO_TRAIN.get(category)
            out[binary.astype(bool)] = name_to_train_id(target) if target else IGNORE_INDEX
        return out
