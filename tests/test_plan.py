"""The run's plan (studies/plan.py) and its timings.json with the ETA line (engine/timings.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

from segstudy.config_profiles import load_config
from segstudy.data.datasets import dataset_names
from segstudy.engine import timings
from segstudy.notebook_runner import NOTEBOOKS_DIR
from segstudy.studies import plan, quantization


@pytest.fixture()
def smoke(tmp_path, tiny_root):
    return load_config("smoke", {"data.root": str(tiny_root), "data.generate": False,
                                 "output_root": str(tmp_path)})


def test_the_plan_lists_every_training_of_the_smoke_profile(smoke):
    p, q, c = smoke.prune, smoke.quant, smoke.cross
    mixed = len(c.models) * bool(c.mix)  # notebook 02's mixed trainings
    expected = (2 + 1 + mixed + len(smoke.loss_study.names) * len(smoke.loss_study.seeds)
                + sum(s in p.finetune_scopes for s in p.scopes) * (p.unstructured_epochs > 0) + 3  # + dense control
                + (q.qat != "never"))
    every = plan.trainings(smoke)
    rows = [r for r in every if isinstance(r, plan.PlannedTraining)]
    assert len(rows) == expected
    cross = [r for r in every if isinstance(r, timings.Step) and " on " in r.name]  # every model on each other dataset
    assert len(cross) == (2 + 1 + mixed) * (len(dataset_names(smoke)) - 1)
    assert [r.key for r in rows[:3]] == ["runs/unet", "runs/deeplabv3_resnet50", "runs/custom"]
    loss_runs = [r for r in rows if r.notebook == "03_loss_comparison"]
    assert {(r.loss, r.seed) for r in loss_runs} == {(n, s) for n in smoke.loss_study.names
                                                     for s in smoke.loss_study.seeds}
    spe = 8 // smoke.data.batch_size  # the tiny dataset: 8 training images
    assert all(r.iterations == smoke.loss_study.epochs * spe for r in loss_runs)
    assert plan.trainings(smoke, ["02_custom_model"])[0].key == "runs/custom"


def test_the_plan_counts_the_models_the_config_names(smoke):
    """Notebooks 01/02 train cfg.compare's models (they read it, as the plan does)."""
    fewer = dataclasses.replace(smoke, compare=dataclasses.replace(smoke.compare, baselines=["unet"]))
    keys = [r.key for r in plan.trainings(fewer, ["01_baselines", "02_custom_model"]) if r.kind == "train"]
    assert keys == ["runs/unet", "runs/custom", "runs/custom+bdd100k"]  # the last: cross.models on cross.mix too
    for notebook, attr in (("01_baselines", "baselines"), ("02_custom_model", "custom")):
        source = "".join("".join(c["source"]) for c in json.loads((NOTEBOOKS_DIR / f"{notebook}.ipynb").read_text())
                         ["cells"] if c["cell_type"] == "code")
        assert f"models = cfg.compare.{attr}" in source


def test_the_warm_up_on_the_device_gives_positive_finite_seconds(smoke):
    longer = dataclasses.replace(smoke, train=dataclasses.replace(smoke.train, epochs=20))
    rows = plan.trainings(longer, ["02_custom_model", "05_quantization"])
    est = plan.estimate(longer, rows)
    assert "warm-up on cpu" in est.source
    assert all(s > 0 and math.isfinite(s) for s in est.seconds)
    text = plan.format_plan(longer, rows, est)
    assert "runs/custom" in text and "warm-up on cpu" in text and "total" in text


