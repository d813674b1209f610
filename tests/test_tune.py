"""Tuning (segstudy tune, notebook 06): pruning, shared storages (journal, PostgreSQL), a killed
worker's trial failed and re-run, Ctrl-C, a failure every trial shares, bad input and unreadable
storages refused in one line, best.yaml trained again, MLflow parent/child runs, and the W&B backend
against MLflow's (offline)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from segstudy import cli, interrupts, tracking
from segstudy.config_profiles import load_config
from segstudy.engine import run_folder
from segstudy.engine.training import train
from segstudy.studies import tune_space, tune_storage, tuning

GOOD = {"train.lr": 0.09, "train.optimizer": "adamw"}  # learns something in 2 epochs on the tiny data
BAD = {"train.lr": 0.0001, "train.optimizer": "sgd"}  # learns next to nothing: the pruner stops it


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One torch thread here, in the workers and in the notebook's kernel: a tiny trial gains nothing
    from a second, and two workers on 2 shared cores lose a lot to threads spinning for a core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def _sets(tiny_root: Path, out: Path, **more: object) -> dict:
    return {"data.root": str(tiny_root), "data.generate": False, "output_root": str(out)} | more


def _cli(tiny_root: Path, out: Path, *args: str, env: dict | None = None, **sets: object) -> subprocess.Popen:
    """`segstudy tune smoke ARGS` in a process of its own (a worker)."""
    pairs = [f"{k}={v}" for k, v in _sets(tiny_root, out, **sets).items()]
    return subprocess.Popen([sys.executable, "-m", "segstudy", "tune", "smoke", *args, "--set", *pairs],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}))


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _argv(tiny_root: Path, out: Path, *args: str, **sets: object) -> list[str]:
    """The same command, run in this process (cli.main): no second start-up of torch."""
    return ["tune", "smoke", *args, "--set", *[f"{k}={v}" for k, v in _sets(tiny_root, out, **sets).items()]]


def _two_workers(tiny_root: Path, out: Path, *args: str, **sets: object) -> None:
    """Two workers at once: one in a process of its own, one in this process."""
    other = _cli(tiny_root, out, *args, env={"SEGSTUDY_WORKER": "1"}, **sets)
    assert cli.main(_argv(tiny_root, out, *args, **sets)) == 0
    _finish(other)


def test_a_bad_trial_is_pruned_and_the_results_feed_back(tiny_root, tmp_path):
    overrides = _sets(tiny_root, tmp_path)
    study = tuning.start("smoke", overrides)
    study.study.enqueue_trial(GOOD)
    study.study.enqueue_trial(BAD)
    tuning.optimize(study, 4)
    trials = study.study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert trials[0].state == optuna.trial.TrialState.COMPLETE and trials[0].params == GOOD
    bad = trials[1]
    assert bad.params == BAD and bad.state == optuna.trial.TrialState.PRUNED
    assert list(bad.intermediate_values) == [1]  # stopped after its first validation, of 2
    # the pruned run folder: its settings, no checkpoints, no lock held, nothing to continue
    folder = tuning.trial_dir(study, 1)
    assert (folder / "settings.json").is_file() and not list(folder.glob("checkpoint_*.pt"))
    assert run_folder.unfinished(folder, json.loads((folder / "settings.json").read_text())) is None
    with run_folder.lock(folder):
        pass

    summary = tuning.save(study)
    assert summary["states"]["PRUNED"] >= 1 and summary["states"]["COMPLETE"] >= 1
    assert set(summary["figures"]) == {"history", "importances", "intermediate"}
    table = (study.out / "trials.csv").read_text()
    assert table.startswith("trial,state,val mIoU %,train.lr,train.optimizer") and "PRUNED" in table
    best = summary["best"]
    fragment = Path(best["fragment"])
    tuned = load_config(fragment)  # a profile that extends smoke with the best parameters
    assert tuned.train.lr == pytest.approx(best["params"]["train.lr"])
    assert tuned.train.optimizer == best["params"]["train.optimizer"] and tuned.profile == "smoke-tuned"
    # the tuned model (smoke's model.name is custom) and the study's dataset roots, not ones beside best.yaml
    assert tuned.model.name == study.cfg.tune.model == "unet"
    assert (tuned.data.root, tuned.cross.bdd100k.root, tuned.cross.nuimages.root) == \
        (study.cfg.data.root, study.cfg.cross.bdd100k.root, study.cfg.cross.nuimages.root)
    # trained from it under the study's budget (one step: train.max_steps is no setting), it trains what
    # the best trial trained
    budget = {k: v for k, v in tune_space.budget(study.cfg).items() if k != "model.name"} | {"train.max_steps": 1}
    again = train(load_config(fragment, budget), progress=False, keep_weights=False)
    trial_settings = json.loads((tuning.trial_dir(study, best["trial"]) / "settings.json").read_text())
    assert json.loads((Path(again["run_dir"]) / "settings.json").read_text()) == trial_settings
    assert load_config("smoke", overrides | dict(s.split("=", 1) for s in best["set"])).train.lr == tuned.train.lr
    part = tuning.report(study.cfg)
    assert len(part.images) == 3 and "best mIoU %" in part.table.columns

    again = tuning.start("smoke", overrides)  # the same command again continues the study
    assert len(again.study.trials) == 4 and tuning.optimize_until(again, 4) == 0


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("sets, message", [
    (["tune.space={train.lrr: {type: float, low: 0.1, high: 0.2}}"], "tune.space.train.lrr is not a config key"),
    (["tune.space={train.lr: {type: log_float, low: 0.1, high: 0.01}}"], "[0.1, 0.01] is an empty range"),
    (["tune.space={train.optimizer: {type: float, low: 0, high: 1}}"],
     "tune.space.train.optimizer is not a number (str): use type: categorical"),
    (["tune.space={train.lr: {type: float, low: 0, high: 0.1}}"], "train.lr can take 0.0, which the profile refuses"),
    (["tune.space={train.lr: {type: float, low: 0.001, high: 0.1, step: -1}}"],
     "tune.space.train.lr.step = -1 must be a number > 0"),
    (["tune.space={train.lr: {type: log_float, low: 0.001, high: 0.1, step: 0.01}}"], "a log_float takes no step"),
    (["tune.space={data.batch_size: {type: int, low: 1.5, high: 4}}"], "data.batch_size.low = 1.5 is not a whole"),
    (["tune.space={data.batch_size: {type: int, low: 2, high: 4, step: 8}}"], "step = 8 is wider than the range"),
    (["tune.space={data.batch_size: {type: int, low: 2, high: 7, step: 2}}"],
     "[2, 7] is not a whole number of steps of 2 (7 is never sampled); make high 6 or 8"),
    (["data.root=/nonexistent"], "data.root = /nonexistent does not exist"),  # what every trial shares
])
def test_a_bad_search_space_is_one_line(capsys, tmp_path, sets, message):
    err = _one_line_error(capsys, ["tune", "smoke", "--trials", "1", "--set", f"output_root={tmp_path}", *sets])
    assert message in err
    assert not (tmp_path / "smoke").exists()  # nothing was begun


def test_an_unreachable_storage_or_a_changed_space_is_one_line_and_the_study_stays(capsys, tiny_root, tmp_path):
    sets = [f"{k}={v}" for k, v in _sets(tiny_root, tmp_path).items()]
    base = ["tune", "smoke", "--trials", "1", "--set", *sets]
    assert "the folder /nowhere does not exist" in _one_line_error(capsys, [*base, "--storage", "journal:/nowhere/j"])
    err = _one_line_error(capsys, [*base, "--storage", f"postgresql://u:secret@127.0.0.1:{_free_port()}/db"])
    assert "cannot be reached" in err and "secret" not in err and "u:***@" in err

    study = tuning.start("smoke", _sets(tiny_root, tmp_path))  # begun, one trial
    study.study.enqueue_trial(GOOD)
    tuning.optimize(study, 1)
    db = study.out / "study.db"
    before = db.read_bytes()
    err = _one_line_error(capsys, [*base[:-len(sets)], *sets, "tune.epochs=3"])
    assert "study 'unet' in sqlite" in err and "began with tune.epochs = 2, now 3" in err and "--study NAME" in err
    err = _one_line_error(capsys, [*base[:-len(sets)], *sets,
                                   "tune.space={train.lr: {type: log_float, low: 0.001, high: 0.1}}"])
    assert "began with tune.space.train.lr = {'type': 'log_float', 'low': 0.0001" in err
    assert db.read_bytes() == before and len(tuning.start("smoke", _sets(tiny_root, tmp_path)).study.trials) == 1


@pytest.mark.parametrize("sets, reason", [
    ({"tune.space": {"data.batch_size": {"type": "categorical", "choices": [16, 32]}}},  # more than the 8 images
     "trial 1: fail: data.batch_size x train.grad_accum = "),
    ({"train.lr": 1e6, "tune.space": {"train.optimizer": {"type": "categorical", "choices": ["sgd"]}}},
     "trial 1: fail: the loss diverged"),  # the message names no sampled key: it is the trial's numbers
])
def test_a_failure_of_the_trial_s_own_values_fails_it_and_the_study_goes_on(tiny_root, tmp_path, capsys, sets,
                                                                             reason):
    study = tuning.start("smoke", _sets(tiny_root, tmp_path, **sets))
    tuning.optimize(study, 2)
    assert [t.state for t in study.study.trials] == [optuna.trial.TrialState.FAIL] * 2
    out, err = capsys.readouterr()
    assert reason in out.splitlines()[-1] and "Traceback" not in out + err


def test_a_failure_every_trial_shares_stops_the_study_in_one_line(tiny_root, tmp_path, capsys):
    folder = tmp_path / "smoke" / "tune" / "unet" / "trials" / "0000"
    with run_folder.lock(folder):  # another process trains in trial 0's folder: any trial would meet it
        err = _one_line_error(capsys, _argv(tiny_root, tmp_path, "--trials", "2"))
    assert err.startswith("segstudy tune: error: trial 0 failed for a reason every trial shares, so the study "
                          "stopped") and f"the run folder {folder} is in use by PID {os.getpid()}" in err
    failed, queued = tuning.start("smoke", _sets(tiny_root, tmp_path)).study.trials
    assert failed.state == optuna.trial.TrialState.FAIL and queued.state == optuna.trial.TrialState.WAITING
    assert queued.params == failed.params and tune_storage.retry_of(queued) == 0
    assert "0,FAIL" in (folder.parent.parent / "trials.csv").read_text()


def _study_files(tiny_root: Path, out: Path) -> Path:
    """A default study.db holding one finished trial (no training), and a trials.csv beside it."""
    study = tuning.start("smoke", _sets(tiny_root, out))
    study.study.add_trial(optuna.trial.create_trial(
        params={"train.optimizer": "sgd"}, value=0.5,
        distributions={"train.optimizer": optuna.distributions.CategoricalDistribution(["sgd", "adamw"])}))
    (study.out / "trials.csv").write_text("trial,state\n0,COMPLETE\n")
    return study.out


def test_an_unreadable_storage_is_one_line_naming_it_and_is_left_as_it_was(tiny_root, tmp_path, capsys):
    folder = _study_files(tiny_root, tmp_path)
    db, table = folder / "study.db", (folder / "trials.csv").read_bytes()
    whole = db.read_bytes()
    argv = _argv(tiny_root, tmp_path, "--trials", "1")
    default = f"the study's default storage {db} (no --storage given)"
    other = tmp_path / "other.db"  # another program's database, e.g. mlflow.db
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE experiments (id INTEGER)")
    unreadable = "is not a readable SQLite database"
    for content, says in [(whole[:len(whole) // 2], f"{unreadable} (database disk image is malformed"),
                          (b"", "is an empty file (0 bytes)"),
                          (other.read_bytes(), "is another program's database (tables experiments), not an Optuna"),
                          (b"not sqlite\n" * 50, f"{unreadable} (file is not a")]:
        db.write_bytes(content)
        err = _one_line_error(capsys, argv)
        assert f"{default} {says}" in err and "cannot be reached" not in err, err
        assert db.read_bytes() == content and (folder / "trials.csv").read_bytes() == table
    subprocess.run(_advice(err, "(mv "), shell=True, check=True)  # as typed: the study begins anew
    assert (folder / "study.db.broken").read_bytes() == content and not tuning.start("smoke", _sets(
        tiny_root, tmp_path)).study.trials

    journal = tmp_path / "study.journal"
    with_journal = [*argv, "--storage", f"journal:{journal}"]
    tuning.start("smoke", _sets(tiny_root, tmp_path), storage=f"journal:{journal}")
    records = journal.read_bytes()
    assert records.count(b"\n") >= 2
    for content, says in [(records[:-3], "ends in a record cut short"),
                          (b"{broken\n" + records, "is not a readable Optuna journal")]:
        journal.write_bytes(content)
        err = _one_line_error(capsys, with_journal)
        assert f"--storage journal:{journal} {says}" in err, err
        assert journal.read_bytes() == content
    journal.write_bytes(records[:-3])
    subprocess.run(_advice(_one_line_error(capsys, with_journal), "(sed "), shell=True, check=True)  # as typed
    assert journal.read_bytes() == records[:records.rindex(b"\n", 0, -1) + 1]  # the records before it
    assert tuning.start("smoke", _sets(tiny_root, tmp_path), storage=f"journal:{journal}").study


def _advice(message: str, opening: str) -> str:
    """The command a message advises in "... (COMMAND) ...", as a user would paste it."""
    return opening[1:] + message.split(opening, 1)[1].split(") ", 1)[0]


def _at_first_checkpoint(tiny_root: Path, out: Path, **sets: object) -> tuple[subprocess.Popen, Path]:
    """A worker running 2 trials, once trial 0 has saved its first checkpoint (that checkpoint's path)."""
    worker = _cli(tiny_root, out, "--trials", "2", **sets)
    checkpoint = out / "smoke" / "tune" / "unet" / "trials" / "0000" / "checkpoint_latest.pt"
    deadline = time.monotonic() + 90
    while not checkpoint.is_file():
        assert worker.poll() is None and time.monotonic() < deadline, "the worker ended before a checkpoint"
        time.sleep(0.02)
    return worker, checkpoint


def test_ctrl_c_inside_a_database_write_is_raised_when_the_write_ends():
    # a trial's report() to Optuna's SQLite file is one such write: a KeyboardInterrupt in its commit
    # left the file locked, and Optuna could not mark the trial failed ("Should not reach.")
    done = []
    with interrupts.remembered(), pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with interrupts.deferred():  # nested: raised at the outer block's end only
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here, and raises nothing yet
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"]


def test_ctrl_c_fails_the_trial_and_the_same_command_runs_its_parameters_again(tiny_root, tmp_path, capsys):
    epochs = {"tune.epochs": 3}  # interrupted after its first checkpoint, it has two epochs to go
    worker, checkpoint = _at_first_checkpoint(tiny_root, tmp_path, **epochs, **{"tracking.backend": "mlflow"})
    worker.send_signal(signal.SIGINT)
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 130 and "Traceback" not in out, out
    assert out.splitlines()[-2:] == ["", f"segstudy tune: interrupted; {cli._CONTINUE['tune']}"]
    cfg = load_config("smoke", _sets(tiny_root, tmp_path, **{"tracking.backend": "mlflow"}))
    mlflow = tracking.use_mlflow(cfg.tracking, cfg.output_root)
    (run,) = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list",
                                filter_string="tags.`segstudy.trial` = '0'")
    assert run.data.tags["segstudy.trial_state"] == "FAIL"

    assert cli.main(_argv(tiny_root, tmp_path, "--trials", "1", **epochs)) == 0  # what the line says
    assert f"[segstudy] resumed unet from {checkpoint}" in capsys.readouterr().out
    interrupted, retry = tuning.start("smoke", _sets(tiny_root, tmp_path, **epochs)).study.trials
    assert interrupted.state == optuna.trial.TrialState.FAIL and retry.state in tuning.DONE
    assert retry.params == interrupted.params and tune_storage.retry_of(retry) == 0


