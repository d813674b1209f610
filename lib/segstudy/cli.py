"""The `segstudy` command line (also `python -m segstudy`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from segstudy import interrupts
from segstudy.config import DATASETS, SynthConfig
from segstudy.errors import UserError


def _synth(args: argparse.Namespace) -> None:
    from segstudy.data.synthetic.dataset import generate

    cfg = SynthConfig(train=args.train, val=args.val, height=args.height, width=args.width,
                      seed=args.seed)
    seconds = generate(args.out, cfg, workers=args.workers, layout=args.layout)
    print(f"wrote {cfg.train} train + {cfg.val} val images ({cfg.width}x{cfg.height}, {args.layout} layout) "
          f"to {args.out} in {seconds:.1f} s")


def _evaluate(args: argparse.Namespace) -> None:
    from segstudy.engine.cityscapes_eval import evaluate_folder, format_result

    result = evaluate_folder(args.data_root, args.split, args.pred_dir, progress=not args.json, dataset=args.dataset)
    if args.json:
        clean = json.loads(json.dumps(result, default=float).replace("NaN", "null"))
        print(json.dumps({k: v for k, v in clean.items() if k != "confusion"}, indent=2))
    else:
        print(format_result(result))


def _run(args: argparse.Namespace) -> None:
    from segstudy.config_profiles import parse_overrides
    from segstudy.notebook_runner import run_notebooks

    start = time.perf_counter()
    overrides = parse_overrides(args.set) | ({"train.gpus": args.gpus} if args.gpus else {})
    timings = run_notebooks(profile(args), overrides, only=args.only,
                            timeout=args.timeout, log_output=args.log_output)
    total = time.perf_counter() - start
    for name, sec in timings.items():
        print(f"  {name:28s} {sec:7.1f} s")
    print(f"  {'notebooks of this run':28s} {sum(timings.values()):7.1f} s")
    print(f"  {'this run in all':28s} {total:7.1f} s   (with the plan and the generated data)")


def _plan(args: argparse.Namespace) -> None:
    from segstudy.config_profiles import load_config, parse_overrides
    from segstudy.notebook_runner import list_notebooks, without_unset_datasets
    from segstudy.studies import plan

    overrides = parse_overrides(args.set)
    _, cfg = without_unset_datasets(profile(args), overrides, load_config(profile(args), overrides))
    notebooks = [nb.stem for nb in list_notebooks(only=args.only)]
    trainings = plan.trainings(cfg, notebooks)
    print(plan.format_plan(cfg, trainings, plan.estimate(cfg, trainings, args.assume_tflops)))
    if "06_tuning" in notebooks and cfg.tune.space:
        trial, study = plan.tuning_study(cfg)
        print(plan.format_tuning(cfg, study, plan.estimate(trial, [study], args.assume_tflops)))


def _train(args: argparse.Namespace) -> None:
    from segstudy.config_profiles import load_config
    from segstudy.deploy.registry import log_trained
    from segstudy.engine.training import train

    cfg = load_config(profile(args), args.set)
    result = train(cfg, model_name=args.model, resume=args.resume, run_dir=args.run_dir,
                   keep_weights=not args.no_keep_weights)
    if not args.no_log_model and int(os.environ.get("RANK", "0")) == 0:
        log_trained(cfg, result)
    if result.get("finished"):
        print(f"{result['model']}: best val mIoU {result['best_miou'] * 100:.2f} after {result['steps']} steps; "
              f"checkpoints in {result['run_dir']}")


def _sweep(args: argparse.Namespace) -> None:
    from segstudy.config_profiles import parse_overrides, parse_value
    from segstudy.notebook_runner import sweep

    grid = {key: [parse_value(key, v) for v in values] for key, *values in args.p}
    empty = [key for key, values in grid.items() if not values]
    if empty:
        raise UserError(f"-p {empty[0]} has no values; write -p KEY VALUE [VALUE ...], e.g. -p loss_study.seeds 0 1")
    path = sweep(args.notebook, grid, profile(args), parse_overrides(args.set), args.name, args.timeout)
    print(f"gathered results: {path}")


def _tune(args: argparse.Namespace) -> None:
    from segstudy.studies import tuning

    if args.profile and args.tune_profile and args.profile != args.tune_profile:
        raise UserError(f"two profiles given: {args.tune_profile} and --profile {args.profile}; keep one")
    study = tuning.start(args.tune_profile or profile(args), args.set, study=args.study, storage=args.storage)
    print(study.describe(), flush=True)
    tuning.optimize(study, args.trials, args.timeout)
    summary = tuning.save(study)
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items() if n)
    print(f"study '{summary['study']}': {summary['trials']} trials ({states}); this process ran {study.ran} "
          f"in {study.seconds:.1f} s")
    if best := summary["best"]:
        print(f"best: trial {best['trial']}, val mIoU {100 * best['val_miou']:.2f}, "
              f"--set model.name={study.cfg.tune.model} {' '.join(best['set'])} (or --profile {best['fragment']})")
    print(f"files: {study.out}")


def _predict(args: argparse.Namespace) -> None:
    from segstudy.config_profiles import load_config
    from segstudy.deploy.predict import predict

    cfg = load_config(profile(args), args.set)
    result = predict(args.model, args.input, args.out, cfg)
    print(f"{result['images']} images in {result['seconds']:.1f} s with {result['model']}: "
          f"*_labelIds.png and *_color.png in {result['out_dir']}")


def _serve(args: argparse.Namespace) -> None:
    import os
    from pathlib import Path

    from segstudy.config_profiles import load_config
    from segstudy.deploy import server
    from segstudy.deploy.registry import resolve
    from segstudy.deploy.serving import serve_command, serve_env
    from segstudy.tracking import mlflow_uri

    cfg = load_config(profile(args), args.set)
    resolve(cfg, args.model)  # a missing model or alias fails here, listing the registered ones
    cmd = serve_command(args.model, args.host, args.port, args.workers)
    env = serve_env(mlflow_uri(cfg.tracking, cfg.output_root)) | _monitoring_env(args)
    if env.get(server.MULTIPROC):  # a folder another server uses fails here, with this command's name
        server.check_metrics_folder(Path(env[server.MULTIPROC]))
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, env)


def _monitoring_env(args: argparse.Namespace) -> dict[str, str]:
    """serve's metrics and feedback sample settings, for the server's processes (deploy/serving_metrics.py)."""
    from segstudy.deploy import serving_metrics

    env = {serving_metrics.ENABLED: "0"} if args.no_metrics else {}
    if args.feedback_dir:
        env |= {serving_metrics.FEEDBACK_DIR: os.path.abspath(args.feedback_dir),
                serving_metrics.FEEDBACK_MAX: str(args.feedback_max),
                serving_metrics.FEEDBACK_RATE: str(args.feedback_rate)}
    return env


def _monitor(args: argparse.Namespace) -> None:
    from segstudy.config_profiles import load_config
    from segstudy.studies import monitoring

    result = monitoring.monitor(load_config(profile(args), args.set), args.model, args.input, args.step, args.plot)
    print(json.dumps(result, indent=2, default=float) if args.json else monitoring.format_windows(result))
    if args.plot and result["windows"]:
        print(f"plot: {args.plot}")


def _add_profile(parser: argparse.ArgumentParser, what: str) -> None:
    """--profile, the one way every subcommand takes a profile (docs/changes.md: the older spellings went)."""
    parser.add_argument("--profile", help=f"profile name (params/) or YAML file: {what} (default: demo)")


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    # none by default: nbclient applies the limit to a whole cell, and full's training cells run for hours
    parser.add_argument("--timeout", type=int, default=None, metavar="SECONDS",
                        help="stop a notebook cell that runs longer than this (default: no limit)")


def profile(args: argparse.Namespace) -> str:
    """The profile a subcommand was given (demo when none)."""
    return args.profile or "demo"


def _synth_parser(sub: argparse._SubParsersAction) -> None:
    """The `synth` sub-command's arguments."""
    s = sub.add_parser("synth", help="write a generated dataset in the Cityscapes, BDD100K or nuImages layout")
    s.add_argument("--out", required=True)
    s.add_argument("--layout", default="cityscapes", choices=DATASETS,
                   help="the dataset's layout, and its domain: bdd100k and nuimages are other cameras and light "
                        "(docs/study.md, 'Across datasets')")
    s.add_argument("--train", type=int, default=SynthConfig.train)
    s.add_argument("--val", type=int, default=SynthConfig.val)
    s.add_argument("--height", type=int, default=SynthConfig.height)
    s.add_argument("--width", type=int, default=SynthConfig.width)
    s.add_argument("--seed", type=int, default=SynthConfig.seed)
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=_synth)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """The `evaluate` sub-command's arguments."""
    e = sub.add_parser("evaluate", help="score a folder of labelIds PNGs (official definitions)")
    e.add_argument("--data-root", required=True)
    e.add_argument("--dataset", default="cityscapes", choices=DATASETS,
                   help="the ground truth's reader (mIoU over the classes it labels: nuimages 7)")
    e.add_argument("--split", default="val")
    e.add_argument("--pred-dir", required=True)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_evaluate)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """The `train` sub-command's arguments."""
    t = sub.add_parser("train", help="train one model (torchrun-compatible)")
    _add_profile(t, "the training's settings")
    t.add_argument("--model", help="override model.name: unet | deeplabv3_resnet50 | custom")
    t.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    t.add_argument("--resume", action="store_true",
                   help="insist on continuing from the run's checkpoint_latest.pt (an interrupted run of the "
                        "same settings is continued anyway)")
    t.add_argument("--run-dir", help="the run folder (default: outputs/<profile>/runs/<model>)")
    t.add_argument("--no-keep-weights", action="store_true", help="delete the weights when it finishes")
    t.add_argument("--no-log-model", action="store_true", help="do not log the model to MLflow")
    t.set_defaults(func=_train)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    """The `sweep` sub-command's arguments."""
    w = sub.add_parser("sweep", help="run one notebook over a grid of parameters (papermill)")
    w.add_argument("notebook", help="e.g. notebooks/03_loss_comparison.ipynb")
    w.add_argument("-p", nargs="+", action="append", required=True, metavar=("KEY", "VALUE"),
                   help="a config key and its values, e.g. -p loss_study.names ce dice -p loss_study.seeds 0 1")
    w.add_argument("--profile", help="profile name (params/) or YAML file every run starts from (default: demo)")
    w.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE",
                   help="fixed overrides for every run")
    w.add_argument("--name", help="sweep name (folder under outputs/sweeps/); default: notebook-timestamp")
    _add_timeout(w)
    w.set_defaults(func=_sweep)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    """The `run` sub-command's arguments."""
    r = sub.add_parser("run", help="execute the numbered notebooks with papermill (run_all.sh)")
    _add_profile(r, "what every notebook runs with")
    r.add_argument("--only", nargs="*", help="notebook prefixes, e.g. --only 00 01")
    r.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE",
                   help="override params, e.g. --set data.batch_size=4")
    _add_timeout(r)
    r.add_argument("--gpus", type=int, help="train each model with torchrun DDP on N GPUs (train.gpus)")
    r.add_argument("--log-output", action="store_true",
                   help="stream the notebooks' output (epoch lines, progress bars) to the terminal")
    r.set_defaults(func=_run)