def test_a_warm_up_longer_than_a_share_of_the_run_is_skipped(smoke):
    est = plan.estimate(smoke, plan.trainings(smoke, ["02_custom_model"]))  # 4 steps: the warm-up is 3
    assert "would cost more than" in est.source and "TFLOPS" in est.source


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_not_on_this_machine_is_planned_from_flops(tmp_path, tiny_root):
    cfg = load_config("smoke", {"device": "cuda", "data.root": str(tiny_root), "data.generate": False,
                                "output_root": str(tmp_path)})
    rows = plan.trainings(cfg)
    est = plan.estimate(cfg, rows)
    assert f"{plan.DEFAULT_TFLOPS:g} effective TFLOPS" in est.source
    assert f"an assumed {plan.DEFAULT_CPU_TFLOPS:g} fp32 TFLOPS" in est.cpu_source  # not this CPU: not its box
    assert all(s > 0 and math.isfinite(s) for s in est.seconds)
    doubled = plan.estimate(cfg, rows, assume_tflops=2 * plan.DEFAULT_TFLOPS)
    on_cpu = [isinstance(r, timings.Step) and r.on_cpu for r in rows]  # the GPU's TFLOPS leave the CPU steps alone
    for cpu, s, s2 in zip(on_cpu, est.seconds, doubled.seconds):
        assert s2 == pytest.approx(s if cpu else s / 2)


def test_without_the_dataset_the_published_split_sizes_are_used(tmp_path):
    cfg = load_config("smoke", {"data.root": str(tmp_path / "absent"), "data.generate": False,
                                "output_root": str(tmp_path)})
    train, val, source = plan.split_sizes(cfg)
    assert (train, val) == (2975, 500) and "published" in source


def _plan_rows(*seconds: float) -> list[dict]:
    return [{"key": f"runs/m{i}", "planned_s": s} for i, s in enumerate(seconds)]


def test_a_new_plan_keeps_the_actual_times_already_recorded(smoke):
    timings.write_plan(smoke, _plan_rows(100, 200), "test")
    timings.record_finished(smoke, "runs/m0", 90)
    timings.write_plan(smoke, _plan_rows(120, 240, 60), "test again")
    data = timings.read(smoke)
    m0 = data["trainings"]["runs/m0"]
    assert (m0["planned_s"], m0["actual_s"]) == (120, 90) and m0["finished_at"]
    assert data["source"] == "test again" and len(data["plan"]) == 3


def test_timings_written_before_the_plan_become_notebook_times(smoke):
    timings.path(smoke).parent.mkdir(parents=True, exist_ok=True)
    timings.path(smoke).write_text(json.dumps({"00_data_exploration": 12.5}))
    timings.record_notebook(smoke, "01_baselines", 30.0)
    assert timings.notebook_seconds(smoke) == {"00_data_exploration": 12.5, "01_baselines": 30.0}
    assert timings.read(smoke)["notebooks_total_s"] == 42.5


def test_a_fine_tune_in_steps_adds_its_parts_within_one_plan(smoke):
    timings.write_plan(smoke, _plan_rows(100, 200), "test")
    timings.record_finished(smoke, "runs/m0", 30, add=True)
    timings.record_finished(smoke, "runs/m0", 45, add=True)
    assert timings.read(smoke)["trainings"]["runs/m0"]["actual_s"] == 75
    time.sleep(1.1)  # finished_at and planned_at are whole seconds
    timings.write_plan(smoke, _plan_rows(100, 200), "a new run")  # the old parts are not this run's
    timings.record_finished(smoke, "runs/m0", 20, add=True)
    assert timings.read(smoke)["trainings"]["runs/m0"]["actual_s"] == 20


def test_the_eta_scales_what_is_left_by_measured_over_planned(smoke):
    timings.write_plan(smoke, _plan_rows(1000, 1000, 2000), "test")
    timings.record_finished(smoke, "runs/m0", 2000)  # twice as slow as planned
    # m1: 10 of 100 steps in 200 s (20 s a step: 2000 s for a planned 1000, twice as slow too)
    line = timings.progress_line(smoke, "runs/m1", 10, 100, 200.0)
    # this training: 90 steps x 20 s = 30 min; the run: 1800 s + 2 x 2000 s (m2) = 1.6 h; planned 4000 s
    assert line == "ETA: this training 30 min, the run 1.6 h (planned 67 min)"
    # a training the plan does not hold (segstudy train alone): this training only
    assert timings.progress_line(smoke, "runs/other", 10, 100, 200.0) == "ETA: this training 30 min"


def test_a_resumed_training_counts_only_the_steps_it_ran(smoke):
    # resumed at step 50: 10 steps in 100 s, 40 left
    assert timings.progress_line(smoke, "runs/x", 60, 100, 100.0, first_step=50) == "ETA: this training 7 min"


