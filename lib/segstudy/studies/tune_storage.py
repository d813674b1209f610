"""Where an Optuna study lives (`segstudy tune --storage`), and the trials whose worker died.

- none: a SQLite file under outputs/<profile>/tune/<study>/ (one machine, one worker at a time is best);
- `journal:PATH`: Optuna's journal file, shared by worker processes on one machine (file locks);
- an RDB URL (postgresql://..., mysql://..., sqlite:///...): shared by workers on several machines.

A storage that cannot be read (a file cut short, an empty file, another program's database, a journal
with a broken record) is one line naming the file, found by reading it before Optuna may write to it,
so the file is left exactly as it was.

A trial whose worker died stays RUNNING unless something fails it. RDB storages beat a heartbeat: a
trial silent for two `tune.heartbeat` periods is failed when another worker starts a trial, and
RetryHeartbeatStaleTrialCallback queues its parameters again. Every trial also records its worker (host, PID,
the process's start time), so a worker starting on the same host fails at once the trials of a
process that is gone (SIGKILL, OOM, a reboot), whatever the storage, and queues them the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import socket
import sqlite3
import warnings
from pathlib import Path

import optuna
import psutil
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from segstudy.config import TuneConfig
from segstudy.errors import UserError
from segstudy.files import exclusive_lock

JOURNAL = "journal:"
WORKER = "worker"  # the trial's user attribute naming the process that runs it


def masked(url: str) -> str:
    """The URL as printed and stored in results: without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def default_url(folder: Path) -> str:
    return f"sqlite:///{folder.resolve() / 'study.db'}"


def open_storage(spec: str | None, folder: Path, tune: TuneConfig) -> tuple[BaseStorage, str]:
    """(storage, its URL as shown) for --storage `spec` (None: the SQLite file in `folder`); an
    unreachable or unreadable one is one line naming it and the fix, before anything is written to it."""
    named = None
    if not spec:
        folder.mkdir(parents=True, exist_ok=True)
        spec = default_url(folder)
        named = f"the study's default storage {folder.resolve() / 'study.db'} (no --storage given)"
    if spec.startswith(JOURNAL):
        return _journal(Path(spec[len(JOURNAL):]).expanduser()), spec
    if "://" not in spec:
        raise UserError(f"--storage {spec}: not a storage; write journal:PATH (workers on one machine) or a "
                        f"database URL such as postgresql://USER:PASSWORD@HOST:5432/DB (several machines)")
    file = _sqlite_file(spec)
    named = named or f"--storage {masked(spec)}"
    # one process checks the file and creates Optuna's tables at a time: a second sees them made (a
    # folder that does not exist, or that this user cannot write, is said by SQLite, not by the lock)
    locked = file is not None and file.parent.is_dir() and os.access(file.parent, os.W_OK)
    with exclusive_lock(file.with_name(f"{file.name}.lock")) if locked else contextlib.nullcontext():
        if file:
            _check_sqlite(file, named)
        try:
            with warnings.catch_warnings():  # the heartbeat and the retry callback are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = _rdb(spec, tune)
        except Exception as exc:  # SQLAlchemy's OperationalError/ArgumentError, a missing driver, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if file:
                raise UserError(f"{named} cannot be opened as an Optuna study ({reason}); {_set_aside(file)}") \
                    from None
            raise UserError(f"{named} cannot be reached ({reason}); check the host, port, database name and "
                            f"password, or leave --storage out for a file under {folder}") from None
    return storage, masked(spec)


def _sqlite_file(url: str) -> Path | None:
    """The file of an sqlite:// URL (None: another database, or SQLite in memory)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return None  # said by RDBStorage, with the URL
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def _set_aside(file: Path) -> str:
    aside = f"mv {shlex.quote(str(file))} {shlex.quote(f'{file}.broken')}"
    return (f"nothing was written to it; move it aside ({aside}) and run the same command again to begin the "
            f"study anew, or name another storage with --storage")


def _check_sqlite(file: Path, named: str) -> None:
    """An existing SQLite file that is empty, damaged or another program's: one line, the file untouched
    (opened read-write only for SQLite's own recovery of a write a crash left half done; it creates nothing)."""
    if not file.exists():
        return
    if file.stat().st_size == 0:
        raise UserError(f"{named} is an empty file (0 bytes) and holds no study; remove it "
                        f"(rm {shlex.quote(str(file))}) and run the same command again to begin the study anew, "
                        f"or name another storage with --storage")
    try:
        with contextlib.closing(sqlite3.connect(f"{file.resolve().as_uri()}?mode=rw", uri=True)) as db:
            damage = [row[0] for row in db.execute("PRAGMA quick_check")]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise UserError(f"{named} is not a readable SQLite database ({exc}); {_set_aside(file)}") from None
    if damage != ["ok"]:
        raise UserError(f"{named} is damaged (SQLite's check: {damage[0]}); {_set_aside(file)}")
    if not {"studies", "version_info"} <= tables:
        what = f"another program's database (tables {', '.join(sorted(tables)[:3])})" if tables else "an empty database"
        raise UserError(f"{named} is {what}, not an Optuna study; {_set_aside(file)}")


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
    named = f"--storage {JOURNAL}{path}"
    if not path.parent.is_dir():
        raise UserError(f"{named}: the folder {path.parent} does not exist; create it (every "
                        f"worker must see the same file) or name a file in an existing folder")
    _check_journal_end(path, named)
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise UserError(f"{named} cannot be opened ({exc.strerror}); name a file this user can write") from None
    except (ValueError, KeyError, TypeError) as exc:  # a record that is not JSON, or not one of Optuna's
        raise UserError(f"{named} is not a readable Optuna journal (a record in it is broken: {exc}); nothing was "
                        f"written to it: restore it from a copy, or name a new journal file") from None


def _check_journal_end(path: Path, named: str) -> None:
    """A journal whose last record was cut short (a worker killed while writing it, a full disk): Optuna
    skips it when reading, but the next record written would be glued to it and break the file for good.
    Read under Optuna's own journal lock, so a record another worker is writing is not taken for one."""
    if not path.is_file() or path.stat().st_size == 0:
        return  # a new journal: Optuna makes the file
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        with open(path, "rb") as handle:
            handle.seek(-1, 2)
            complete = handle.read(1) == b"\n"
    finally:
        lock.release()
    if not complete:
        raise UserError(f"{named} ends in a record cut short (a worker killed while writing it, or a full disk); "
                        f"nothing was written to it: drop that last line (sed -i '$ d' {shlex.quote(str(path))}) to "
                        f"keep the records before it, and run the same command again")


def retry_callback(tune: TuneConfig) -> RetryHeartbeatStaleTrialCallback:
    """A failed trial (dead worker) is queued again with the same parameters, tune.retries times."""
    with warnings.catch_warnings():  # marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=tune.retries)


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial's parameters again, with no limit: it was stopped (Ctrl-C, a fault every
    trial shares), which says nothing about its parameters. The retry continues its run folder."""
    with warnings.catch_warnings():  # marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=None)(study, trial)


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
