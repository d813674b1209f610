"""Notebook 08: the study's tables and figures, read from what notebooks 00-07 saved under
outputs/<profile>/ (notebook_runner.py turns the executed notebook into report.html).

Nothing here trains or measures. Every table is a `Part` that names the files its numbers come
from; a results file that is not there becomes a visible note naming it and the command that
writes it, so a partial run still gives a report that says what it lacks instead of silently
shrinking.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from segstudy.config import Config
from segstudy.data.synthetic.dataset import MARKER
from segstudy.studies import (
    cross_dataset,
    figures,
    pruning_targets,
    result_tables,
    results_files,
    verdict_table,
    verdicts,
)

MMSEG_DEEPLABV3 = "mmsegmentation deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024"
SEED_PAPER = "the seed paper"
# Published mIoU in points on the real Cityscapes val split (500 images scored whole at 2048x1024,
# single-scale): what a `full` run's figures are read against (anchors()). Defined here only.
PUBLISHED_MIOU: dict[str, dict[str, float]] = {
    # mmsegmentation's model zoo (configs/deeplabv3/README.md; 80.45 with multi-scale + flip): the
    # recipe params/full.yaml's train: follows (docs/study.md, "The full recipe against its anchors")
    MMSEG_DEEPLABV3: {"deeplabv3_resnet50": 79.09},
    # the paper the study set out from (issue 34): its three models on Cityscapes val
    SEED_PAPER: {"unet": 55.0, "deeplabv3_resnet50": 72.0, "custom": 69.6},
}
PUBLISHED_SHORTER_SIDE = 1024  # the published figures score Cityscapes' 2048x1024 images at full size

_NOTE_STYLE = "border-left:4px solid #d9822b;background:#fff4e5;padding:6px 10px;margin:8px 0"


@dataclass
class Part:
    """One table of the report with where it came from; notebooks display it as HTML."""

    table: pd.DataFrame | None = None
    sources: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is missing, said plainly
    caption: str = ""
    images: list[Path] = field(default_factory=list)  # saved figures embedded as they are

    def _repr_html_(self) -> str:
        out = [f'<div class="segstudy-missing" style="{_NOTE_STYLE}"><b>Missing:</b> {html.escape(n)}</div>'
               for n in self.notes]
        if self.caption:
            out.append(f"<p>{html.escape(self.caption)}</p>")
        if self.table is not None and not self.table.empty:
            out.append(_table_html(self.table))
        for path in self.images:
            data = base64.b64encode(path.read_bytes()).decode()
            out.append(f'<p><b>{html.escape(results_files.shown(path))}</b></p>'
                       f'<img src="data:image/png;base64,{data}" style="max-width:100%" alt="{path.name}">')
        if self.sources:
            files = ", ".join(f"<code>{html.escape(results_files.shown(p))}</code>" for p in self.sources)
            out.append(f'<p style="color:#555;font-size:90%">Source: {files}</p>')
        return "\n".join(out)


def _table_html(table: pd.DataFrame) -> str:
    return result_tables.shown(table).to_html()


def sources(cfg: Config) -> Part:
    """Which upstream files exist, when they were written, and what writes them."""
    rows = []
    for key, rel in results_files.FILES.items():
        if key == "verdicts":
            continue  # this notebook's own output (the verdict table), not an input
        path = cfg.output_dir / rel
        found = path.is_file()
        rows.append({"file": results_files.shown(path), "written": time.strftime("%Y-%m-%d %H:%M", time.localtime(
            path.stat().st_mtime)) if found else "MISSING", "by": results_files.writer(cfg, key)})
    notes = [f"{r['file']} does not exist; it is written by {r['by']}." for r in rows if r["written"] == "MISSING"]
    return Part(pd.DataFrame(rows).set_index("file"), notes=notes,
                caption="The results files this report reads, when each was written, and the notebook that "
                        "writes each.")


def verdict_part(cfg: Config, evaluation: verdict_table.Evaluation) -> Part:
    """The verdict table (verdict_table.evaluate): each question, its answer and the evidence; also
    written to 08_report_figures/verdicts.json."""
    path = verdict_table.save(cfg, evaluation)
    caption = ("Each question of the study with its answer and the evidence: means with 95% intervals, over "
               "seeds where training decides (t-intervals), over the validation images where one model is scored "
               "(bootstrap; paired for two models on the same images, widened by the seed noise of notebook 03 "
               "where separate trainings differ), over repeated timings for speed-ups. Where the intervals "
               f"overlap the answer is '{verdicts.NOT_DISTINGUISHABLE}'; '{verdict_table.NOT_MEASURED}' names the "
               f"notebook to run. Saved as {results_files.shown(path)}.")
    return Part(verdicts.table(evaluation.verdicts), evaluation.inputs, caption=caption)


def data(cfg: Config) -> Part:
    d, path, note = results_files.read(cfg, "data")
    if d is None:
        return Part(notes=[note])
    with results_files.reading(cfg, "data"):
        rows = {split: {"images": s["images"], "image sizes": ", ".join(s["image_sizes"]),
                        "classes present": s["classes_present"], "ignored %": 100 * s["ignored_fraction"],
                        "rarest classes": ", ".join(s["rarest"])} for split, s in d["splits"].items()}
        caption = f"Dataset: {results_files.shown(Path(d['data_root']))}"
        return Part(pd.DataFrame(rows).T.rename_axis("split"), [path], caption=caption)


def cross_datasets(cfg: Config) -> tuple[Part, Part]:
    """Each model (and its training data) on each dataset, and how much each loses off its training
    domain: notebook 02's cross-dataset tables, as saved."""
    d, path, note = results_files.read(cfg, "cross")
    if d is None:
        return Part(notes=[note]), Part()
    with results_files.reading(cfg, "cross"):
        table = cross_dataset.table(d["rows"])
        held = [r["dataset"] for r in d["rows"] if r["dataset"] != d["primary"] and r["dataset"] not in d["mix"]]
        caption = (f"mIoU % over the classes each dataset labels (in its column's name), 95% bootstrap over its val "
                   f"images. Trained on {d['primary']}" + (f", the mixed model also on {', '.join(d['mix'])}" if
                                                           d["mix"] else "")
                   + (f"; held out of every training: {', '.join(dict.fromkeys(held))}." if held else "."))
        figure = path.parent / "cross_dataset.png"
        drops = Part(cross_dataset.drop_table(d["rows"]), [path], caption=(
            f"mIoU points lost off {d['primary']}: each dataset's mIoU minus the same model's on {d['primary']} "
            f"over that dataset's classes, 95% interval resampling each split on its own (*: excludes 0)."))
        return Part(table, [path], caption=caption, images=[figure] if figure.is_file() else []), drops