def _headline(args: argparse.Namespace) -> None:
    from pathlib import Path

    from segstudy.config_paths import PROJECT_ROOT
    from segstudy.config_profiles import load_config
    from segstudy.studies import readme_table

    readme = Path(args.readme) if args.readme else PROJECT_ROOT / "README.md"
    changed = readme_table.headline(load_config(profile(args), args.set), readme)
    print(f"{readme}: verdict table {'rewritten' if changed else 'already as the run gave it'}")


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    """The `plan` sub-command's arguments."""
    n = sub.add_parser("plan", help="print every training a run would do and its estimated time (trains nothing)")
    _add_profile(n, "the run to plan")
    n.add_argument("--only", nargs="*", help="notebook prefixes, e.g. --only 03")
    n.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    n.add_argument("--assume-tflops", type=float, metavar="X",
                   help="estimate from measured FLOPs at X effective TFLOPS instead of a warm-up on the "
                        "profile's device (the default when that device is not on this machine: 60)")
    n.set_defaults(func=_plan)


def _headline_parser(sub: argparse._SubParsersAction) -> None:
    """The `headline` sub-command's arguments."""
    h = sub.add_parser("headline", help="write the README's verdict table from a run's verdicts.json (notebook 08)")
    _add_profile(h, "the run whose verdicts are written")
    h.add_argument("--readme", help="the file to rewrite between its markers (default: the project's README.md)")
    h.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE",
                   help="the run's overrides that place its outputs, e.g. output_root=...")
    h.set_defaults(func=_headline)


