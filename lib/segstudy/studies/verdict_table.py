"""The report's verdict table: each question the study asks, its answer and the evidence, read from
the results files of notebooks 01-05 and their per-image confusions by the rules of
studies.verdicts (intervals, "not distinguishable at this budget" wherever they overlap).

A question whose inputs are missing (a notebook not run, a results file of an older version) is
answered "not measured" with the notebook to run: a partial run still gets its table. What it
reads, and the seed noise that widens the intervals of single trainings: studies.verdict_inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from segstudy.config import Config
from segstudy.config_paths import PROJECT_ROOT
from segstudy.data.labels import SMALL_CLASSES
from segstudy.engine import run_folder
from segstudy.errors import UserError
from segstudy.studies import int8_choice, result_tables, results_files, verdicts
from segstudy.studies.verdict_inputs import Inputs, Missing, SeedNoise, by_loss, loss_runs, no_noise, seed_noise
from segstudy.studies.verdicts import NOT_DISTINGUISHABLE, Interval, Recommendation, Verdict

NOT_MEASURED = "not measured"

QUESTIONS = {
    "loss": "Which loss is best overall?",
    "small": "Which loss is best for small classes?",
    "structured": "Does structured pruning keep accuracy at its speed-up?",
    "unstructured": "Does unstructured pruning buy speed?",
    "int8": "Does int8 keep accuracy at its speed-up?",
    "robust": "Does training on several datasets make the model more robust?",
    "deploy": "Which model to deploy?",
}


def speedup_over(row: dict, base: dict, name: str) -> Interval:
    """result_tables.speedup, or Missing."""
    est = result_tables.speedup(row, base)
    if est is None:
        raise Missing(f"no latency of '{name}' or of its reference")
    return est


def times(e: Interval, how: bool = True) -> str:
    """A speed-up as the tables and verdicts print it; `how`: with where its interval comes from."""
    if not e.has_spread:
        return f"{e.mean:.2f}x (no spread: one timing)"
    return f"{e.mean:.2f}x [{e.low:.2f}, {e.high:.2f}]" + (f" ({e.how})" if how else "")


def _threshold(question: str, est: Interval, floor: float, subject: str, context: str = "") -> Verdict:
    """verdicts.threshold with what was measured said first."""
    v = verdicts.threshold(question, est, floor, context)
    return Verdict(question, v.answer, f"{subject}: {v.evidence}")


# ---------------------------------------------------------------- the questions


def _rank_losses(ins: Inputs, question: str, scores: dict[str, list[float]], what: str) -> Verdict:
    if len(scores) < 2:
        raise Missing(f"only the loss {', '.join(scores)} was run; notebook 03 compares loss_study.names")
    v = verdicts.rank(question, {loss: verdicts.over_seeds(s) for loss, s in scores.items()})
    return Verdict(question, v.answer, f"{what}: {v.evidence}")


def best_loss(ins: Inputs) -> Verdict:
    """verdicts.rank of the losses' best-epoch mIoU over seeds (t-intervals)."""
    scores = by_loss(loss_runs(ins), lambda r: 100 * r["best_miou"])
    return _rank_losses(ins, QUESTIONS["loss"], scores, "best-epoch val mIoU, points")


def _best_epoch_iou(run: dict) -> dict[str, float | None]:
    """Per-class IoU (0-1, None where unscored) at the run's best validation epoch; {} if unsaved."""
    best = max((h for h in run.get("history") or [] if h.get("val_iou")), key=lambda h: h["val_miou"], default=None)
    return best["val_iou"] if best else {}