def models(cfg: Config) -> Part:
    """Accuracy, speed and size of the trained models, one row each."""
    found, paths, notes, b = results_files.trained_models(cfg)
    rows = []
    for name, m in found.items():
        with results_files.reading(cfg, "baselines" if m["source"].parent.name.startswith("01") else "custom"):
            rows.append({"model": name, "val mIoU %": 100 * m["best_miou"],
                         "backbone init": m.get("backbone_init", "unknown"),  # ImageNet or not: a big gap
                         "pixel acc %": 100 * (m["final"].get("val_pixel_acc") or float("nan")),
                         "latency ms": m["latency_ms"], "latency ms channels_last": m.get("latency_cl_ms"),
                         "params M": m["parameters"] / 1e6, "GFLOPs": m["gflops"], "size MB": m.get("size_mb"),
                         "train s": m["train_seconds"], "source": m["source"].parent.name})
    caption = (f"Latency: batch 1 at {b['width']}x{b['height']}, fp32, median, measured by each notebook on "
               f"{b['cpu']} ({b['threads']} threads). mIoU: best validation epoch." if b else "")
    table = pd.DataFrame(rows).set_index("model").round(2) if rows else None
    return Part(table, paths, notes, caption)


def anchors(cfg: Config) -> Part:
    """Each model's best validation mIoU beside the published figures for it (PUBLISHED_MIOU); the
    difference only where this profile trains and scores as those figures did (_not_comparable)."""
    found, paths, notes, _ = results_files.trained_models(cfg)
    order = [*cfg.compare.baselines, *cfg.compare.custom, *(n for by in PUBLISHED_MIOU.values() for n in by)]
    rows = []
    for name in dict.fromkeys(order):
        for source, by_model in PUBLISHED_MIOU.items():
            if name not in by_model:
                continue
            m = found.get(name)
            ours = 100 * m["best_miou"] if m else float("nan")
            why = _not_comparable(cfg, m.get("backbone_init")) if m else "not measured"
            rows.append({"model": name, "ours val mIoU %": ours, "published mIoU %": by_model[name],
                         "ours − published, points": ours - by_model[name] if why is None else float("nan"),
                         "comparable": why or "yes", "published by": source})
    caption = ("Published: mIoU points on the real Cityscapes val split, single-scale, from the source named in "
               "each row. Ours: the best validation epoch under this profile's schedule, one schedule for every "
               "model (docs/study.md, \"The full recipe against its anchors\", lists where it differs from "
               "mmsegmentation's). A difference is given only where this profile trains and scores on real "
               "Cityscapes as the published figures did.")
    return Part(pd.DataFrame(rows).set_index("model"), paths, notes, caption)