def test_training_records_its_time_and_prints_the_eta(smoke, capsys):
    from segstudy.engine.training import train

    cfg = load_config("smoke", {"data.root": smoke.data.root, "data.generate": False,
                                "output_root": smoke.output_root, "train.epochs": 1, "model.name": "custom"})
    timings.write_plan(cfg, [{"key": "runs/custom", "planned_s": 10.0}], "test")
    train(cfg, progress=False)
    assert "ETA: this training" in capsys.readouterr().out
    entry = timings.read(cfg)["trainings"]["runs/custom"]
    assert entry["planned_s"] == 10.0 and entry["actual_s"] > 0


def test_a_loss_run_that_is_notebook_02s_training_reads_that_run(smoke_model, monkeypatch, capsys):
    """The rehearsal's (ce, seed 0) loss run has runs/custom's settings: the plan says so, and the
    grid returns that finished run instead of training it again; other losses still train."""
    from segstudy.studies import loss_comparison

    base = smoke_model["cfg"]
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, reuse=True), loss_study=dataclasses.replace(
        base.loss_study, names=["ce", "dice"], seeds=[0], epochs=1, model="custom"))
    assert [loss_comparison.twin_key(cfg, n, 0) for n in ("ce", "dice")] == ["runs/custom", None]
    assert loss_comparison.twin_key(cfg, "ce", 1) is None
    rows = {r.loss: r for r in plan.trainings(cfg, ["03_loss_comparison"])}
    assert rows["ce"].reused and rows["ce"].note == "the same training as runs/custom" and not rows["dice"].reused

    trained = []
    monkeypatch.setattr(loss_comparison, "train", lambda run_cfg, **kw: trained.append(run_cfg.loss.name) or {})
    runs = loss_comparison.run_grid(cfg)
    assert trained == ["dice"]
    assert runs[0]["reused"] and runs[0]["best_miou"] == smoke_model["best_miou"]
    assert "loss ce, seed 0 trains exactly as runs/custom: reusing that run" in capsys.readouterr().out
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, reuse=False))
    assert not plan.trainings(off, ["03_loss_comparison"])[0].reused


def test_one_reuse_rule_and_a_run_without_settings_is_not_reused(smoke, tmp_path):
    """engine.run_folder.reusable: training, the plan and the loss study's twin all ask it."""
    from segstudy.engine import run_folder

    cfg = dataclasses.replace(smoke, train=dataclasses.replace(smoke.train, reuse=True))
    run_dir = tmp_path / "runs" / "custom"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"finished": True}))  # an older run: no settings recorded
    assert run_folder.reusable(run_dir, cfg, cfg.model) == (None, run_folder.NO_SETTINGS)
    settings = run_folder.settings(cfg, cfg.model)
    (run_dir / "result.json").write_text(json.dumps({"finished": True, "settings": settings}))
    result, why_not = run_folder.reusable(run_dir, cfg, cfg.model)
    assert result["reused"] and why_not == ""
    assert run_folder.reusable(run_dir, smoke, smoke.model) == (None, "")  # smoke: train.reuse false
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5))
    assert "train.lr 0.01 -> 0.5" in run_folder.reusable(run_dir, other, cfg.model)[1]


def test_a_random_init_run_is_not_reused_once_the_imagenet_weights_are_there(smoke, tmp_path):
    from segstudy.engine import run_folder
    from segstudy.models.networks import BACKBONE_WEIGHTS

    weights = tmp_path / "weights"
    weights.mkdir()
    model = dataclasses.replace(smoke.model, pretrained="auto", weights_dir=str(weights))
    cfg = dataclasses.replace(smoke, model=model, train=dataclasses.replace(smoke.train, reuse=True))
    run_dir = tmp_path / "runs" / "custom"
    run_dir.mkdir(parents=True)
    result = {"finished": True, "backbone_init": "random", "settings": run_folder.settings(cfg, model)}
    (run_dir / "result.json").write_text(json.dumps(result))
    assert run_folder.reusable(run_dir, cfg, model)[0] is not None  # no weights file: the same training
    (weights / BACKBONE_WEIGHTS.url.rsplit("/", 1)[1]).write_bytes(b"weights")
    reused, why_not = run_folder.reusable(run_dir, cfg, model)
    assert reused is None and "the ImageNet weights are on this machine now" in why_not


