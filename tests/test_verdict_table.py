"""The report's verdict table on small fake results files (nothing is trained): every question is
answered, a difference inside the spread reads "not distinguishable at this budget", one well
outside names the winner, missing inputs read "not measured", and the recommendation uses the
same uncertainty as the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segstudy.config_profiles import load_config
from segstudy.data.labels import CLASS_NAMES, SMALL_CLASSES
from segstudy.studies import pruning_targets, report_figures, results_files, verdict_table
from segstudy.studies.verdict_table import NOT_MEASURED, QUESTIONS
from segstudy.studies.verdicts import NOT_DISTINGUISHABLE, miou

C = len(CLASS_NAMES)
BENCH = {"height": 64, "width": 128, "cpu": "Test CPU", "threads": 2}


def _confusions(n: int, accuracy: float, seed: int) -> np.ndarray:
    """[n, 19, 20] per-image confusions: 6 classes per image, `accuracy` of their pixels right."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, C, C + 1), np.int64)
    for i in range(n):
        acc = np.clip(accuracy + rng.normal(0, 0.03), 0, 1)
        for c in rng.choice(C, 6, replace=False):
            pixels = int(rng.integers(200, 600))
            right = rng.binomial(pixels, acc)
            out[i, c, c] += right
            out[i, c] += np.bincount(rng.integers(0, C + 1, pixels - right), minlength=C + 1)
    return out


def _times(ms: float) -> list[float]:
    return [ms * f for f in (1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.995, 1.005, 0.99)]


def _loss_run(loss: str, seed: int, miou_points: float, small: float = 0.1) -> dict:
    iou = {c: (0.0 if c == "rider" else small if c in SMALL_CLASSES else 0.5) for c in CLASS_NAMES}
    best = {"epoch": 1, "step": 4, "train_loss": 1.0, "val_miou": miou_points / 100, "val_iou": iou}
    return {"loss": loss, "seed": seed, "best_miou": miou_points / 100, "history": [best]}


def _losses(scores: dict[str, list[float]], small: dict[str, list[float]] | None = None) -> dict:
    return {"profile": "smoke", "model": "unet", "epochs": 1, "runs": [
        _loss_run(loss, seed, m, (small or {}).get(loss, [0.1] * len(ms))[seed])
        for loss, ms in scores.items() for seed, m in enumerate(ms)]}


def _model(conf_path: Path, latency: float) -> dict:
    points = miou(np.load(conf_path).sum(0))
    best = {"epoch": 1, "val_miou": points / 100, "val_pixel_acc": 0.7, "val_iou": {}}
    return {"best_miou": points / 100, "final": best, "history": [best], "train_seconds": 3.0, "parameters": 1e6,
            "gflops": 1.0, "latency_ms": latency, "val_confusions": str(conf_path)}


def _row(method: str, level: float, recovery: str, key: str, store: dict, conf: np.ndarray,
         latency: float | None = None, **extra) -> dict:
    store[key] = conf
    row = {"method": method, "level": level, "recovery": recovery, "sparsity": level, "miou": miou(conf.sum(0)) / 100,
           "params": 1e6, "confusions": key, **extra}
    if latency:
        row |= {"latency_ms": latency, "latency_times_ms": _times(latency)}
    return row


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload | {"format": results_files.FORMAT}))