def _not_comparable(cfg: Config, backbone_init: str | None) -> str | None:
    """Why this profile's mIoU cannot be read against the published Cityscapes figures; None: it can."""
    data = cfg.data
    root = Path(data.root)
    if data.dataset != "cityscapes":
        return f"not comparable: trained on {data.dataset}"
    if (root / MARKER).is_file() or (data.generate and not root.is_dir()):
        return "not comparable: generated data"
    if data.max_images or data.val_split != "val":
        return f"not comparable: scored on {data.max_images or 'all'} images of split {data.val_split}"
    if data.base_size != PUBLISHED_SHORTER_SIDE:
        return f"not comparable: scored at shorter side {data.base_size}, the published at {PUBLISHED_SHORTER_SIDE}"
    if backbone_init == "random":  # the published models start from ImageNet weights
        return "not comparable: random-init backbone"
    return None


def per_class(cfg: Config) -> Part:
    """IoU % per class (rows) and model (columns) at each model's best validation epoch."""
    found, paths, notes, _ = results_files.trained_models(cfg)
    with results_files.reading(cfg, "custom"):
        table = result_tables.per_class_table(found).T if found else None
    unresolved = _unresolved(cfg, table) if table is not None else None
    return Part(table, paths, notes + ([unresolved] if unresolved else []))


def _unresolved(cfg: Config, table: pd.DataFrame) -> str | None:
    """The classes no model resolves (IoU 0 or unscored in every model) and why: their median
    object's area at the evaluation size, from notebook 00's statistics."""
    zero = [c for c in table.index if not (table.loc[c].fillna(0) > 0).any()]  # rows: classes
    if not zero:
        return None
    d, _, _ = results_files.read(cfg, "data")
    split = (d or {}).get("splits", {}).get(cfg.data.val_split, {})
    medians, image_sizes = split.get("small_object_median_px") or {}, split.get("image_sizes") or []
    sizes = ""
    if medians and image_sizes:  # evaluation resizes the shorter side to base_size
        scale = (cfg.data.base_size / min(int(size.split("x")[1]) for size in image_sizes)) ** 2
        known = [f"{c} {medians[c] * scale:.0f}" for c in zero if medians.get(c)]
        sizes = (f"; median object area at the evaluation size, px: {', '.join(known)}" if known else "")
    return (f"IoU 0 in every model: {', '.join(zero)}. At the evaluation size (shorter side {cfg.data.base_size})"
            f"{sizes}: too few pixels, seen too rarely, for models trained {cfg.train.epochs} epochs from "
            f"random init to learn them; this profile cannot resolve these classes, so no verdict rests on them.")


