"""Where an Optuna study lives (`segstudy tune --storage`), and the trials whose worker died.

- none: a SQLite file under outputs/<profile>/tune/<study>/ (one machine, one worker at a time is best);
- `journal:PATH`: Optuna's journal file, shared by worker processes on one machine (file locks);
- an RDB URL (postgresql://..., mysql://..., sqlite:///...): shared by workers on several machines.

A trial whose worker died stays RUNNING unless something fails it. RDB storages beat a heartbeat: a
trial silent for two `tune.heartbeat` periods is failed when another worker starts a trial, and
RetryHeartbeatStaleTrialCallback queues its parameters again. Every trial also records its worker (host, PID,
the process's start time), so a worker starting on the same host fails at once the trials of a
process that is gone (SIGKILL, OOM, a reboot), whatever the storage, and queues them the same way.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import warnings
from pathlib import Path

import optuna
import psutil
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from segstudy.config import TuneConfig
from segstudy.errors import UserError

JOURNAL = "journal:"
WORKER = "worker"  # the trial's user attribute naming the process that runs it


def masked(url: str) -> str:
    """The URL as printed and stored in results: without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def default_url(folder: Path) -> str:
    return f"sqlite:///{folder.resolve() / 'study.db'}"


def open_storage(spec: str | None, folder: Path, tune: TuneConfig) -> tuple[BaseStorage, str]:
    """(storage, its URL as shown) for --storage `spec` (None: the SQLite file in `folder`); an
    unreachable one is one line naming it and the fix, before anything is written to it."""
    if not spec:
        folder.mkdir(parents=True, exist_ok=True)
        spec = default_url(folder)
    if spec.startswith(JOURNAL):
        return _journal(Path(spec[len(JOURNAL):]).expanduser()), spec
    if "://" not in spec:
        raise UserError(f"--storage {spec}: not a storage; write journal:PATH (workers on one machine) or a "
                        f"database URL such as postgresql://USER:PASSWORD@HOST:5432/DB (several machines)")
    try:
        with warnings.catch_warnings():  # the heartbeat and the retry callback are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = _rdb(spec, tune)
    except Exception as exc:  # SQLAlchemy's OperationalError/ArgumentError, a missing driver, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--storage {masked(spec)} cannot be reached ({reason}); check the host, port, database "
                        f"name and password, or leave --storage out for a file under {folder}") from None
    return storage, masked(spec)


def _rdb(spec: str, tune: TuneConfig) -> RDBStorage:
    return RDBStorage(_with_driver(spec), heartbeat_interval=tune.heartbeat, grace_period=2 * tune.heartbeat,
                      heartbeat_stale_trial_callback=retry_callback(tune), engine_kwargs=_engine_kwargs(spec))


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; the lock installs psycopg2 (psycopg2-binary)."""
    if re.match(r"postgres(ql)?://", url) and importlib.util.find_spec("psycopg") is None:
        return re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", url)
    return url


def _engine_kwargs(url: str) -> dict:
    """A database that does not answer fails in seconds, not after the driver's minutes."""
    return {"connect_args": {"connect_timeout": 10}} if url.startswith(("postgres", "mysql")) else {}


def _journal(path: Path) -> JournalStorage:
    if not path.parent.is_dir():
        raise UserError(f"--storage {JOURNAL}{path}: the folder {path.parent} does not exist; create it (every "
                        f"worker must see the same file) or name a file in an existing folder")
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise UserError(f"--storage {JOURNAL}{path} cannot be opened ({exc.strerror}); "
                        f"name a file this user can write") from None


def retry_callback(tune: TuneConfig) -> RetryHeartbeatStaleTrialCallback:
    """A failed trial (dead worker) is queued again with the same parameters, tune.retries times."""
    with warnings.catch_warnings():  # marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=tune.retries)


def retry_of(trial: FrozenTrial) -> int | None:
    """The number of the trial whose dead worker this one retries (None: a trial of its own)."""
    with warnings.catch_warnings():  # the accessor is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def this_worker() -> dict:
    """What identifies this process on its host, also after its PID is reused."""
    return {"host": socket.gethostname(), "pid": psutil.Process().pid, "started": psutil.Process().create_time()}


def _gone(worker: dict) -> bool:
    """Whether the process `worker` names, on this host, no longer runs."""
    try:
        return psutil.Process(worker["pid"]).create_time() != worker["started"]
    except psutil.NoSuchProcess:
        return True


def fail_dead_local_trials(study: optuna.Study, tune: TuneConfig) -> list[int]:
    """Fail the RUNNING trials of processes on this host that are gone, and queue their parameters
    again; returns their numbers."""
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER)
        if not worker or worker.get("host") != host or not _gone(worker):
            continue
        if _fail(study, trial):
            retry_callback(tune)(study, study._storage.get_trial(trial._trial_id))
            failed.append(trial.number)
    return failed


def _fail(study: optuna.Study, trial: FrozenTrial) -> bool:
    # Optuna fails another process's trial only through the storage (as its own heartbeat check does);
    # False when another worker failed it first
    try:
        return study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
