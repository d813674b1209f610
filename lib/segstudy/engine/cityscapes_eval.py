"""Score a folder of predicted labelIds PNGs against a dataset's split (`segstudy evaluate`).

Cityscapes: predictions are matched to ground truth by the `{city}_{seq}_{frame}` part of their file
names, as cityscapesscripts does. Class IoU, category IoU and the instance-weighted iIoU follow
`cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling` exactly (tests compare the two).
BDD100K and nuImages (`--dataset`): matched by the image's file name (`segstudy predict` writes
`<image name>_labelIds.png`), scored by the same definitions over the classes the dataset labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from cityscapesscripts.helpers.labels import category2labels, id2label
from PIL import Image
from tqdm import tqdm

from segstudy.data import labels
from segstudy.data.cityscapes import STEM, check_label_size, read_image, read_label_array
from segstudy.data.datasets import DATASETS
from segstudy.engine.metrics import ConfusionMatrix, nanmean, scored_on
from segstudy.errors import UserError

# Cityscapes' average instance size per class, the weights of iIoU (from the official script).
AVG_CLASS_SIZE = {
    "bicycle": 4672.3249222261, "caravan": 36771.8241758242, "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518, "bus": 35732.1511111111, "train": 67583.7075812274,
    "car": 12794.0202738185, "person": 3462.4756337644, "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}
INSTANCE_CATEGORIES = {cat: [lb.id for lb in lbs if lb.id >= 0] for cat, lbs in category2labels.items()
                       if all(lb.hasInstances for lb in lbs if lb.id >= 0)}


def find_predictions(pred_dir: str | Path, by_name: bool = False) -> dict[str, Path]:
    """Prediction files by the stem they score: Cityscapes' {city}_{seq}_{frame}, or with `by_name`
    the file name less `_labelIds.png` (or `.png`)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder {pred_dir} does not exist; write labelIds PNGs there "
                        f"first (e.g. with segstudy predict)")
    found: dict[str, Path] = {}
    for path in sorted(pred_dir.rglob("*.png")):
        if "color" in path.name:
            continue  # colour overlays written next to the labelIds files
        if by_name:
            found.setdefault(path.name.removesuffix(".png").removesuffix("_labelIds"), path)
        elif match := STEM.search(path.name):
            found.setdefault(match.group(1), path)
    return found


def read_prediction(path: Path, pred_dir: str | Path) -> np.ndarray:
    """A prediction PNG's label ids; a corrupt one is the predictions' fault, not the dataset's."""
    try:
        with Image.open(path) as im:
            return np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"prediction {path} is not a readable PNG (corrupt or truncated: {exc}); write the "
                        f"predictions again (segstudy predict --model MODEL --input IMAGES --out {pred_dir}) "
                        f"or replace the file") from exc


