"""Notebook 07 and `segstudy monitor`: the drift score of deploy/drift.py over a stream of images.

The notebook feeds notebook 02's custom model (registered as segstudy-custom@champion, with the
reference stored at registration) windows of held-out in-domain val images (those the reference
did not read), then windows of a shifted domain: the val images of the profile's first cross
dataset (cross.*: the generated BDD100K-layout set in the demo), or, in a profile without one, the
same generator's BDD100K domain (camera, light and palette shifted). It states the measured false
alarm rate (in-domain windows over the threshold) and the detection delay (images from the shift to
the end of the first window over it). The report (notebook 08) shows the saved results with `part`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from segstudy.config import Config
from segstudy.deploy import drift, image_inputs, inference, registry
from segstudy.errors import UserError
from segstudy.studies import figures, results_files

NOTEBOOK = "07_monitoring"
MODEL_URI = "models:/segstudy-custom@champion"  # notebook 02's model (model_comparison.register)


@dataclass
class MonitorStudy:
    cfg: Config
    out: Path
    model: str  # what was served: the registered URI or the checkpoint
    reference: drift.Reference
    segment: Callable[[np.ndarray], np.ndarray]
    in_domain: list[Path]
    shifted: list[Path] | list[np.ndarray]
    in_source: str
    shift_source: str
    seconds: float = 0.0  # feeding both streams: decode, model, features
    windows: pd.DataFrame | None = None  # run()'s table


def _checkpoint(cfg: Config) -> Path:
    ckpt = cfg.output_dir / "runs" / "custom" / "checkpoint_best.pt"
    if not ckpt.is_file():
        raise UserError(f"{ckpt} does not exist: notebook {NOTEBOOK} watches the model notebook 02_custom_model "
                        f"trains; run it first (./run_all.sh {cfg.profile} --only 02)")
    return ckpt


def served_model(cfg: Config) -> tuple[str, drift.Reference, Callable[[np.ndarray], np.ndarray]]:
    """(name, reference, segment): the registered custom model and the reference stored with it;
    notebook 02's checkpoint and a reference computed the same way where the registry is off
    (tracking.backend none) or the registered version predates the reference."""
    ckpt = _checkpoint(cfg)
    if cfg.tracking.backend == "mlflow":
        model = registry.load(cfg, MODEL_URI)
        if model.reference is not None:
            return MODEL_URI, model.reference, model.segment
        print(f"{MODEL_URI} was registered without a drift reference: computed here from {ckpt.name}")
    engine = inference.load_engine(ckpt)
    base = cfg.data.base_size
    return str(ckpt), drift.reference_for(cfg, ckpt, base), lambda image: inference.segment(engine, image, base)


def in_domain_images(cfg: Config, count: int) -> tuple[list[Path], str]:
    """`count` in-domain images the reference did not read: held-out val images, topped up with
    training images when the val split is too small (the rehearsal's single val image)."""
    _, held = drift.val_images(cfg)
    if len(held) >= count:
        return drift.held_out(held, count)[0], f"{count} held-out {cfg.data.val_split} images"
    from segstudy.data.datasets import build_dataset

    train = [s.image for s in build_dataset(cfg.data, cfg.data.train_split, raw=True).samples]
    extra = drift.held_out(train, count - len(held))[0]
    return held + extra, f"{len(held)} held-out {cfg.data.val_split} + {len(extra)} {cfg.data.train_split} images"


def shifted_images(cfg: Config, count: int, like: Sequence[Path]) -> tuple[list, str]:
    """`count` images of the shifted domain: the first cross dataset's val images; else the
    generator's BDD100K domain rendered at the in-domain images' size."""
    from segstudy.data.datasets import build_dataset, data_config, dataset_names

    others = dataset_names(cfg)[1:]
    if others:
        data = data_config(cfg, others[0])
        paths = [s.image for s in build_dataset(data, data.val_split, raw=True).samples]
        source = f"{others[0]} {data.val_split} at {data.root}"
        if len(paths) < count:  # the rehearsal's single val image: its training images too (the same domain)
            train = [s.image for s in build_dataset(data, data.train_split, raw=True).samples]
            paths += drift.held_out(train, count - len(paths))[0]
            source = f"{others[0]} {data.val_split} + {data.train_split} at {data.root}"
        return drift.held_out(paths, count)[0], source
    from segstudy.data.synthetic.scene import DOMAINS, render

    height, width = image_inputs.read_image(like[0]).shape[:2]
    images = [render(height, width, cfg.seed + 1, "val", i, DOMAINS["bdd100k"])[0] for i in range(count)]
    return images, f"the generator's bdd100k domain at {width}x{height} (no cross dataset in this profile)"


def start(cfg: Config) -> MonitorStudy:
    """The served model, its reference, and the two streams of images."""
    name, reference, segment = served_model(cfg)
    count = cfg.monitoring.study_windows * reference.window
    in_domain, in_source = in_domain_images(cfg, count)
    shifted, shift_source = shifted_images(cfg, count, in_domain)
    return MonitorStudy(cfg, cfg.output_dir / NOTEBOOK, name, reference, segment, in_domain, shifted, in_source,
                        shift_source)


def threshold_text(threshold: float | None, false_alarm: float, windows: int) -> str:
    """The threshold and where it comes from; none when the reference was too small to calibrate
    (written to JSON, an infinite threshold becomes null)."""
    if threshold is None or not math.isfinite(threshold):
        return "no threshold (too few reference images to hold windows out: no alarm)"
    return f"threshold {threshold:.3f} = the {1 - false_alarm:.0%} quantile of {windows} held-out in-domain windows"


def describe(study: MonitorStudy) -> str:
    r = study.reference
    return (f"model: {study.model}\nreference: {r.source}; {r.statistic}; windows of {r.window} images; "
            f"{threshold_text(r.threshold, r.false_alarm, len(r.calibration))}\nin-domain stream: {study.in_source}"
            f"\nshifted stream: {study.shift_source}")


def _images(items: Sequence) -> Iterator[np.ndarray]:
    for item in items:
        yield item if isinstance(item, np.ndarray) else image_inputs.read_image(item)


def run(study: MonitorStudy) -> pd.DataFrame:
    """Feed the in-domain stream, then the shifted one; one row per window (tumbling windows, so
    no window mixes the two)."""
    start = time.perf_counter()
    rows = {domain: drift.rows_of(_images(items), study.segment)
            for domain, items in (("in-domain", study.in_domain), ("shifted", study.shifted))}
    study.seconds = time.perf_counter() - start
    windows = []
    for domain, found in rows.items():
        for w in drift.score_windows(study.reference, found, step=study.reference.window):
            windows.append(w | {"domain": domain, "window": len(windows)})
    columns = ["window", "first", "last", "label", "score", "alarm", *drift.FEATURES, "domain"]
    study.windows = pd.DataFrame(windows, columns=columns).set_index("window")  # columns: even with no window
    return study.windows


def summary(study: MonitorStudy) -> dict:
    """The measured false-alarm rate (with a 95% Clopper-Pearson interval) and detection delay."""
    w, r = study.windows, study.reference
    inside, shifted = w[w["domain"] == "in-domain"], w[w["domain"] == "shifted"]
    alarms = int(inside["alarm"].sum())
    first = shifted.index[shifted["alarm"].to_numpy()]
    # a new camera's frame size alone crosses (size, aspect); the content's distances say whether the pixels did too
    content = shifted[list(drift.HISTOGRAMS)].max(axis=1) > r.threshold
    delay = None if len(first) == 0 else int(first[0] - shifted.index[0])  # windows before the first alarm
    return {"statistic": r.statistic, "window": r.window, "threshold": r.threshold,
            "false_alarm_target": r.false_alarm, "in_domain_windows": len(inside), "false_alarms": alarms,
            "false_alarm_rate": alarms / len(inside) if len(inside) else math.nan,
            "false_alarm_interval": clopper_pearson(alarms, len(inside)),
            "shifted_windows": len(shifted), "detected": int(shifted["alarm"].sum()),
            "detected_by_content": int(content.sum()),
            "delay_windows": delay, "delay_images": None if delay is None else (delay + 1) * r.window,
            "seconds_scoring": study.seconds, "model": study.model, "reference": r.source,
            "in_domain": study.in_source, "shifted": study.shift_source}


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval of k successes in n."""
    from scipy.stats import beta

    if n == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def statement(s: dict) -> str:
    """The result in one sentence each: the false-alarm rate and the detection delay."""
    if s["threshold"] is None or not math.isfinite(s["threshold"]):
        return (f"{threshold_text(None, 0, 0).capitalize()}. Windows scored: {s['in_domain_windows']} in-domain, "
                f"{s['shifted_windows']} shifted.")
    delay = ("the shift was not detected" if s["delay_windows"] is None else
             f"the first alarm came {s['delay_images']} images after the shift (window {s['delay_windows'] + 1} "
             f"of the shifted stream); {s['detected']} of {s['shifted_windows']} shifted windows crossed the "
             f"threshold" + ("" if s.get("detected_by_content") is None else  # files before that field: without
                             f", {s['detected_by_content']} of them on the pixels and predictions alone (without size "
                             f"and aspect)"))
    if not s["in_domain_windows"]:
        return f"No in-domain window (too few held-out images). Detection: {delay}."
    low, high = s["false_alarm_interval"]
    return (f"False alarms: {s['false_alarms']} of {s['in_domain_windows']} in-domain windows "
            f"({100 * s['false_alarm_rate']:.0f}%, 95% interval {100 * low:.0f}-{100 * high:.0f}%; the threshold "
            f"{s['threshold']:.3f} was set for {100 * s['false_alarm_target']:.0f}%). Detection: {delay}.")


def figure(windows: pd.DataFrame, threshold: float, window: int, title: str = "") -> plt.Figure:
    """The drift score of each window against the threshold, coloured by domain (when known)."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ends = (windows["last"] + 1).to_numpy()
    domains = windows["domain"] if "domain" in windows else pd.Series("", index=windows.index)
    for domain, colour in (("in-domain", "tab:blue"), ("shifted", "tab:red"), ("", "tab:gray")):
        mask = (domains == domain).to_numpy()
        if mask.any():
            ax.plot(ends[mask], windows["score"].to_numpy()[mask], "o-", color=colour, label=domain or "windows")
    if math.isfinite(threshold):
        ax.axhline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("images fed (end of each window)")
    ax.set_ylabel("drift score (JS distance)")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"Drift score per window of {window} images")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def save(study: MonitorStudy) -> Path:
    """results.json (the summary, every window, the reference's calibration scores) and windows.csv
    (the notebook saves drift.png, the figure it shows)."""
    results_files.write_csv(study.out / "windows.csv", study.windows.round(4))
    return results_files.write_monitoring(study.cfg, summary(study), study.windows.reset_index().to_dict("records"),
                                          study.reference.summary() | {"calibration": study.reference.calibration})


