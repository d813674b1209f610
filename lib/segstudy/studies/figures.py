"""Figures shared by the notebooks (matplotlib/seaborn). Each returns its Figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from segstudy.data.cityscapes import SegmentationFolder
from segstudy.data.labels import CLASS_NAMES, PALETTE, colorize


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the official label colours over an RGB image (ignored pixels stay as they are)."""
    color = colorize(train_ids).astype(np.float32)
    keep = (train_ids < len(CLASS_NAMES))[..., None]
    out = np.where(keep, (1 - alpha) * image + alpha * color, image)
    return out.astype(np.uint8)


def legend_handles() -> list[Patch]:
    return [Patch(color=PALETTE[i] / 255, label=name) for i, name in enumerate(CLASS_NAMES)]


def sample_grid(dataset: SegmentationFolder, n: int = 6, cols: int = 3) -> plt.Figure:
    """n images with their colour-coded labels blended on top, and one legend."""
    n = min(n, len(dataset))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.3 * rows + 0.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        image, target = dataset.load(i)
        ax = axes.flat[i]
        ax.imshow(overlay(np.asarray(image), target))
        ax.set_title(dataset.samples[i].stem, fontsize=8)
    fig.legend(handles=legend_handles(), loc="lower center", ncol=10, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def class_frequency(stats: dict[str, dict]) -> plt.Figure:
    """Pixel share per class and split, log scale, bars in the official colours."""
    df = pd.DataFrame({split: s["frequency"] for split, s in stats.items()})
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(df.columns)
    x = np.arange(len(df))
    for k, split in enumerate(df.columns):
        ax.bar(x + k * width, df[split].clip(lower=1e-7), width, label=split,
               color=PALETTE / 255, edgecolor="black", linewidth=0.4, alpha=1.0 - 0.4 * k)
    ax.set_yscale("log")
    ax.set_xticks(x + width * (len(df.columns) - 1) / 2, df.index, rotation=60, ha="right")
    ax.set_ylabel("share of labelled pixels (log)")
    ax.set_title("Class pixel frequency (" + ", ".join(
        f"{split}: {'solid' if k == 0 else 'faded'}" for k, split in enumerate(df.columns)) + ")")
    fig.tight_layout()
    return fig


def class_presence(stats: dict[str, dict]) -> plt.Figure:
    """Fraction of images in which each class appears, as a heatmap (split x class)."""
    df = pd.DataFrame({split: s["presence"] for split, s in stats.items()}).T
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.5 * len(df)))
    sns.heatmap(df, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar=False, ax=ax,
                annot_kws={"fontsize": 7})
    ax.set_title("Share of images in which each class is present")
    fig.tight_layout()
    return fig


def object_sizes(stats: dict[str, dict]) -> plt.Figure:
    """Connected-component areas of the small classes (log scale box plot)."""
    rows = [(split, name, area) for split, s in stats.items()
            for name, areas in s["object_sizes"].items() for area in areas]
    df = pd.DataFrame(rows, columns=["split", "class", "area_px"])
    fig, ax = plt.subplots(figsize=(10, 4))
    if len(df):
        sns.boxplot(df, x="class", y="area_px", hue="split", log_scale=True, ax=ax, fliersize=1.5)
    ax.set_ylabel("object area in pixels (log)")
    ax.set_title("How small the small classes are (connected components per image)")
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _in_points(rows: pd.DataFrame) -> pd.DataFrame:
    """Results files hold mIoU as a fraction (results_files); figures show points."""
    return rows.assign(miou=100 * rows["miou"].astype(float))