def best_loss_small_classes(ins: Inputs) -> Verdict:
    """The same over the mean IoU of the small classes (labels.SMALL_CLASSES) that some run
    resolves: a class with IoU 0 in every run says nothing about the losses, and is named."""
    question, runs = QUESTIONS["small"], loss_runs(ins)
    ious = [_best_epoch_iou(r) for r in runs]
    if not all(ious):
        raise Missing(f"notebook 03's runs carry no per-class IoU history (an older notebook 03); "
                      f"re-run {results_files.writer(ins.cfg, 'losses')}")
    resolved = [c for c in SMALL_CLASSES if any((iou.get(c) or 0) > 0 for iou in ious)]
    unresolved = ", ".join(c for c in SMALL_CLASSES if c not in resolved)
    if not resolved:
        return Verdict(question, NOT_DISTINGUISHABLE, f"every small class ({unresolved}) has IoU 0 in every run")

    def small(run: dict) -> float:
        values = [v for c in resolved if (v := _best_epoch_iou(run).get(c)) is not None]
        return 100 * float(np.mean(values)) if values else math.nan

    what = f"mean IoU of {len(resolved)} small classes, points" + (
        f" (IoU 0 in every run, excluded: {unresolved})" if unresolved else "")
    return _rank_losses(ins, question, by_loss(runs, small), what)


def pruning_rows(ins: Inputs) -> tuple[list[dict], dict, dict, dict]:
    """Notebook 04's (recovered structured rows, dense control row, dense row, prune settings)."""
    d = ins.results("pruning")
    with ins.reading("pruning"):
        rows, dense, prune = d["rows"], d["dense"], d.get("prune") or {}
        control = next((r for r in rows if r["method"] == "dense control"), None)
        recovered = [r for r in rows if r["method"].startswith("structured") and r["recovery"] != "none"]
    if control is None or not recovered:
        what = "dense control" if control is None else "recovered structured"
        raise Missing(f"no {what} row in notebook 04's results (an older notebook 04); "
                      f"re-run {results_files.writer(ins.cfg, 'pruning')}")
    return recovered, control, dense, prune


def against_control(ins: Inputs, noise: SeedNoise | None, pruned: dict, control: dict) -> Interval:
    """A recovered structured model's mIoU minus the dense control's (points): a paired bootstrap
    over the validation images, widened by the seed noise of the two fine-tunes."""
    if noise is None:
        raise no_noise(ins)
    diff = verdicts.paired_difference(ins.confusions("pruning", pruned, results_files.pruning_row_name(pruned)),
                                      ins.confusions("pruning", control, "dense control"))
    return noise.widen(diff, trainings=2)


def control_subject(prune: dict) -> str:
    epochs = prune.get("epochs")
    return "the dense model fine-tuned the same way" + (f" ({epochs:g} epoch{'s' * (epochs != 1)})" if epochs else "")


def structured_keeps_accuracy(ins: Inputs, noise: SeedNoise | None) -> Verdict:
    """against_control of the structured model notebook 04 kept; "yes" when the whole interval is
    above -report.keep_loss."""
    recovered, control, dense, prune = pruning_rows(ins)
    # the one notebook 04 kept (and notebook 05 quantizes); older files: the most accurate
    pruned = next((r for r in recovered if r.get("checkpoint")), max(recovered, key=lambda r: r["miou"]))
    keep = ins.cfg.report.keep_loss
    name = results_files.pruning_row_name(pruned)
    subject = f"{name} − {control_subject(prune)}, mIoU points (keeps: within {keep:g} point)"
    speed = speedup_over(pruned, dense, name)
    return _threshold(QUESTIONS["structured"], against_control(ins, noise, pruned, control), -keep, subject,
                      f"speed-up over dense {times(speed)}; {noise}")