def per_class_figure(part: Part) -> plt.Figure | None:
    return None if part.table is None else figures.iou_heatmap(part.table.T, "Per-class validation IoU % (best epoch)")


def losses(cfg: Config) -> Part:
    """mIoU mean, spread and range over seeds per loss (notebook 03's summary, as saved)."""
    d, path, note = results_files.read(cfg, "losses")
    if d is None:
        return Part(notes=[note])
    with results_files.reading(cfg, "losses"):
        table = pd.DataFrame(d["summary"]).set_index("loss")
        seeds = sorted({r["seed"] for r in d["runs"]})
        epochs = f"{d['epochs']:g} epoch{'' if d['epochs'] == 1 else 's'}"
        return Part(table, [path], caption=f"The {d.get('model', 'custom')} model, {epochs} per run, seeds "
                                           f"{', '.join(map(str, seeds))}: std and min-max are over seeds.")


def loss_figure(cfg: Config) -> plt.Figure | None:
    d, _, _ = results_files.read(cfg, "losses")
    if d is None:
        return None
    with results_files.reading(cfg, "losses"):
        per_run = pd.Series({(r["loss"], r["seed"]): 100 * r["best_miou"] for r in d["runs"]})
    return figures.miou_spread(per_run.rename_axis(["loss", "seed"]))


def pruning(cfg: Config) -> tuple[Part, Part]:
    """Every pruned model of notebook 04 (dense first), and the targets read off those rows."""
    d, path, note = results_files.read(cfg, "pruning")
    if d is None:
        return Part(notes=[note]), Part()
    with results_files.reading(cfg, "pruning"):
        rows, dense = d["rows"], d["dense"]
        b = d["bench"]
        caption = (f"Latency: batch 1 at {b['width']}x{b['height']}, fp32, {d['cpu']['cpu']}; "
                   f"mIoU in points on the validation split; the dense row is notebook 02's custom model.")
        return (Part(results_files.pruning_table([dense, *rows]), [path], caption=caption),
                Part(pruning_targets.table(cfg), [path]))


def pruning_figure(cfg: Config) -> plt.Figure | None:
    d, _, _ = results_files.read(cfg, "pruning")
    if d is None:
        return None
    with results_files.reading(cfg, "pruning"):
        return figures.pareto(d["rows"], d["dense"])


def quantization(cfg: Config) -> tuple[Part, Part]:
    """One row per variant (engine x precision): mIoU, its change, latency, speed-up, size; and
    notebook 05's targets as it checked them."""
    d, path, note = results_files.read(cfg, "quantization")
    if d is None:
        return Part(notes=[note]), Part()
    with results_files.reading(cfg, "quantization"):
        rows = results_files.quantization_rows(d)
        ref_name = d.get("reference", "fp32 eager")
        ref_name = ref_name if ref_name in rows else next(iter(rows))
        table = result_tables.quantization_table(rows, ref_name)
        cpu = d.get("cpu", {})
        caption = (f"Speed-up against '{ref_name}', measured side by side in one run"
                   + (f" on {cpu.get('cpu')} (AVX-512 VNNI: {cpu.get('avx512_vnni')})." if cpu else "."))
        targets = d.get("targets") or {}
        target_part = Part(pd.DataFrame(targets).T.round(3).rename_axis("variant"), [path]) if targets else Part()
        return Part(table.rename_axis("variant"), [path], caption=caption), target_part


@dataclass
class Recommended:
    """The report's recommendation: its table (every candidate, the eligible ones and the pick),
    the pick as recommended.json saves it (None: no model to pick from) and the candidates, for
    tradeoff_figure."""

    part: Part
    pick: dict | None
    pool: pd.DataFrame