def pruning_curves(rows: list[dict], dense: dict) -> plt.Figure:
    """mIoU vs pruned fraction per method (lines: no recovery; markers: fine-tuned / distilled)."""
    df = _in_points(pd.DataFrame(rows))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    plain = df[df["recovery"] == "none"]
    for method, g in plain.groupby("method", sort=False):
        if g["level"].nunique() > 1:
            ax.plot(g["level"], g["miou"], marker="o", label=f"{method} (no recovery)")
    for (method, rec), g in df[df["recovery"] != "none"].groupby(["method", "recovery"], sort=False):
        ax.scatter(g["level"], g["miou"], s=90, marker="*" if rec == "KD" else "D", label=f"{method} + {rec}",
                   zorder=3)
    ax.axhline(100 * dense["miou"], color="black", linestyle="--", label=f"dense {100 * dense['miou']:.1f}")
    ax.set(xlabel="pruned fraction (weights: unstructured; channels per layer: structured)",
           ylabel="val mIoU %", title="Accuracy against pruning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pruning_cost(rows: list[dict], dense: dict) -> plt.Figure:
    """Latency, parameters and size on disk against the pruned fraction (measured models only)."""
    df = pd.DataFrame(rows)
    df = df[(df["recovery"] == "none")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, col, label in zip(axes, ["latency_ms", "params", "size_gz_mb"],
                              ["latency ms (batch 1, fp32)", "parameters", "gzip-compressed size MB"]):
        for method, g in df.groupby("method", sort=False):
            g = g.dropna(subset=[col]) if col in g else g.iloc[0:0]
            if g["level"].nunique() > 1:
                ax.plot([0, *g["level"]], [dense[col], *g[col]], marker="o", label=method)
        ax.set(xlabel="pruned fraction", ylabel=label)
    axes[0].legend(fontsize=8)
    fig.suptitle("What pruning buys: zeros alone change neither latency nor parameters, channels do")
    fig.tight_layout()
    return fig


def pareto(rows: list[dict], dense: dict) -> plt.Figure:
    """mIoU against latency for every measured model; the Pareto front joins the undominated ones."""
    df = _in_points(pd.DataFrame([dense | {"method": "dense", "recovery": "none", "level": 0}, *rows]))
    df = df.dropna(subset=["latency_ms"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (method, rec), g in df.groupby(["method", "recovery"], sort=False):
        ax.scatter(g["latency_ms"], g["miou"], s=50, label=method if rec == "none" else f"{method} + {rec}")
    front, best = [], -1.0
    for _, r in df.sort_values("latency_ms").iterrows():
        if r["miou"] > best:
            front.append(r)
            best = r["miou"]
    ax.plot([r["latency_ms"] for r in front], [r["miou"] for r in front], color="grey", zorder=0, label="Pareto front")
    ax.set(xlabel="latency ms (batch 1, fp32, this CPU)", ylabel="val mIoU %", title="Accuracy against speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_sparsity(layers: dict[str, dict[str, float]]) -> plt.Figure:
    """Per-layer zero fraction for each unstructured scope (layerwise is flat by construction)."""
    fig, ax = plt.subplots(figsize=(12, 3.5))
    for scope, per_layer in layers.items():
        ax.plot(range(len(per_layer)), [100 * v for v in per_layer.values()], marker=".", label=scope)
    ax.set(xlabel="conv layer (input to output)", ylabel="zeros %", title="Where the zeros go")
    ax.legend()
    fig.tight_layout()
    return fig


def learning_curves(results: dict[str, dict]) -> plt.Figure:
    """Training loss and validation mIoU per epoch, one line per model."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, r in results.items():
        h = r["history"]
        a.plot([x["epoch"] for x in h], [x["train_loss"] for x in h], marker="o", label=name)
        v = [x for x in h if "val_miou" in x]
        b.plot([x["epoch"] for x in v], [100 * x["val_miou"] for x in v], marker="o", label=name)
    a.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.set(xlabel="epoch", ylabel="val mIoU %", title="Validation mIoU")
    a.legend()
    fig.tight_layout()
    return fig


def _annotated_heatmap(table: pd.DataFrame, title: str, **style) -> plt.Figure:
    """Rows x classes with the value written in each cell: one row per model, loss or variant."""
    fig, ax = plt.subplots(figsize=(12, 1.1 + 0.45 * len(table)))
    sns.heatmap(table.astype(float), annot=True, ax=ax, cbar=False, annot_kws={"fontsize": 7}, **style)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def iou_heatmap(table: pd.DataFrame, title: str = "Per-class IoU %") -> plt.Figure:
    return _annotated_heatmap(table, title, fmt=".0f", vmin=0, vmax=100, cmap="magma")


def prediction_grid(dataset, preds: dict[str, list[np.ndarray]], n: int) -> plt.Figure:
    """Rows: images; columns: image | ground truth | each model's prediction."""
    from segstudy.data.transforms import denormalize

    cols = 2 + len(preds)
    fig, axes = plt.subplots(n, cols, figsize=(3.0 * cols, 1.7 * n + 0.6), squeeze=False)
    for i in range(n):
        image, target = dataset[i]
        rgb = (denormalize(image).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        panels = [rgb, overlay(rgb, target.numpy())] + [overlay(rgb, p[i]) for p in preds.values()]
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel)
            ax.axis("off")
            if i == 0:
                ax.set_title(["image", "ground truth", *preds][j], fontsize=9)
    fig.legend(handles=legend_handles(), loc="lower center", ncol=10, fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def spread_curves(curves: dict[str, dict[str, list[float]]]) -> plt.Figure:
    """Validation mIoU per epoch: mean over seeds as a line, min-max over seeds as a band."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, c in curves.items():
        ax.plot(c["epoch"], c["mean"], marker="o", label=name)
        ax.fill_between(c["epoch"], c["min"], c["max"], alpha=0.2)
    ax.set(xlabel="epoch", ylabel="val mIoU %", title="Learning curves (mean over seeds, band: min-max)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    return fig


def miou_spread(per_run: pd.Series) -> plt.Figure:
    """mIoU per loss: one dot per seed and the mean."""
    df = per_run.rename("mIoU %").reset_index()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.stripplot(df, x="loss", y="mIoU %", size=8, ax=ax, color="black")
    sns.pointplot(df, x="loss", y="mIoU %", errorbar=None, markers="_", linestyles="none", color="red", ax=ax)
    ax.set_title("Validation mIoU per loss (dots: seeds, red: mean)")
    fig.tight_layout()
    return fig


def delta_bars(delta: pd.DataFrame, reference: str = "ce") -> plt.Figure:
    """Small-class IoU change vs the reference loss, in points."""
    fig, ax = plt.subplots(figsize=(10, 3.8))
    if "note" in delta.columns:
        ax.text(0.5, 0.5, delta["note"].iloc[0], ha="center", va="center")
        ax.axis("off")
        return fig
    delta.T.plot.bar(ax=ax)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel=f"IoU points vs {reference}", title=f"Small classes: IoU gained or lost against {reference}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


# --- notebook 05 (quantization) ------------------------------------------------------------------

_PRECISION_COLORS = {"fp32": "tab:blue", "bf16": "tab:purple", "int8": "tab:green"}


def quant_variants(table: pd.DataFrame) -> plt.Figure:
    """Every variant of notebook 05 side by side: latency, validation mIoU and size on disk, one bar
    each, coloured by precision (the table from quantize.table)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 1.4 + 0.42 * len(table)), sharey=True)
    colors = [_PRECISION_COLORS.get(str(p).split()[0], "tab:gray") for p in table["precision"]]
    y = np.arange(len(table))
    for ax, col in zip(axes, ["latency ms", "val mIoU %", "size MB"]):
        values = table[col].astype(float)
        ax.barh(y, values, color=colors)
        for k, v in enumerate(values):
            ax.text(v, k, f" {v:.1f}", va="center", fontsize=8)
        ax.set_xlabel(col)
        ax.set_xlim(0, 1.2 * values.max())
    axes[0].set_yticks(y, table.index)
    axes[0].invert_yaxis()
    fig.legend(handles=[Patch(color=c, label=p) for p, c in _PRECISION_COLORS.items()], loc="upper right",
               ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Every variant: batch-1 latency, validation mIoU, size on disk", x=0.01, ha="left")
    fig.tight_layout()
    return fig


def calibration_curve(miou_by_n: dict[int, float], reference: float) -> plt.Figure:
    """int8 validation mIoU % against the number of calibration images, fp32 as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ns = sorted(miou_by_n)
    ax.plot(ns, [miou_by_n[n] for n in ns], marker="o", label="int8 PTQ (torch FX)")
    ax.axhline(reference, color="black", linestyle="--", linewidth=1, label="fp32")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    # at least 2 points of mIoU on the axis, so hundredths of a point do not look like a slope
    lo, hi = min([*miou_by_n.values(), reference]), max([*miou_by_n.values(), reference])
    pad = max(0.0, 2.0 - (hi - lo)) / 2
    ax.set_ylim(lo - pad - 0.1, hi + pad + 0.1)
    ax.set(xlabel="calibration images N", ylabel="val mIoU %", title="mIoU vs number of calibration images")
    ax.legend()
    fig.tight_layout()
    return fig


def iou_delta_heatmap(delta: pd.DataFrame, title: str = "Per-class IoU change vs fp32 (points)") -> plt.Figure:
    """Variants x classes, IoU points gained (blue) or lost (red) against the reference."""
    limit = max(1.0, float(np.nanmax(np.abs(delta.to_numpy(dtype=float)))) if delta.size else 1.0)
    return _annotated_heatmap(delta, title, fmt=".1f", center=0, vmin=-limit, vmax=limit, cmap="RdBu")