def fake(out: Path, *, losses: dict | None = None, pruned_acc: float = 0.6, int8_same: bool = True,
         mixed_acc: float = 0.7, skip: tuple[str, ...] = ()) -> None:
    """outputs/smoke/ with the results of notebooks 01-05 (60 validation images), minus `skip`."""
    n, runs = 60, out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    confs = {"unet": _confusions(n, 0.3, 1), "deeplabv3_resnet50": _confusions(n, 0.6, 2),
             "custom": _confusions(n, 0.6, 3)}
    for name, conf in confs.items():
        np.save(runs / f"{name}.npy", conf)
    files = {"losses": losses or _losses({"ce": [20.0, 20.4, 19.8], "dice": [20.2, 19.9, 20.1]}),
             "baselines": {"profile": "smoke", "bench": BENCH, "models": {
                 "unet": _model(runs / "unet.npy", 20.0), "deeplabv3_resnet50": _model(runs / "deeplabv3_resnet50.npy",
                                                                                        90.0)}},
             "custom": {"profile": "smoke", "bench": BENCH, "models": {"custom": _model(runs / "custom.npy", 60.0)}}}
    store: dict[str, np.ndarray] = {}
    dense = _row("dense", 0.0, "none", "dense", store, confs["custom"], 60.0)
    files["pruning"] = {"profile": "smoke", "prune": {"epochs": 4, "finetune_sparsity": 0.55}, "dense": dense, "rows": [
        _row("unstructured lamp", 0.55, "none", "u", store, _confusions(n, 0.5, 4), 60.0),
        _row("structured group_norm", 0.35, "fine-tune", "s_ft", store, _confusions(n, pruned_acc - 0.05, 5), 25.0),
        _row("structured group_norm", 0.35, "KD", "s_kd", store, _confusions(n, pruned_acc, 5), 25.0,
             checkpoint="pruned_structured.pt"),
        _row("dense control", 0.0, "fine-tune", "control", store, _confusions(n, 0.6, 5), 60.0)]}
    results_files.write_confusions(out / results_files.CONFUSION_FILES["pruning"], store)
    fp32 = confs["custom"]
    int8 = fp32 if int8_same else _confusions(n, 0.3, 6)
    results_files.write_confusions(out / results_files.CONFUSION_FILES["quantization"], {"fp32": fp32, "int8": int8})
    files["quantization"] = {"profile": "smoke", "reference": "fp32 eager", "variants": {
        "fp32 eager": {"engine": "torch", "precision": "fp32", "miou": miou(fp32.sum(0)) / 100, "latency_ms": 60.0,
                       "latency_times_ms": _times(60.0), "confusions": "fp32"},
        "int8 ONNX Runtime": {"engine": "onnxruntime", "precision": "int8", "miou": miou(int8.sum(0)) / 100,
                              "latency_ms": 15.0, "latency_times_ms": _times(15.0), "confusions": "int8"}}}
    files["cross"] = _cross(out, n, mixed_acc)
    for key, payload in files.items():
        if key not in skip:
            _write(out / results_files.FILES[key], payload)


def _cross(out: Path, n: int, mixed_acc: float) -> dict:
    """Notebook 02's cross-dataset rows: custom alone and custom+bdd100k on cityscapes and the held-out nuimages."""
    mixed = "custom+bdd100k"
    confs = {("custom", "cityscapes"): _confusions(n, 0.6, 3), (mixed, "cityscapes"): _confusions(n, 0.55, 7),
             ("custom", "nuimages"): _confusions(n, 0.4, 8), (mixed, "nuimages"): _confusions(n, mixed_acc, 9)}
    store = {f"{m}_{d}": c for (m, d), c in confs.items()}
    results_files.write_confusions(out / results_files.CONFUSION_FILES["cross"], store)
    return {"profile": "smoke", "primary": "cityscapes", "mix": ["bdd100k"], "rows": [
        {"model": m, "dataset": d, "trained on": ["cityscapes", *(["bdd100k"] if "+" in m else [])],
         "miou": miou(c.sum(0)) / 100, "low": 0.0, "high": 1.0, "classes": [], "confusions": f"{m}_{d}"}
        for (m, d), c in confs.items()]}


@pytest.fixture
def cfg(tmp_path):
    return load_config("smoke", {"output_root": str(tmp_path)})


def _by_question(cfg) -> dict[str, verdict_table.Verdict]:
    table = verdict_table.evaluate(cfg).verdicts
    assert [v.question for v in table] == list(QUESTIONS.values())
    return {key: v for key, v in zip(QUESTIONS, table)}