def recommendation(cfg: Config, evaluation: verdict_table.Evaluation) -> Recommended:
    """The verdict table's deployment answer with its pool (verdicts.recommend_deployment: the
    fastest measured model whose mIoU interval reaches report.tolerance points below the lower end
    of the most accurate model's interval), as a table of every candidate.

    Why this rule: a gap inside the seed-to-seed and image-to-image noise is no evidence for paying
    with a slower model, and a model whose whole interval is further down is really worse."""
    pool, chosen = evaluation.pool, evaluation.recommendation
    if pool is None:  # a file the pool reads is bad: the verdict table's deployment row says which
        return Recommended(Part(notes=[evaluation.verdicts[-1].evidence]), None, pd.DataFrame())
    notes = [f"not in the pool below: {n}" for n in pool.notes]
    if chosen is None:
        return Recommended(Part(notes=notes or ["no model with both mIoU and latency was found"],
                                sources=pool.sources), None, pool.table)
    tolerance, bar = cfg.report.tolerance, chosen.bar
    best = pool.table[pool.table["model"] == chosen.best].iloc[0]
    table = pool.table.assign(**{"Δ mIoU vs best": pool.table["mIoU %"] - best["mIoU %"],
                                 "eligible": ["yes" if h >= bar else "" for h in pool.table["mIoU high"]],
                                 "recommended": ["★" if m == chosen.pick else "" for m in pool.table["model"]]})
    pick = table[table["model"] == chosen.pick].iloc[0]
    noise = str(pool.noise) if pool.noise else "seed noise not measured: run notebook 03"
    caption = (f"Rule: the fastest model whose 95% mIoU interval reaches {bar:.2f}, {tolerance:g} point below the "
               f"interval of the most accurate model ({best['model']}, {best['mIoU %']:.2f} "
               f"[{best['mIoU low']:.2f}, {best['mIoU high']:.2f}]). Intervals: {pick['estimate'].how}; "
               f"{noise}. Recommended: {pick['model']}, {pick['mIoU %']:.2f} mIoU % "
               f"[{pick['mIoU low']:.2f}, {pick['mIoU high']:.2f}], {pick['latency ms']:.1f} ms "
               f"({best['latency ms'] / pick['latency ms']:.2f}x faster than {best['model']}); from {pick['source']}. "
               f"Rows: every measured model, most accurate first. Latencies come from each notebook's own run "
               f"on this machine, so ratios are exact only within one source (notebook 05 measures its "
               f"variants side by side).")
    table = table.assign(_shown=table["mIoU %"].round(2)).sort_values(["_shown", "latency ms"], ascending=[False, True])
    cols = ["model", "mIoU %", "mIoU low", "mIoU high", "Δ mIoU vs best", "latency ms", "eligible", "recommended",
            "source"]
    plain = ["model", "mIoU %", "mIoU low", "mIoU high", "latency ms", "source"]
    saved = {**pick[plain].to_dict(), "tolerance": tolerance, "bar": bar, "rule": chosen.verdict.evidence,
             "best": best[plain].to_dict()}
    return Recommended(Part(table[cols].set_index("model").round(2), pool.sources, notes, caption), saved, pool.table)


def _pareto_front(pool: pd.DataFrame) -> pd.DataFrame:
    """The models no other model beats on both latency and mIoU."""
    front, top = [], float("-inf")
    for i, r in pool.sort_values(["latency ms", "mIoU %"], ascending=[True, False]).iterrows():
        if r["mIoU %"] > top:
            front.append(i)
            top = r["mIoU %"]
    return pool.loc[front]