def _full(tmp_path, monkeypatch, **overrides):
    for name in ("CITYSCAPES_ROOT", "BDD100K_ROOT", "NUIMAGES_ROOT"):  # absent: the published split sizes
        monkeypatch.setenv(name, str(tmp_path / "absent"))
    return load_config("full", {"output_root": str(tmp_path)} | overrides)


def test_the_full_plan_counts_the_cpu_steps_of_notebook_05_with_the_configs_counts(tmp_path, monkeypatch):
    cfg = _full(tmp_path, monkeypatch, **{"quant.eval_images": 40, "quant.calib_images": 16,
                                          "quant.calib_sweep": [4, 24], "bench.warmup": 3, "bench.iters": 7})
    steps = {r.name: r for r in plan.trainings(cfg, ["05_quantization"]) if isinstance(r, timings.Step)}
    assert all(r.notebook == "05_quantization" for r in steps.values())
    for name in ("int8 PTQ torch FX", "int8 PTQ torch FX (N=4)", "int8 PTQ torch FX (N=24)", "int8 ONNX Runtime",
                 "ONNX Runtime fp32", "int8 OpenVINO", "int8 QAT torch FX", "pruned + int8 torch FX",
                 "pruned + int8 ONNX Runtime", "pruned + int8 OpenVINO", "deeplabv3_resnet50 int8 PTQ torch FX"):
        row = steps[f"evaluate {name}"]
        assert row.on_cpu and row.passes == 40 and row.size == (1024, 2048)  # of 500 val images, at 2048x1024
    assert not steps["evaluate fp32 eager"].on_cpu and steps["evaluate fp32 eager"].passes == 40  # paired
    assert steps["calibrate torch FX custom"].passes == 24  # the largest of quant.calib_images and calib_sweep
    assert steps["calibrate ONNX Runtime custom"].passes == steps["calibrate OpenVINO custom"].passes == 16
    assert steps["calibrate ONNX Runtime pruned"].passes == steps["calibrate OpenVINO pruned"].passes == 16
    latency = steps["latency"]
    assert latency.on_cpu and latency.size == (1024, 2048)
    assert latency.passes == 12 * (3 + 7) + 2 * (3 + 7)  # 12 variants timed in turn (only); DeepLabV3's pair

    rows = plan.trainings(cfg)
    est = plan.estimate(cfg, rows)
    seconds = dict(zip([r.key for r in rows], est.seconds))
    assert seconds["05_quantization/evaluate int8 ONNX Runtime"] > 0
    assert est.total == pytest.approx(sum(est.seconds))
    cpu = sum(s for r, s in zip(rows, est.seconds) if isinstance(r, timings.Step) and r.on_cpu)
    assert 0 < cpu < est.total
    text = plan.format_plan(cfg, rows, est)
    assert "05_quantization/evaluate int8 ONNX Runtime" in text and "40 x int8 ONNX Runtime" in text
    assert f"{timings.duration(cpu)} of CPU steps" in text and "04_pruning_sweeps/latency" in text


def test_full_scores_notebook_05_on_an_evenly_spread_subset(tmp_path, monkeypatch):
    full = _full(tmp_path, monkeypatch)
    assert 0 < full.quant.eval_images < 500
    chosen = quantization.eval_subset(500, full.quant.eval_images)
    assert len(set(chosen)) == full.quant.eval_images == len(chosen) and chosen == sorted(chosen)
    gaps = {b - a for a, b in zip(chosen, chosen[1:])}
    assert max(gaps) - min(gaps) <= 1 and chosen[0] <= 500 // full.quant.eval_images  # even, from the start
    assert quantization.eval_subset(500, 0) == list(range(500)) == quantization.eval_subset(500, 600)
    assert load_config("demo").quant.eval_images == 0  # the demo scores its whole val split, as before