def test_two_workers_share_a_journal_and_one_mlflow_parent(tiny_root, tmp_path):
    journal = tmp_path / "study.journal"
    cfg = load_config("smoke", _sets(tiny_root, tmp_path, **{"tracking.backend": "mlflow"}))
    assert not (tmp_path / "mlflow.db").exists()  # the two workers create it together (tracking.prepare_database)
    _two_workers(tiny_root, tmp_path, "--trials", "2", "--storage", f"journal:{journal}",
                 **{"tracking.backend": "mlflow"})
    study = optuna.load_study(study_name="unet", storage=tune_storage.open_storage(
        f"journal:{journal}", tmp_path, cfg.tune)[0])
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state in tuning.DONE for t in study.trials)

    mlflow = tracking.use_mlflow(cfg.tracking, cfg.output_root)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    parents = [r for r in runs if "segstudy.tune_study" in r.data.tags]
    children = [r for r in runs if "segstudy.trial" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(int(r.data.tags["segstudy.trial"]) for r in children) == [0, 1, 2, 3]
    for child in children:  # its parameters, its per-validation mIoU, its final state
        trial = study.trials[int(child.data.tags["segstudy.trial"])]
        assert float(child.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "val_miou")
        assert len(history) == len(trial.intermediate_values)
        assert child.data.tags["segstudy.trial_state"] == trial.state.name
        assert child.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]