def test_every_question_is_answered_and_saved(cfg):
    fake(cfg.output_dir)
    v = _by_question(cfg)
    assert all(x.answer != NOT_MEASURED for x in v.values()), v
    assert v["loss"].answer == f"{NOT_DISTINGUISHABLE}: ce, dice"  # 0.1 apart, seeds spread 0.3
    assert "(3 seeds, 95% t-interval)" in v["loss"].evidence
    # the same confusions as its control: the interval is the two fine-tunes' seed noise, inside 1 point
    assert v["structured"].answer == "yes"
    assert "paired bootstrap over 60 images, 95% + seed noise of 2 training(s)" in v["structured"].evidence
    assert "speed-up over dense 2.40x [" in v["structured"].evidence
    assert "from notebook 03's 6 runs of unet (df 4)" in v["structured"].evidence  # whose seed noise it is
    assert v["unstructured"].answer == "no"  # zeros in dense tensors: the same timings, below the 1.1x floor
    assert "unstructured lamp 0.55 (55% zeros)" in v["unstructured"].evidence
    assert v["robust"].answer == "yes"  # 0.7 against 0.4 of the pixels right on the dataset neither saw
    assert "custom+bdd100k − custom on nuimages (held out: seen by neither)" in v["robust"].evidence
    assert "in-domain → cross-domain mIoU %: custom: cityscapes" in v["robust"].evidence
    part = report_figures.verdict_part(cfg, verdict_table.evaluate(cfg))
    assert list(part.table["answer"]) == [x.answer for x in v.values()]
    saved = json.loads((cfg.output_dir / results_files.FILES["verdicts"]).read_text())
    assert [x["question"] for x in saved["verdicts"]] == list(QUESTIONS.values())
    assert saved["provenance"]["profile"] == "smoke"
    assert any(p.endswith("04_pruning_sweeps/confusions.npz") for p in saved["inputs"])
    assert "verdicts.json" not in str(report_figures.sources(cfg).table.index.tolist())  # its own output


def test_a_mixed_training_as_good_as_alone_off_its_domain_is_not_distinguishable(cfg):
    fake(cfg.output_dir, mixed_acc=0.4)
    assert _by_question(cfg)["robust"].answer == NOT_DISTINGUISHABLE


def test_loss_difference_inside_the_spread_is_not_distinguishable(cfg):
    fake(cfg.output_dir, losses=_losses({"ce": [20.0, 23.0, 17.0], "dice": [21.0, 18.0, 24.0]}))
    assert _by_question(cfg)["loss"].answer == f"{NOT_DISTINGUISHABLE}: ce, dice"


def test_loss_difference_well_outside_the_spread_names_the_winner(cfg):
    fake(cfg.output_dir, losses=_losses({"ce": [20.0, 20.5, 19.5], "dice": [30.0, 30.4, 29.6],
                                         "wce": [21.0, 20.0, 20.5]}))
    v = _by_question(cfg)["loss"]
    assert v.answer == "dice"
    assert v.evidence.index("dice 30.0") < v.evidence.index("wce 20.5") < v.evidence.index("ce 20.0")


def test_small_classes_leave_out_what_no_run_resolves(cfg):
    scores = {"ce": [20.0, 20.5, 19.5], "dice": [20.1, 20.4, 19.6]}
    small = {"ce": [0.05, 0.06, 0.05], "dice": [0.30, 0.31, 0.29]}  # dice: far better on small classes
    fake(cfg.output_dir, losses=_losses(scores, small))
    v = _by_question(cfg)
    assert v["small"].answer == "dice" and v["loss"].answer.startswith(NOT_DISTINGUISHABLE)
    assert f"mean IoU of {len(SMALL_CLASSES) - 1} small classes" in v["small"].evidence
    assert "excluded: rider" in v["small"].evidence  # IoU 0 in every run


def test_int8_with_identical_confusions_keeps_accuracy_when_faster(cfg):
    fake(cfg.output_dir, int8_same=True)
    v = _by_question(cfg)["int8"]
    assert v.answer == "yes"
    assert v.evidence.startswith("int8 ONNX Runtime (the fastest int8) − fp32 eager")
    assert "0.00 [0.00, 0.00]" in v.evidence and "speed-up 4.00x [" in v.evidence


def test_int8_answers_for_the_deployed_form_not_the_fastest_row(cfg):
    fake(cfg.output_dir, int8_same=True)  # ONNX Runtime keeps the fp32 confusions
    path = cfg.output_dir / results_files.FILES["quantization"]
    d = json.loads(path.read_text())
    lossy = _confusions(60, 0.3, 6)
    results_files.write_confusions(cfg.output_dir / results_files.CONFUSION_FILES["quantization"],
                                   {"fp32": np.load(cfg.output_dir / "runs" / "custom.npy"),
                                    "int8": np.load(cfg.output_dir / "runs" / "custom.npy"), "ov": lossy})
    d["variants"]["int8 OpenVINO"] = {"engine": "openvino", "precision": "int8", "miou": miou(lossy.sum(0)) / 100,
                                      "latency_ms": 14.0, "latency_times_ms": _times(14.0), "confusions": "ov"}
    d["deployed_int8"] = {"variant": "int8 ONNX Runtime"}  # as int8_choice chose it: OpenVINO lost accuracy
    _write(path, d)
    v = _by_question(cfg)["int8"]
    assert v.answer == "yes" and v.evidence.startswith("int8 ONNX Runtime (deployed) − fp32 eager")
    del d["deployed_int8"]  # an older results file: the fastest int8 row answers, and says so
    _write(path, d)
    v = _by_question(cfg)["int8"]
    assert v.answer == "no" and v.evidence.startswith("int8 OpenVINO (the fastest int8) − fp32 eager")