def part(cfg: Config):
    """The report's section (notebook 08): notebook 07's saved summary and figure, recomputing nothing."""
    from segstudy.studies.report_figures import Part

    d, path, note = results_files.read(cfg, "monitoring")
    if d is None:
        return Part(notes=[note])
    with results_files.reading(cfg, "monitoring"):
        s = d["summary"]
        delay = "not detected" if s["delay_images"] is None else s["delay_images"]
        table = pd.DataFrame([{"statistic": s["statistic"], "window (images)": s["window"], "threshold": s["threshold"],
                               "false alarms": f"{s['false_alarms']} of {s['in_domain_windows']}",
                               "false-alarm rate %": _percent(s["false_alarm_rate"]),
                               "target %": 100 * s["false_alarm_target"],
                               "detection delay (images)": delay,
                               "shifted windows detected": f"{s['detected']} of {s['shifted_windows']}"}])
        caption = (f"{statement(s)} Model: {s['model']}; reference: {s['reference']}; in-domain: {s['in_domain']}; "
                   f"shifted: {s['shifted']}.")
    figure_file = path.parent / "drift.png"
    return Part(table, [path], caption=caption, images=[figure_file] if figure_file.is_file() else [])


def _percent(share: float | None) -> float:
    return math.nan if share is None else 100 * share