def test_a_killed_worker_s_trial_is_failed_and_its_parameters_run_again(tiny_root, tmp_path, capsys):
    epochs = {"tune.epochs": 3}  # killed after its first checkpoint, it has two epochs to go
    worker, checkpoint = _at_first_checkpoint(tiny_root, tmp_path, **epochs)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()

    assert cli.main(_argv(tiny_root, tmp_path, "--trials", "1", **epochs)) == 0  # the same command again
    out = capsys.readouterr().out
    assert "trials 0 were left running by a process that is gone" in out and "[segstudy] resumed unet" in out
    study = tuning.start("smoke", _sets(tiny_root, tmp_path, **epochs)).study
    killed, retry = study.trials
    assert killed.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == killed.params
    assert tune_storage.retry_of(retry) == 0
    result = json.loads((checkpoint.parent / "result.json").read_text())  # the killed trial's folder, finished
    assert result["finished"] and len(result["history"]) == 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_dead_worker_on_another_machine_is_failed_by_the_heartbeat(tiny_root, tmp_path):
    sets = _sets(tiny_root, tmp_path, **{"tune.heartbeat": 1})  # failed after 2 s without a beat
    study = tuning.start("smoke", sets)
    lost = study.study.ask()  # a trial another machine started, beat once, then died
    params = {"train.lr": lost.suggest_float("train.lr", 0.0001, 0.1, log=True),
              "train.optimizer": lost.suggest_categorical("train.optimizer", ["sgd", "adamw"])}
    lost.set_user_attr(tune_storage.WORKER, {"host": "elsewhere", "pid": 1, "started": 0.0})
    storage, _ = tune_storage.open_storage(None, study.out, study.cfg.tune)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("unet"), lost.number))
    assert tune_storage.fail_dead_local_trials(study.study, study.cfg.tune) == []  # not this host's process
    time.sleep(3.2)  # SQLite keeps the beat to the second: more than 2 s for sure
    tuning.optimize(study, 1)  # Optuna fails the silent trial before this one; its retry runs first
    dead, retry = study.study.get_trials()
    assert dead.state == optuna.trial.TrialState.FAIL
    assert retry.params == params and tune_storage.retry_of(retry) == 0 and retry.state in tuning.DONE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster on a free loopback port (as `nobody` when run as root: initdb
    refuses root); its URL, then the cluster stopped and deleted."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries are not installed (/usr/lib/postgresql/*/bin; apt-get install postgresql)")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: initdb refuses root")
    home = Path(tempfile.mkdtemp(prefix="segstudy-pg-"))
    if as_user:
        shutil.chown(home, "nobody")
    data, port = home / "data", _free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    server = subprocess.Popen([*as_user, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(home),
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        _wait_for(port)
        yield url
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate"],
                       capture_output=True)
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def _wait_for(port: int) -> None:
    import psycopg2

    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres").close()
            return
        except psycopg2.OperationalError:
            assert time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.2)