def unstructured_buys_speed(ins: Inputs) -> Verdict:
    """Speed-up of the timed unstructured model (prune.finetune_sparsity) over the dense one."""
    d = ins.results("pruning")
    with ins.reading("pruning"):
        timed = [r for r in d["rows"] if r["method"].startswith("unstructured") and r.get("latency_ms")]
        at_level = [r for r in results_files.unstructured_at_finetune_sparsity(d) if r.get("latency_ms")]
        dense = d["dense"]
    if not timed:
        raise Missing(f"no timed unstructured model in notebook 04's results; "
                      f"re-run {results_files.writer(ins.cfg, 'pruning')}")
    row = (at_level or timed)[0]
    name = results_files.pruning_row_name(row)
    floor = ins.cfg.report.speed_floor
    subject = f"{name} ({100 * row['sparsity']:.0f}% zeros) over dense, speed-up (buys speed: above {floor:g}x)"
    return _threshold(QUESTIONS["unstructured"], speedup_over(row, dense, name), floor, subject)


def int8_keeps_accuracy(ins: Inputs, noise: SeedNoise | None) -> Verdict:
    """Paired bootstrap of int8 minus fp32 eager mIoU (the deployed int8 form, notebook 05's
    "deployed_int8"; the same weights, so no seed noise, except QAT's fine-tune); "yes" when the
    whole interval is above -1."""
    d = ins.results("quantization")
    with ins.reading("quantization"):
        rows = results_files.quantization_rows(d)
        ref_name = d.get("reference", "fp32 eager")
    present = [k for k in results_files.INT8_VARIANTS if rows.get(k, {}).get("latency_ms")]
    if ref_name not in rows or not present:
        raise Missing(f"no fp32 or int8 row in notebook 05's results; "
                      f"re-run {results_files.writer(ins.cfg, 'quantization')}")
    deployed = (d.get("deployed_int8") or {}).get("variant")  # int8_choice.deployed_int8's choice
    # without a servable int8 form (none deployed) the fastest int8 row answers for int8
    name = deployed if deployed in present else min(present, key=lambda k: rows[k]["latency_ms"])
    trainings = int8_choice.trainings(name)
    if trainings and noise is None:
        raise no_noise(ins)
    diff = verdicts.paired_difference(ins.confusions("quantization", rows[name], name),
                                      ins.confusions("quantization", rows[ref_name], ref_name))
    if trainings:
        diff = noise.widen(diff, trainings)
    keep = ins.cfg.report.keep_loss
    role = "deployed" if name == deployed else "the fastest int8"
    subject = f"{name} ({role}) − {ref_name}, mIoU points (keeps: within {keep:g} point)"
    return _threshold(QUESTIONS["int8"], diff, -keep, subject,
                      f"speed-up {times(speedup_over(rows[name], rows[ref_name], name))}")


def _cross_rows(ins: Inputs) -> tuple[dict, dict[tuple[str, str], dict]]:
    d = ins.results("cross")
    with ins.reading("cross"):
        return d, {(r["model"], r["dataset"]): r for r in d["rows"]}


def more_robust(ins: Inputs, noise: SeedNoise | None) -> Verdict:
    """Paired bootstrap over one dataset's images of the mixed model minus the same model trained on
    data.dataset alone, widened by the seed noise of two trainings. The dataset is the first that no
    training saw (held out of cross.mix): robustness is accuracy where the model has not been; "yes"
    when the whole interval is above 0. The evidence gives each model's in-domain and cross-domain mIoU."""
    d, rows = _cross_rows(ins)
    mixed = sorted({m for m, _ in rows if "+" in m})
    if not mixed:
        raise Missing(f"no mixed training in {results_files.shown(results_files.path(ins.cfg, 'cross'))} "
                      f"(cross.mix is empty); set cross.mix and re-run {results_files.writer(ins.cfg, 'cross')}")
    if noise is None:
        raise no_noise(ins)
    name, single = mixed[0], mixed[0].split("+")[0]
    others = [ds for m, ds in rows if m == name and ds != d["primary"]]
    held = [ds for ds in others if ds not in d["mix"]]
    target = (held or others or [None])[0]
    if target is None or (single, target) not in rows:
        raise Missing(f"no dataset besides {d['primary']} scored for {single} and {name}; add one under cross.*")
    diff = noise.widen(verdicts.paired_difference(ins.confusions("cross", rows[name, target], name),
                                                  ins.confusions("cross", rows[single, target], single)), 2)
    seen = "held out: seen by neither" if held else "seen by the mixed training"
    subject = f"{name} − {single} on {target} ({seen}), mIoU points"
    drops = "; ".join(f"{m}: {d['primary']} {100 * rows[m, d['primary']]['miou']:.1f} → {target} "
                      f"{100 * rows[m, target]['miou']:.1f}" for m in (single, name) if (m, d["primary"]) in rows)
    return _threshold(QUESTIONS["robust"], diff, 0.0, subject, f"in-domain → cross-domain mIoU %: {drops}")


