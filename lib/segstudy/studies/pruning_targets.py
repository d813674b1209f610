"""Notebook 04's targets (prune.target_speedup, report.keep_loss, prune.target_kept), judged by the
verdicts' rule (verdicts.threshold): a target is met ("yes") when the whole interval of what it bounds
lies on its side of the bar, missed ("no") when the whole interval lies on the other side, and
otherwise not distinguishable at this budget. The intervals are the verdict table's own
(studies.verdict_table: each recovered structured model against the dense control, its speed-up
timed in turn with the dense model), read from notebook 04's saved results, so the notebook, the
report's pruning section and its verdict table give one answer to one question.
"""

from __future__ import annotations

import pandas as pd

from segstudy.config import Config
from segstudy.studies import results_files, verdict_table, verdicts
from segstudy.studies.verdict_inputs import Inputs, Missing, SeedNoise, no_noise, seed_noise

COLUMNS = ["target", "measured", "met"]


def _structured(cfg: Config, ins: Inputs, noise: SeedNoise | None) -> list[dict]:
    recovered, control, dense, prune = verdict_table.pruning_rows(ins)
    p, keep = cfg.prune, cfg.report.keep_loss
    out = []
    for row in recovered:
        name = results_files.pruning_row_name(row)
        target = (f"{name}: >= {p.target_speedup:g}x faster than dense, mIoU within {keep:g} point of "
                  f"{verdict_table.control_subject(prune)}")
        speed = verdict_table.speedup_over(row, dense, name)
        fast, shown = verdicts.threshold(target, speed, p.target_speedup).answer, verdict_table.times(speed, how=False)
        try:
            acc = verdict_table.against_control(ins, noise, row, control)
        except Missing as why:  # no seed noise (notebook 03) or confusions: the speed-up alone can miss
            out.append({"target": target, "measured": f"{shown}; mIoU not judged: {why}",
                        "met": "no" if fast == "no" else verdict_table.NOT_MEASURED})
            continue
        out.append({"target": target, "measured": f"{shown}; {acc} points",
                    "met": verdicts.combined(fast, verdicts.threshold(target, acc, -keep).answer)})
    return out


def _unstructured(cfg: Config, ins: Inputs, noise: SeedNoise | None) -> list[dict]:
    """Each unstructured model at the prune.finetune_sparsity notebook 04 ran with, against the dense
    model it was pruned from: the share of dense mIoU it keeps, as a difference (paired over the
    images; a fine-tune adds its seed noise, pruning alone none) against the bar -(1 - target_kept) x
    dense mIoU."""
    d = ins.results("pruning")
    with ins.reading("pruning"):
        dense, p = d["dense"], cfg.prune
        rows = results_files.unstructured_at_finetune_sparsity(d)
    out = []
    for row in rows:
        name = results_files.pruning_row_name(row)
        diff = verdicts.paired_difference(ins.confusions("pruning", row, name),
                                          ins.confusions("pruning", dense, "dense"))
        if row["recovery"] != "none":
            if noise is None:
                raise no_noise(ins)
            diff = noise.widen(diff, trainings=1)
        bar = -(1 - p.target_kept) * 100 * dense["miou"]
        target = f"{name}: keeps >= {p.target_kept:.0%} of dense mIoU ({bar:+.2f} points)"
        measured = f"{100 * row['miou'] / dense['miou']:.1f}% of dense; {diff} points"
        out.append({"target": target, "measured": measured, "met": verdicts.threshold(target, diff, bar).answer})
    return out


def table(cfg: Config, ins: Inputs | None = None) -> pd.DataFrame:
    """One row per target: what it asks, what was measured (intervals), met yes | no | not
    distinguishable; a part whose inputs are missing is one row saying which."""
    ins = ins or Inputs(cfg)
    noise = seed_noise(ins)
    rows: list[dict] = []
    for part, what in ((_structured, "structured targets"), (_unstructured, "unstructured target")):
        try:
            rows += part(cfg, ins, noise)
        except Missing as why:
            rows.append({"target": what, "measured": str(why), "met": verdict_table.NOT_MEASURED})
    return pd.DataFrame(rows, columns=COLUMNS)