def tradeoff_figure(recommended: Recommended, view: float = 6.0) -> plt.Figure | None:
    """mIoU against latency for the candidates within `view` points of the best (how many are
    below is written on the plot; all are in the recommendation's table), the tolerance band and
    the recommended model. Named: the Pareto front's steps of at least 0.1 point, and its end."""
    pool, pick = recommended.pool, recommended.pick
    if pick is None:
        return None
    tolerance = pick["tolerance"]
    top = pick["best"]["mIoU %"]
    shown = pool[pool["mIoU %"] >= top - view]
    fig, ax = plt.subplots(figsize=(10, 5.2))
    for source, g in shown.groupby("source", sort=False):
        points = ax.scatter(g["latency ms"], g["mIoU %"], s=45, label=Path(source).parent.name, zorder=2)
        low, high = (g["mIoU %"] - g["mIoU low"]).clip(upper=view), (g["mIoU high"] - g["mIoU %"]).clip(upper=view)
        ax.errorbar(g["latency ms"], g["mIoU %"], yerr=[low, high], fmt="none", ecolor=points.get_facecolor()[0],
                    alpha=0.5, linewidth=1, zorder=1)  # the intervals the rule uses (clipped to the view)
    front = _pareto_front(shown)
    ax.step(front["latency ms"], front["mIoU %"], where="post", color="grey", linewidth=1, zorder=1,
            label="Pareto front")
    named, last = [], float("-inf")
    for _, r in front.iterrows():  # variants a hair apart in mIoU would pile their names on one spot
        if r["mIoU %"] >= last + 0.1:
            named.append(r)
            last = r["mIoU %"]
    end = front.iloc[-1]  # the most accurate model at its lowest latency
    if all(r["model"] != end["model"] for r in named):
        named.append(end)
    for r in named:  # a leader line ties each name to its point when points crowd
        ax.annotate(r["model"], (r["latency ms"], r["mIoU %"]), xytext=(8, -18), textcoords="offset points",
                    fontsize=8, arrowprops={"arrowstyle": "-", "linewidth": 0.6, "color": "dimgrey"})
    bar = pick["bar"]  # the rule's, as verdicts.recommend_deployment applied it
    ax.axhspan(bar, top, color="green", alpha=0.12,
               label=f"an interval reaching {bar:.2f} is eligible ({tolerance:g} point below the best's interval)")
    ax.scatter([pick["latency ms"]], [pick["mIoU %"]], s=320, marker="*", color="gold", edgecolor="black",
               zorder=3, label="recommended")
    if len(shown) < len(pool):
        ax.text(0.01, 0.02, f"{len(pool) - len(shown)} models below {top - view:.1f}% mIoU are off this view "
                f"(see the table)", transform=ax.transAxes, fontsize=8, color="dimgrey")
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the names of the points at the edges
    ax.set(xlabel="latency ms (batch 1, log scale)", ylabel="val mIoU %", title="Accuracy against speed")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    fig.tight_layout()
    return fig


def predictions(cfg: Config) -> Part:
    """The prediction grids notebooks 01 and 02 saved (image | ground truth | each model)."""
    part = Part()
    for key in ("baselines", "custom"):
        path = cfg.output_dir / results_files.FILES[key].replace("results.json", "predictions.png")
        if path.is_file():
            part.images.append(path)
        else:
            part.notes.append(f"{results_files.shown(path)} does not exist; "
                              f"it is written by {results_files.writer(cfg, key)}.")
    return part


def sweeps(cfg: Config) -> Part:
    """The runs of `segstudy sweep` made with this profile (outputs/sweeps/*/sweep.json)."""
    rows, paths = [], []
    for path, d, runs in results_files.sweeps(cfg):
        paths.append(path)
        rows += [{"sweep": d["sweep"], "notebook": d.get("notebook"),
                  "params": ", ".join(f"{k}={v}" for k, v in run["params"].items()),
                  "best mIoU %": None if run["best_miou"] is None else 100 * run["best_miou"],
                  "seconds": run["seconds"], "error": run["error"]} for run in runs]
    if not rows:
        return Part(caption="No sweep was run with this profile (segstudy sweep NOTEBOOK -p KEY VALUES ...).")
    table = pd.DataFrame(rows).set_index("sweep").round(2)
    return Part(table if table["error"].any() else table.drop(columns="error"), paths)


def save(fig: plt.Figure | None, path: Path) -> Path | None:
    """Save a figure next to the report and show the saved PNG now (None: its data is missing,
    and a note says so). Showing the file, not the figure, works whatever matplotlib backend the
    kernel has (MPLBACKEND=Agg shows nothing inline) and keeps it above the next output."""
    from IPython.display import Image, display

    if fig is None:
        return None
    figures.save(fig, path)
    plt.close(fig)
    display(Image(data=path.read_bytes(), format="png"))
    return path