def test_two_workers_share_a_postgresql_study(tiny_root, tmp_path, postgres_url):
    _two_workers(tiny_root, tmp_path, "--trials", "1", "--storage", postgres_url)
    study = optuna.load_study(study_name="unet", storage=postgres_url.replace("postgresql:", "postgresql+psycopg2:"))
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert all(t.state in tuning.DONE for t in study.trials)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2  # both workers ran trials


def _wandb_records(path: str) -> list:
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of CRC, length,
    type, protobuf chunk), as `wandb sync` reads them."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, records, buffer = Path(path).read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buffer = data[pos + 7:pos + 7 + length] if kind in (1, 2) else buffer + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(pb.Record.FromString(buffer))
    return records


def test_wandb_offline_logs_what_mlflow_logs(tiny_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from segstudy.engine.training import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = {}
    for backend in ("mlflow", "wandb"):
        cfg = load_config("smoke", _sets(tiny_root, tmp_path / backend, **{
            "tracking.backend": backend, "model.name": "unet", "train.val_every": 1}))
        results[backend] = train(cfg, progress=False, keep_weights=False)
    mlflow = tracking.use_mlflow(cfg.tracking, tmp_path / "mlflow")
    run = mlflow.get_run(results["mlflow"]["mlflow_run_id"])
    val_mlflow = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_miou")]

    (path,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = _wandb_records(path)
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for u in r.run.config.update if u.key != "_wandb"}
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    val_wandb = [h["val_miou"] for h in history if "val_miou" in h]

    differ = ("output_root", "tracking.backend")  # tmp_path/<backend>, and the backend itself
    params = {k: v for k, v in run.data.params.items() if not k.endswith(differ)}
    assert {k: str(v)[:500] for k, v in config.items() if k in params} == params  # the same parameters
    assert set(params) <= set(config)
    assert len(val_wandb) == len(val_mlflow) == 2  # one validation per epoch, in both
    assert val_wandb == pytest.approx(val_mlflow) and val_mlflow[-1] == pytest.approx(
        results["mlflow"]["history"][-1]["val_miou"])
    assert [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"][0] == \
        results["wandb"]["mlflow_run_id"]  # the result names the W&B run (the key is the tracker's run id)


def test_notebook_06_on_smoke_and_its_report_section(tiny_root, tmp_path):
    from segstudy.notebook_runner import run_notebooks

    run_notebooks("smoke", _sets(tiny_root, tmp_path, **{"tune.trials": 2}), only=["06"], progress=False)
    summary = json.loads((tmp_path / "smoke" / "tune" / "unet" / "study.json").read_text())
    assert summary["trials"] == 2 and summary["best"] is not None
    assert set(summary["figures"]) >= {"history", "intermediate"}
    html = tuning.report(load_config("smoke", _sets(tiny_root, tmp_path)))._repr_html_()
    assert "optimization_history.png" in html and "best mIoU %" in html


def test_plan_sizes_the_study_apart_from_the_notebooks(tiny_root, tmp_path):
    from segstudy.studies import plan

    cfg = load_config("smoke", _sets(tiny_root, tmp_path))
    trial, row = plan.tuning_study(cfg)
    assert (trial.model.name, trial.train.epochs, trial.train.val_every) == ("unet", 2, 1)
    # 4 trials x 2 epochs x (8 images / batch 2), a validation after every epoch
    assert (row.notebook, row.iterations, row.val_passes) == ("06_tuning", 4 * 2 * 4, 4 * 2)
    assert "06_tuning" not in {r.notebook for r in plan.trainings(cfg)}