class InstanceStats:
    """Per-instance true/false negatives weighted by Cityscapes' average instance sizes."""

    def __init__(self):
        names = [n for n, has in zip(labels.CLASS_NAMES, labels.HAS_INSTANCES) if has]
        self.cls = {n: [0.0, 0.0] for n in names}  # name -> [tpWeighted, fnWeighted]
        self.cat = {c: [0.0, 0.0] for c in INSTANCE_CATEGORIES}
        # The official category fp also counts predictions of ignored instance classes
        # (caravan, trailer) on other classes' pixels; the train-id matrix cannot see those.
        self.cat_extra_fp = dict.fromkeys(INSTANCE_CATEGORIES, 0)
        self._ignored_ids = {c: [i for i in ids if id2label[i].ignoreInEval]
                             for c, ids in INSTANCE_CATEGORIES.items()}

    def update(self, instance_ids: np.ndarray, pred_label_ids: np.ndarray,
               gt_train_ids: np.ndarray) -> None:
        for cat, ids in self._ignored_ids.items():
            other_gt = (gt_train_ids != labels.IGNORE_INDEX) & ~np.isin(
                gt_train_ids, [i for i, c in enumerate(labels.CLASS_CATEGORIES) if c == cat])
            self.cat_extra_fp[cat] += int((other_gt & np.isin(pred_label_ids, ids)).sum())
        for inst in np.unique(instance_ids[instance_ids > 1000]):
            label = id2label[int(inst // 1000)]
            if label.ignoreInEval:
                continue
            mask = instance_ids == inst
            size = int(mask.sum())
            weight = AVG_CLASS_SIZE[label.name] / size
            tp = int((pred_label_ids[mask] == label.id).sum())
            self.cls[label.name][0] += tp * weight
            self.cls[label.name][1] += (size - tp) * weight
            if label.category in self.cat:
                ctp = int(np.isin(pred_label_ids[mask], INSTANCE_CATEGORIES[label.category]).sum())
                self.cat[label.category][0] += ctp * weight
                self.cat[label.category][1] += (size - ctp) * weight

    def compute(self, cm: ConfusionMatrix) -> dict:
        m = cm.mat.double().cpu().numpy()
        n = cm.n
        class_iiou = {}
        for i, name in enumerate(labels.CLASS_NAMES):
            if name not in self.cls:
                class_iiou[name] = float("nan")
                continue
            tpw, fnw = self.cls[name]
            fp = m[:, i].sum() - m[i, i]
            class_iiou[name] = tpw / (tpw + fp + fnw) if tpw + fp + fnw > 0 else float("nan")
        cat_iiou = {}
        for cat, (tpw, fnw) in self.cat.items():
            ids = [i for i in range(n) if labels.CLASS_CATEGORIES[i] == cat]
            others = [i for i in range(n) if i not in ids]
            fp = m[np.ix_(others, ids)].sum() + self.cat_extra_fp[cat]
            cat_iiou[cat] = tpw / (tpw + fp + fnw) if tpw + fp + fnw > 0 else float("nan")
        return {"iiou": class_iiou, "miiou": nanmean(class_iiou.values()),
                "category_iiou": cat_iiou, "category_miiou": nanmean(cat_iiou.values())}


def evaluate_folder(data_root: str | Path, split: str, pred_dir: str | Path,
                    progress: bool = True, dataset: str = "cityscapes") -> dict:
    """Every ground-truth image of the split must have a prediction of the same size."""
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset} is unknown; choose one of {', '.join(DATASETS)}")
    reader = DATASETS[dataset](data_root, split)
    samples = reader.samples
    cityscapes = dataset == "cityscapes"
    preds = find_predictions(pred_dir, by_name=not cityscapes)
    missing = [s.stem for s in samples if s.stem not in preds]
    if missing:
        form = "contain {city}_{seq}_{frame}, e.g. " if cityscapes else "be the image's name + _labelIds.png: "
        raise UserError(f"{pred_dir} has no prediction for {len(missing)} of {len(samples)} images "
                        f"of split '{split}' (first: {missing[0]}); file names must {form}{missing[0]}_labelIds.png")
    cm = ConfusionMatrix()
    inst = InstanceStats()
    have_instances = cityscapes
    for sample in tqdm(samples, desc="evaluate", unit="img", disable=not progress, mininterval=1.0):
        gt = reader.check_label(sample)
        check_label_size(sample, gt.shape, read_image(sample.image, header_only=True).size)  # before blaming pred
        path = preds[sample.stem]
        pred = read_prediction(path, pred_dir)
        if pred.ndim != 2:
            raise UserError(f"prediction {path} has several channels; write single-channel labelIds")
        if pred.shape != gt.shape:
            raise UserError(f"prediction {path} is {pred.shape[1]}x{pred.shape[0]} but ground truth "
                            f"{sample.label} is {gt.shape[1]}x{gt.shape[0]}; predict at full size")
        if pred.min() < 0 or pred.max() > labels.MAX_LABEL_ID:
            raise UserError(f"prediction {path} holds ids {pred.min()}..{pred.max()}, outside the "
                            f"Cityscapes label ids 0..{labels.MAX_LABEL_ID}; write labelIds, not trainIds+255")
        pred = pred.astype(np.uint8)
        cm.update(torch.from_numpy(gt), torch.from_numpy(labels.to_train_ids(pred)))
        inst_path = sample.label.with_name(sample.label.name.replace("labelIds", "instanceIds"))
        if have_instances and inst_path.is_file():
            inst.update(read_label_array(inst_path).astype(np.int64), pred, gt)
        else:
            have_instances = False
    if reader.classes != tuple(range(labels.NUM_CLASSES)):  # a dataset labelling some classes: scored on those
        cm.mat = torch.from_numpy(scored_on(cm.mat.numpy(), reader.classes))
    result = cm.compute()
    if have_instances:
        result.update(inst.compute(cm))
    result["n_images"] = len(samples)
    result["dataset"], result["classes"] = dataset, [labels.CLASS_NAMES[c] for c in reader.classes]
    result["confusion"] = cm.mat.tolist()
    return result


def format_result(result: dict) -> str:
    def pct(v: float) -> str:
        return "   nan" if math.isnan(v) else f"{v * 100:6.2f}"

    has_inst = "iiou" in result
    lines = [f"{'class':>14s}  {'IoU':>6s}" + ("  iIoU" if has_inst else "")]
    for name, v in result["iou"].items():
        lines.append(f"{name:>14s}  {pct(v)}" + (f"  {pct(result['iiou'][name])}" if has_inst else ""))
    lines.append(f"{'mean':>14s}  {pct(result['miou'])}" + (f"  {pct(result['miiou'])}" if has_inst else ""))
    cats = "  ".join(f"{c} {pct(v).strip()}" for c, v in result["category_iou"].items())
    lines.append(f"category IoU: {cats}")
    lines.append(f"pixel accuracy {pct(result['pixel_acc'])}   category mIoU {pct(result['category_miou'])}"
                 f"   images {result['n_images']}")
    if len(result.get("classes", labels.CLASS_NAMES)) < labels.NUM_CLASSES:
        lines.append(f"{result['dataset']} labels {len(result['classes'])} of the {labels.NUM_CLASSES} classes: "
                     f"the mean is over {', '.join(result['classes'])}")
    return "\n".join(lines)