def _tune_parser(sub: argparse._SubParsersAction) -> None:
    """The `tune` sub-command's arguments."""
    u = sub.add_parser("tune", help="search tune.space with Optuna: pruned trials, resumable, one box or many")
    u.add_argument("tune_profile", nargs="?", metavar="PROFILE", help="profile name or YAML file (or --profile)")
    _add_profile(u, "its tune: section is the search space")
    u.add_argument("--trials", type=int, required=True, help="trials this process runs (Optuna's n_trials)")
    u.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    u.add_argument("--study", help="study name (default: tune.model); files in outputs/<profile>/tune/<study>/")
    u.add_argument("--storage", help="journal:PATH (workers on one machine) or a database URL such as "
                                     "postgresql://... (several machines); default: a file in the study's folder")
    u.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    u.set_defaults(func=_tune)


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    """The `predict` sub-command's arguments."""
    d = sub.add_parser("predict", help="segment new images: labelIds PNGs + colour overlays")
    d.add_argument("--model", required=True,
                   help="checkpoint .pt, .onnx file, or MLflow URI (models:/segstudy-custom@champion, runs:/ID/model)")
    d.add_argument("--input", required=True, nargs="+", help="image files and/or folders (searched recursively)")
    d.add_argument("--out", required=True, help="output folder (scorable by segstudy evaluate)")
    _add_profile(d, "data.base_size for files, the registry for URIs")
    d.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    d.set_defaults(func=_predict)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    """The `serve` sub-command's arguments."""
    v = sub.add_parser("serve", help="check a registered model, then serve it (MLflow's scoring server, with "
                                     "GET /metrics on the same port)")
    v.add_argument("--model", required=True, help="models:/NAME@ALIAS (or models:/NAME/VERSION)")
    _add_profile(v, "whose MLflow registry holds the model")
    v.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=5001)
    v.add_argument("--workers", type=int, default=1)
    v.add_argument("--no-metrics", action="store_true", help="serve without GET /metrics and its counting")
    v.add_argument("--feedback-dir", help="keep a sample of requests and predictions there for labelling (off by "
                   "default; the images are what clients sent: docs/serving.md, 'Feedback sample')")
    v.add_argument("--feedback-max", type=int, default=1000, help="at most this many samples in the folder")
    v.add_argument("--feedback-rate", type=float, default=0.01, help="share of the images served that are kept")
    v.set_defaults(func=_serve)