def test_int8_that_loses_accuracy_reads_no(cfg):
    fake(cfg.output_dir, int8_same=False)
    assert _by_question(cfg)["int8"].answer == "no"


def test_structured_far_below_its_dense_control_reads_no(cfg):
    fake(cfg.output_dir, pruned_acc=0.25)
    v = _by_question(cfg)["structured"]
    assert v.answer == "no"
    assert v.evidence.startswith("structured group_norm 0.35 + KD − the dense model fine-tuned the same way (4 epochs)")


def _targets(cfg) -> dict[str, str]:
    table = pruning_targets.table(cfg)
    return {target.split(":")[0]: met for target, met in zip(table["target"], table["met"])}


def test_pruning_targets_are_judged_on_the_verdicts_intervals(cfg, tmp_path):
    fake(cfg.output_dir)  # pruned 25 ms against dense 60 ms: 2.4x; KD as accurate as the dense control
    met = _targets(cfg)
    assert met["structured group_norm 0.35 + KD"] == "no"  # the whole speed-up interval is below 3x
    assert met["structured group_norm 0.35 + fine-tune"] == "no"
    assert met["unstructured lamp 0.55"] == "no"  # about 10 points below dense, without a fine-tune
    at_2x = load_config("smoke", {"output_root": str(tmp_path / "at_2x"), "prune.target_speedup": 2.0})
    fake(at_2x.output_dir)
    assert _targets(at_2x)["structured group_norm 0.35 + KD"] == "yes"
    assert _by_question(at_2x)["structured"].answer == "yes"  # the verdict on the kept (KD) model agrees
    noisy = _losses({"ce": [20.0, 32.0, 8.0], "dice": [20.0, 30.0, 10.0]})  # seed sd ~11 points
    fake(at_2x.output_dir, losses=noisy)
    assert _targets(at_2x)["structured group_norm 0.35 + KD"] == NOT_DISTINGUISHABLE
    assert _by_question(at_2x)["structured"].answer == NOT_DISTINGUISHABLE


def test_pruning_targets_without_notebook_04_say_which_notebook(cfg):
    fake(cfg.output_dir, skip=("pruning",))
    table = pruning_targets.table(cfg)
    assert list(table["met"]) == [NOT_MEASURED, NOT_MEASURED]
    assert all("--only 04" in m for m in table["measured"]), table["measured"]


def test_a_missing_notebook_is_not_measured(cfg):
    fake(cfg.output_dir, skip=("pruning", "losses"))
    v = _by_question(cfg)
    for key in ("loss", "small", "structured", "unstructured"):
        assert v[key].answer == NOT_MEASURED, key
    assert "04_pruning_sweeps/results.json does not exist" in v["structured"].evidence
    assert "--only 04" in v["structured"].evidence and "--only 03" in v["loss"].evidence
    assert v["int8"].answer == "yes"  # same weights: needs no seed noise
    assert v["deploy"].answer != NOT_MEASURED and "seed noise not measured" in v["deploy"].evidence


def test_an_older_results_file_is_not_measured(cfg):
    fake(cfg.output_dir)
    (cfg.output_dir / results_files.CONFUSION_FILES["quantization"]).unlink()
    path = cfg.output_dir / results_files.FILES["pruning"]
    old = json.loads(path.read_text())
    old["rows"] = [r for r in old["rows"] if r["method"] != "dense control"]
    path.write_text(json.dumps(old))
    v = _by_question(cfg)
    assert v["structured"].answer == NOT_MEASURED and "no dense control row" in v["structured"].evidence
    assert v["int8"].answer == NOT_MEASURED and "no per-image confusions of 'int8 ONNX Runtime'" in v["int8"].evidence
    assert "--only 05" in v["int8"].evidence
    empty = load_config("smoke", {"output_root": str(cfg.output_root) + "-none"})
    assert {x.answer for x in verdict_table.evaluate(empty).verdicts} == {NOT_MEASURED}