# ---------------------------------------------------------------- the deployment candidates


@dataclass
class Pool:
    """Every measured model with an mIoU interval and a latency: what the recommendation picks from."""

    table: pd.DataFrame  # model, mIoU %, mIoU low, mIoU high, latency ms, source, estimate
    sources: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    noise: SeedNoise | None = None

    def recommendation(self, tolerance: float) -> Recommendation:
        """verdicts.recommend_deployment over the pool, with the seed noise in its evidence."""
        if self.table.empty:
            raise Missing("no model with both an mIoU and a latency: run notebooks 01 and 02 (04, 05 add variants)")
        candidates = [(r["model"], (r["estimate"], r["latency ms"])) for _, r in self.table.iterrows()]
        return verdicts.recommend_deployment(candidates, tolerance, QUESTIONS["deploy"],
                                             str(self.noise) if self.noise else "seed noise not measured (notebook 03)")


def _load_npy(m: dict) -> np.ndarray | None:
    """A trained model's best-epoch per-image confusions (result["val_confusions"], else the run
    folder's val_confusions.npy); None for results without them."""
    for p in (m.get("val_confusions"), m.get("run_dir") and Path(m["run_dir"]) / run_folder.CONFUSIONS):
        if p:
            path = Path(p) if Path(p).is_absolute() else PROJECT_ROOT / p
            if path.is_file():
                return np.load(path)
    return None


def _accuracy(points: float, confusions: np.ndarray | None, noise: SeedNoise | None) -> Interval:
    """mIoU (points) bootstrapped over the images, widened by one training's seed noise (every
    candidate rests on one from-scratch training); without per-image confusions, the point value
    widened by the seed noise alone."""
    if confusions is not None and len(confusions):
        est = verdicts.miou_bootstrap(confusions)
    else:
        est = Interval(points, points, points, 1, "no per-image confusions")
    return noise.widen(est, trainings=1) if noise else est


def _row(model: str, est: Interval, latency: float, source: str) -> dict:
    return {"model": model, "mIoU %": est.mean, "mIoU low": est.low, "mIoU high": est.high,
            "latency ms": latency, "source": source, "estimate": est}


def _trained_rows(ins: Inputs, noise: SeedNoise | None, pool: Pool) -> list[dict]:
    found, paths, notes, _ = results_files.trained_models(ins.cfg)
    pool.sources += paths
    pool.notes += notes
    ins.used += paths
    rows = []
    for name, m in found.items():
        key = "baselines" if m["source"].parent.name.startswith("01") else "custom"
        with ins.reading(key):
            est = _accuracy(100 * m["best_miou"], _load_npy(m), noise)
            rows.append(_row(f"{name} · fp32", est, m["latency_ms"], results_files.FILES[key]))
            if m.get("latency_cl_ms"):
                rows.append(_row(f"{name} · fp32 channels_last", est, m["latency_cl_ms"], results_files.FILES[key]))
    return rows


def _confusions_or_none(ins: Inputs, key: str, row: dict, name: str) -> np.ndarray | None:
    try:
        return ins.confusions(key, row, name)
    except Missing:
        return None


