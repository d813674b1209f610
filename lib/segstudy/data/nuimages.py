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
import functools
import json
import warnings
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

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


def mask_decode(mask: dict) -> np.ndarray:
    """An nuImages mask ({'size': [h, w], 'counts': base64 text}) -> uint8 [h, w] of 0/1."""
    with warnings.catch_warnings():  # pycocotools 2.0's __array__ predates numpy 2's copy keyword: harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode({"size": mask["size"], "counts": base64.b64decode(mask["counts"])})


def mask_encode(binary: np.ndarray) -> dict:
    """The inverse of mask_decode (how the generated nuImages-layout set stores its masks)."""
    rle = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": base64.b64encode(rle["counts"]).decode("ascii")}


def _table(folder: Path, name: str) -> list[dict]:
    path = folder / f"{name}.json"
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder.parent} is not in nuImages layout: {path} is missing (ROOT/v1.0-<split>/ "
                        f"holds {', '.join(t + '.json' for t in TABLES)}); point the root at the folder "
                        f"that holds v1.0-train/ and samples/") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable nuImages table ({exc}); download it again") from None
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a JSON list of records, as nuImages v1.0 tables do")
    return rows


@functools.lru_cache(maxsize=8)
def _index(folder: Path, stamp: float) -> dict:
    """The split's tables, indexed: key-frame sample_data by token, annotations by sample_data token."""
    del stamp  # part of the cache key only: a table rewritten on disk is read again
    tables = {name: _table(folder, name) for name in TABLES}
    names = {c["token"]: c["name"] for c in tables["category"]}
    _check_mapping(folder / "category.json", set(names.values()))
    anns: dict[str, list[tuple[int, str, dict]]] = {}
    for order, kind in enumerate(("surface_ann", "object_ann")):
        for ann in sorted(tables[kind], key=lambda a: a["token"]) if kind == "object_ann" else tables[kind]:
            if ann["category_token"] not in names:
                raise UserError(f"{folder / (kind + '.json')}: annotation {ann['token']} has category token "
                                f"{ann['category_token']}, which {folder / 'category.json'} does not list; "
                                f"the tables are from different versions: download the split again")
            if ann.get("mask") is not None:
                anns.setdefault(ann["sample_data_token"], []).append((order, names[ann["category_token"]],
                                                                      ann["mask"]))
    frames = {sd["token"]: sd for sd in tables["sample_data"] if sd.get("is_key_frame")}
    # predictions are named after the image file (segstudy predict), so samples are too
    stems = {Path(sd["filename"]).stem: token for token, sd in frames.items()}
    return {"frames": frames, "anns": anns, "stems": stems}


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
    if not folder.is_dir():
        raise UserError(f"{root} is not in nuImages layout: expected the folder {folder} (v1.0-{split}/ with "
                        f"{', '.join(t + '.json' for t in TABLES)}, and samples/CAM_*/*.jpg)")
    stamp = max((folder / f"{t}.json").stat().st_mtime for t in TABLES if (folder / f"{t}.json").is_file())
    return _index(folder, stamp)


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

    def _frame(self, sample: Sample) -> tuple[dict, list]:
        index = _indexed(self.root, self.split)
        token = index["stems"][sample.stem]
        return index["frames"][token], index["anns"].get(token, [])

    def label_size(self, sample: Sample) -> tuple[int, int]:
        """(width, height) of every mask of the image, which must all agree with the table's size."""
        frame, anns = self._frame(sample)
        size = (frame["width"], frame["height"])
        for _, category, mask in anns:
            if tuple(mask["size"][::-1]) != size:
                raise UserError(f"a {category} mask of {sample.image} in {sample.label.parent} is "
                                f"{mask['size'][1]}x{mask['size'][0]}, but the image is {size[0]}x{size[1]} "
                                f"(sample_data.json); the tables do not belong to these images")
        return size

    def load_train_ids(self, sample: Sample) -> np.ndarray:
        frame, anns = self._frame(sample)
        self.label_size(sample)
        out = np.full((frame["height"], frame["width"]), IGNORE_INDEX, np.uint8)
        for _, category, mask in sorted(anns, key=lambda a: a[0]):  # surfaces, then objects
            target = NUIMAGES_TO_TRAIN.get(category)
            out[mask_decode(mask).astype(bool)] = name_to_train_id(target) if target else IGNORE_INDEX
        return out