def test_recommend_picks_the_faster_of_indistinguishable_models(cfg):
    fake(cfg.output_dir, skip=("pruning", "quantization"))
    v = _by_question(cfg)["deploy"]
    # custom (60 ms) and deeplabv3 (90 ms): the same accuracy up to the noise; unet is faster but far below
    assert v.answer == "custom · fp32"
    assert "the fastest of 2 of 3 models" in v.evidence
    recommended = report_figures.recommendation(cfg, verdict_table.evaluate(cfg))
    part, pick = recommended.part, recommended.pick
    assert pick["model"] == v.answer  # the report's recommendation is the verdict's
    assert part.table.loc["unet · fp32", "eligible"] == "" and part.table.loc["deeplabv3_resnet50 · fp32",
                                                                               "eligible"] == "yes"
    assert part.table.loc["custom · fp32", "recommended"] == "★"
    assert part.table.loc["custom · fp32", "mIoU low"] < part.table.loc["custom · fp32", "mIoU %"]


def test_recommend_leaves_out_the_engines_notebook_05_did_not_choose(cfg):
    fake(cfg.output_dir)
    path = cfg.output_dir / results_files.FILES["quantization"]
    d = json.loads(path.read_text())
    tied = d["variants"]["int8 ONNX Runtime"] | {"engine": "openvino", "latency_ms": 14.9}  # faster, within noise
    d["variants"]["int8 OpenVINO"] = tied
    _write(path, d | {"deployed_int8": {"variant": "int8 ONNX Runtime"}, "other_engines": ["int8 OpenVINO"]})
    pool = verdict_table.candidate_pool(cfg).table["model"].tolist()
    assert "custom · int8 ONNX Runtime" in pool and "custom · int8 OpenVINO" not in pool
    assert _by_question(cfg)["deploy"].answer == "custom · int8 ONNX Runtime"
    _write(path, d)  # a results file without the choice: every row is a candidate, the lower median wins
    assert _by_question(cfg)["deploy"].answer == "custom · int8 OpenVINO"


def test_recommend_widens_by_the_seed_noise(cfg):
    fake(cfg.output_dir, skip=("pruning", "quantization"))
    tight = verdict_table.candidate_pool(cfg).table.set_index("model")
    noisy = _losses({"ce": [20.0, 32.0, 8.0], "dice": [20.0, 30.0, 10.0]})  # seed sd ~11 points
    _write(cfg.output_dir / results_files.FILES["losses"], noisy)
    wide = verdict_table.candidate_pool(cfg).table.set_index("model")
    assert (wide["mIoU high"] - wide["mIoU low"] > tight["mIoU high"] - tight["mIoU low"] + 10).all()
    assert _by_question(cfg)["deploy"].answer == "unet · fp32"  # far below by its mean, not by its interval


def test_speedup_reads_the_reference_timed_alongside():
    # the dense model timed minutes earlier (a slower moment of the machine) must not make a
    # same-shaped model look faster: the row's own side-by-side reference timings win
    row = {"latency_times_ms": [100, 101, 99, 100, 102], "reference_times_ms": [101, 100, 99, 102, 100]}
    dense = {"latency_times_ms": [130, 131, 129, 132, 130]}
    assert abs(verdict_table.speedup_over(row, dense, "unstructured").mean - 1.0) < 0.03
    assert verdict_table.speedup_over({"latency_times_ms": row["latency_times_ms"]}, dense, "x").mean > 1.25
    assert "rounds timed in turn" in verdict_table.speedup_over(row, dense, "unstructured").how  # paired by round


def test_thresholds_come_from_the_config_and_older_files_are_not_read(tmp_path):
    strict = load_config("smoke", {"output_root": str(tmp_path), "report.keep_loss": 0.25, "report.speed_floor": 3.0})
    fake(strict.output_dir)
    v = _by_question(strict)
    assert "keeps: within 0.25 point" in v["int8"].evidence and "buys speed: above 3x" in v["unstructured"].evidence
    path = strict.output_dir / results_files.FILES["pruning"]
    old = json.loads(path.read_text())
    del old["format"]  # written before mIoU was a fraction in every file
    path.write_text(json.dumps(old))
    v = _by_question(strict)
    assert v["structured"].answer == NOT_MEASURED and "written by an older segstudy" in v["structured"].evidence