def _variant_rows(ins: Inputs, noise: SeedNoise | None, pool: Pool, key: str) -> list[dict]:
    """The timed variants of notebook 04 ("pruning": custom's pruned models) or 05 ("quantization")."""
    try:
        d = ins.results(key)
    except Missing as note:
        pool.notes.append(str(note))
        return []
    pool.sources.append(results_files.path(ins.cfg, key))
    if key == "pruning":
        variants = {results_files.pruning_row_name(r): r for r in d["rows"]}
        base = "custom"
    else:  # one engine per set of weights: the one notebook 05 chose (int8_choice.first_not_slower)
        variants, base = results_files.quantization_rows(d), d.get("model", "custom")
        variants = {k: r for k, r in variants.items() if k not in d.get("other_engines", [])}
    rows = []
    with ins.reading(key):
        for name, r in variants.items():
            if r.get("latency_ms"):
                est = _accuracy(100 * r["miou"], _confusions_or_none(ins, key, r, name), noise)
                rows.append(_row(f"{base} · {name}", est, r["latency_ms"], results_files.FILES[key]))
    return rows


def candidate_pool(cfg: Config, ins: Inputs | None = None) -> Pool:
    """The trained models of notebooks 01/02 (fp32, and channels_last at its own latency), notebook
    04's timed pruned models and notebook 05's variants, each with its mIoU interval. Notebook 04's
    dense row is left out: it is notebook 02's custom model measured again."""
    ins = ins or Inputs(cfg)
    pool = Pool(pd.DataFrame(), noise=seed_noise(ins))
    rows = [*_trained_rows(ins, pool.noise, pool), *_variant_rows(ins, pool.noise, pool, "pruning"),
            *_variant_rows(ins, pool.noise, pool, "quantization")]
    cols = ["model", "mIoU %", "mIoU low", "mIoU high", "latency ms", "source", "estimate"]
    table = pd.DataFrame(rows, columns=cols).dropna(subset=["mIoU %", "latency ms"])
    pool.table = table.reset_index(drop=True)
    return pool


# ---------------------------------------------------------------- the table


def _answer(question: str, ask: Callable[[], Verdict]) -> Verdict:
    try:
        return ask()
    except (Missing, UserError) as why:  # a missing or older input: said, never a failed report
        return Verdict(question, NOT_MEASURED, str(why))


@dataclass
class Evaluation:
    """The verdict table with what it was read from: the files, and its deployment question's
    candidate pool and recommendation, which the report's recommendation table shows as they are
    (built once). None where that question is not measured: no pool when a file it reads is bad,
    no recommendation when the pool is empty."""

    verdicts: list[Verdict]
    inputs: list[Path]
    pool: Pool | None
    recommendation: Recommendation | None


def evaluate(cfg: Config) -> Evaluation:
    """Every question's verdict (one per QUESTIONS, in that order) and the files they were read from."""
    ins = Inputs(cfg)
    noise = seed_noise(ins)
    asks = {"loss": lambda: best_loss(ins), "small": lambda: best_loss_small_classes(ins),
            "structured": lambda: structured_keeps_accuracy(ins, noise),
            "unstructured": lambda: unstructured_buys_speed(ins),
            "int8": lambda: int8_keeps_accuracy(ins, noise),
            "robust": lambda: more_robust(ins, noise)}
    table = [_answer(QUESTIONS[key], ask) for key, ask in asks.items()]
    pool, recommendation = None, None

    def deploy() -> Verdict:
        nonlocal pool, recommendation
        pool = candidate_pool(cfg, ins)
        recommendation = pool.recommendation(cfg.report.tolerance)
        return recommendation.verdict

    table.append(_answer(QUESTIONS["deploy"], deploy))
    return Evaluation(table, list(dict.fromkeys(ins.used)), pool, recommendation)


def save(cfg: Config, evaluation: Evaluation) -> Path:
    """results_files.FILES["verdicts"], with the provenance stamp and the files read."""
    return results_files.write_verdicts(cfg, evaluation.verdicts, evaluation.inputs)