# --- segstudy monitor (what it reads: deploy/image_inputs.py) ------------------------------------

UNREADABLE_SHOWN = 10  # unreadable inputs named in the text summary (--json lists them all)


def monitor(cfg: Config, model: str, inputs: Sequence[str | Path], step: int | None = None,
            plot: str | Path | None = None) -> dict:
    """`segstudy monitor`: the registered model's drift score over windows of the inputs, in order.
    Nothing readable among them is a UserError naming the first reasons."""
    loaded = registry.load(cfg, model)
    if loaded.reference is None:
        raise UserError(f"{model} was registered without a drift reference (before segstudy stored one); "
                        f"register it again (e.g. ./run_all.sh {cfg.profile} --only 02)")
    names, rows, unreadable = [], [], []
    for found in image_inputs.read_inputs(inputs):
        if found.image is None:
            unreadable.append({"input": found.name, "reason": found.reason})
            continue
        names.append(found.name)
        rows += drift.rows_of([found.image], loaded.segment)
    if not rows:
        print("\n".join(unreadable_text(unreadable)), file=sys.stderr)
        raise UserError(_nothing_readable(inputs, unreadable))
    ref = loaded.reference
    windows = drift.score_windows(ref, rows, names, step)
    if plot and windows:
        figures.save(figure(pd.DataFrame(windows), ref.threshold, ref.window, f"{model}: drift per window"), plot)
    return {"model": model, "reference": ref.summary(), "images": len(rows), "unreadable": unreadable,
            "windows": windows}