def _monitor_parser(sub: argparse._SubParsersAction) -> None:
    """The `monitor` sub-command's arguments."""
    m = sub.add_parser("monitor", help="drift score of a registered model over windows of images or a request log")
    m.add_argument("--model", required=True, help="models:/NAME@ALIAS (registered with its drift reference)")
    m.add_argument("--input", required=True, nargs="+",
                   help="image files, folders (searched recursively) and/or request logs (.jsonl: one "
                        "/invocations body per line), read in order")
    _add_profile(m, "whose MLflow registry holds the model")
    m.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    m.add_argument("--step", type=int, help="images between two windows (default: the reference's, = its window)")
    m.add_argument("--plot", help="save the drift score per window against the threshold as this PNG")
    m.add_argument("--json", action="store_true", help="print the windows as JSON")
    m.set_defaults(func=_monitor)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segstudy", description=__doc__)
    p.add_argument("--version", action=_PrintVersion, nargs=0, help="print the version, commit and torch's, and exit")
    sub = p.add_subparsers(dest="command", required=True)
    for add_command in (_synth_parser, _evaluate_parser, _train_parser, _sweep_parser, _run_parser, _plan_parser,
                        _tune_parser, _predict_parser, _serve_parser, _monitor_parser,
                        _headline_parser):  # the order of --help
        add_command(sub)
    return p


def _version() -> str:
    """The installed distribution's version, the commit when run from a checkout, and torch's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("segstudy")
    except PackageNotFoundError:
        text = "(not installed)"
    import torch

    from segstudy.engine.provenance import git_state

    commit, dirty = git_state()
    where = "" if commit == "unknown" else f", commit {commit[:12]}{' with uncommitted changes' if dirty else ''}"
    return f"{text}{where}, torch {torch.__version__}"


class _PrintVersion(argparse.Action):
    """--version, computed only when asked (it imports torch and runs git)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"segstudy {_version()}")
        parser.exit()


# what to do after Ctrl-C, by command
_CONTINUE = {
    "train": "the last checkpoint is kept: run the same command again to continue from it",
    "run": "run the same command again: finished trainings are reused (train.reuse), an interrupted one "
           "continues from its last checkpoint, and the notebooks run again",
    "sweep": "run the same command again: finished trainings are reused (train.reuse)",
    "tune": "run the same command again: the study continues; the interrupted trial is marked failed and its "
            "parameters run first, from its last checkpoint (from the start if it saved none)",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with interrupts.remembered():
            args.func(args)
    except UserError as exc:
        print(f"segstudy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # the notebook's cell task dies with its kernel: asyncio would log "Task exception was never
        # retrieved" with a traceback at exit, after the line below
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        hint = _CONTINUE.get(args.command, "nothing already written was lost")
        print(f"\nsegstudy {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