def test_every_variant_is_scored_on_the_same_subset(smoke):
    """Paired: a model scored on the subset gets the rows of its whole-split per-image confusions at
    eval_subset's indices, which is also what a reference read from its training keeps (on_subset)."""
    from segstudy.data.labels import NUM_CLASSES
    from segstudy.models.networks import build_model

    torch.manual_seed(0)
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(dataclasses.replace(smoke.model,
                                                                                          pretrained=False)))
    whole = quantization.validate_variant(model, smoke)
    three = dataclasses.replace(smoke, quant=dataclasses.replace(smoke.quant, eval_images=3))
    subset = quantization.validate_variant(model, three)
    assert len(whole["per_image"]) == 6 and len(subset["per_image"]) == 3
    assert (subset["per_image"] == whole["per_image"][[1, 3, 5]]).all()
    kept = quantization.on_subset(whole, three)
    assert (kept["per_image"] == subset["per_image"]).all() and kept["miou"] == pytest.approx(subset["miou"])


def test_a_step_records_its_actual_seconds_next_to_the_plans(smoke):
    """The plan's rows for notebook 05 go to timings.json's "steps" with their estimate, and the study
    records each scoring's seconds under the same key."""
    from segstudy.data.labels import NUM_CLASSES
    from segstudy.models.networks import build_model

    rows = plan.trainings(smoke, ["05_quantization"])
    fake = plan.SecondsEstimate([10.0] * len(rows), "test", (8, 6), "test")
    timings.write_plan(smoke, plan.rows(rows, fake), "test")
    key = timings.step_key("05_quantization", quantization.evaluate_step("fp32 eager"))
    assert key in {r.key for r in rows} and timings.read(smoke)["steps"][key] == {"planned_s": 10.0}
    model = build_model(num_classes=NUM_CLASSES, **dataclasses.asdict(dataclasses.replace(smoke.model,
                                                                                          pretrained=False)))
    quantization.validate_variant(model, smoke, step=quantization.evaluate_step("fp32 eager"))
    entry = timings.read(smoke)["steps"][key]
    assert entry["planned_s"] == 10.0 and entry["actual_s"] > 0 and entry["finished_at"]


@pytest.mark.parametrize(("vendor", "fp32", "bf16", "advice"), [
    ("AuthenticAMD", 20.0, 33.0, None),  # the Zen 5's ratio: auto's bf16 stands
    ("AuthenticAMD", 20.0, 12.0, "train.amp=none"),  # a CPU where the rule's bf16 trains slower
    ("GenuineIntel", 20.0, 33.0, "train.amp=bf16"),  # a CPU where the rule's fp32 trains slower
])
def test_the_plan_checks_auto_precision_on_this_cpu_and_its_advice_works_as_typed(monkeypatch, capsys, vendor,
                                                                                   fp32, bf16, advice):
    from segstudy.config_profiles import parse_overrides
    from segstudy.engine import device, measure
    from segstudy.engine.device import autocast_dtype
    from segstudy.studies import plan_costs

    monkeypatch.setattr(device, "cpu_info", lambda: {"cpu": "test", "vendor": vendor, "threads": 2,
                                                     "avx512_bf16": True, "amx_bf16": False})
    timed = []
    monkeypatch.setattr(measure, "train_throughput",
                        lambda *a, amp_dtype=None, **kw: timed.append(amp_dtype) or (bf16 if amp_dtype else fp32))
    cpu = torch.device("cpu")
    cfg = load_config("demo", {})
    chosen = autocast_dtype(cfg.train.amp, cpu)
    step = cfg.data.batch_size / (bf16 if chosen else fp32)  # the warm-up's step, in the chosen precision
    said = plan_costs.precision_check(cfg, cpu, "custom", step)
    # only the precision auto did not choose is timed again: the warm-up timed the other
    assert timed == [None if chosen else torch.bfloat16] and f"trained custom at {bf16 / fp32:.2f}x fp32's" in said
    assert plan_costs.precision_check(load_config("demo", {"train.amp": "none"}), cpu, "custom", step) == ""
    if advice is None:
        assert "--set" not in said and not capsys.readouterr().out
        return
    assert said.endswith(f"--set {advice}") and f"--set {advice}" in capsys.readouterr().out
    followed = load_config("demo", parse_overrides([advice]))  # the advice, as typed after --set
    expected = None if advice.endswith("none") else torch.bfloat16
    assert autocast_dtype(followed.train.amp, cpu) == expected != autocast_dtype(cfg.train.amp, cpu)