def _nothing_readable(inputs: Sequence[str | Path], unreadable: list[dict]) -> str:
    given = ", ".join(map(str, inputs))
    if not unreadable:
        return (f"no image found in {given}; give PNG/JPEG files, folders holding them, or a request log (.jsonl: "
                f"one /invocations body per line)")
    return (f"none of the {len(unreadable)} inputs in {given} could be read (each named above with its reason); "
            f"give PNG/JPEG images, or a request log of bodies the server answers")


def unreadable_text(unreadable: list[dict], shown: int = UNREADABLE_SHOWN) -> list[str]:
    """One line per unreadable input with its reason, the first `shown` of them, then how many more."""
    lines = [f"{len(unreadable)} inputs unreadable, skipped:"] if unreadable else []
    lines += [f"  {u['input']}: {u['reason']}" for u in unreadable[:shown]]
    if len(unreadable) > shown:
        lines.append(f"  ... and {len(unreadable) - shown} more (--json lists them all)")
    return lines


def format_windows(result: dict) -> str:
    ref, windows = result["reference"], result["windows"]
    lines = [f"{result['model']}: {ref['statistic']}; windows of {ref['window']} images, threshold "
             f"{ref['threshold']:.3f} (false alarms on about {ref['false_alarm']:.0%} of in-domain windows)"]
    if windows:
        table = pd.DataFrame(windows).set_index("window")[["first", "last", "score", "alarm", *drift.FEATURES]]
        lines.append(table.round(3).to_string())
    alarms = sum(w["alarm"] for w in windows)
    lines.append(f"{result['images']} images, {len(windows)} windows, {alarms} over the threshold")
    return "\n".join(lines + unreadable_text(result["unreadable"]))
