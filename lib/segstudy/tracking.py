"""Experiment tracking: MLflow (default, local sqlite backend, no server), W&B, or none."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from segstudy.config import TrackingConfig
from segstudy.errors import UserError
from segstudy.files import exclusive_lock


def _clean(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow's metric names (no spaces), NaN dropped."""
    return {k.replace(" ", "_"): float(v) for k, v in metrics.items() if v == v}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# MLFLOW_TRACKING_URI as the user's environment had it when segstudy started: mlflow.set_tracking_uri
# writes the variable too, so reading it later would follow whichever profile was used last
ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def mlflow_uri(cfg: TrackingConfig, output_root: str | Path) -> str:
    """tracking.uri, else the environment's MLFLOW_TRACKING_URI, else the local database under output_root."""
    return cfg.uri or ENV_TRACKING_URI or f"sqlite:///{Path(output_root).resolve()}/mlflow.db"


# A locked SQLite database (another process writing, a sync tool): MLflow waits 20 s on each call
# (its busy_timeout) and logs a traceback; segstudy tries a call this many times in all, then says so in
# one line. Logging a metric or a parameter again, or ending a run again, changes nothing.
LOCK_ATTEMPTS = 3
T = TypeVar("T")


def _locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc) or "database is locked" in str(exc.__cause__ or "")


class _DropLockedTraceback(logging.Filter):
    """MLflow's traceback for a locked database: segstudy says it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


_DROP_LOCKED_TRACEBACK = _DropLockedTraceback()  # one instance: addFilter keeps it once however often called


@contextlib.contextmanager
def mlflow_database(uri: str, what: str) -> Iterator[None]:
    """A locked database during `what` becomes one line naming it and the fix."""
    try:
        yield
    except Exception as exc:  # MlflowException, or SQLAlchemy's OperationalError underneath it
        if not _locked(exc):
            raise
        raise UserError(f"the MLflow database {uri} stayed locked ({what}; another process is writing to it, "
                        f"or a sync tool holds it); wait for it and run the same command again, or give this "
                        f"run a database of its own with --set tracking.uri=sqlite:////another/mlflow.db") from None


def retry_locked(call: Callable[[], T], uri: str, what: str, attempts: int | None = None) -> T:
    """`call`, tried again while the database is locked, LOCK_ATTEMPTS times in all; then mlflow_database's
    one line. Only for calls that may be repeated (logging a value, ending a run)."""
    attempts = attempts or LOCK_ATTEMPTS
    with mlflow_database(uri, f"{what}, {attempts} attempts"):
        for _ in range(attempts - 1):
            try:
                return call()
            except Exception as exc:
                if not _locked(exc):
                    raise
                time.sleep(1.0)
        return call()  # the last attempt: a locked database now becomes mlflow_database's line


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:// URI (SQLAlchemy's reading of it); None for any other store."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
    except Exception:  # not a database URL: a databricks URI, a bare path
        return None
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None  # a tracking server (http://), PostgreSQL, an in-memory database
    return Path(url.database)


_PREPARED: set[str] = set()  # the databases this process has already seen created


def prepare_database(uri: str) -> None:
    """Create MLflow's tables in a local sqlite database (its schema migrations) once, under the lock
    `<database>.lock`, before any client of this process uses it. MLflow creates them on first use
    without a lock, so two processes starting together on a fresh output root both migrate and one fails
    ("table ... already exists"); here the others wait, then find the schema made. Other stores (a
    tracking server, PostgreSQL) are created by their own server or administrator."""
    database = sqlite_file(uri)
    if database is None or uri in _PREPARED:
        return
    from mlflow import MlflowClient

    lock = database.with_name(database.name + ".lock")
    with exclusive_lock(lock), mlflow_database(uri, "creating its tables"):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # opening the store migrates it
    _PREPARED.add(uri)


def use_mlflow(cfg: TrackingConfig, output_root: str | Path):
    """Point MLflow at the profile's database and experiment (artifacts in output_root/mlartifacts)."""
    import mlflow

    logging.getLogger("mlflow.store.db.utils").addFilter(_DROP_LOCKED_TRACEBACK)

    # MLflow draws a "Downloading artifacts" bar for every model it logs and reads back: noise in a notebook
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = mlflow_uri(cfg, output_root)
    prepare_database(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow_database(uri, f"opening experiment {cfg.experiment}"):
        if mlflow.get_experiment_by_name(cfg.experiment) is None:
            _create_experiment(mlflow, cfg.experiment, uri, output_root)
        mlflow.set_experiment(cfg.experiment)
    return mlflow


def _create_experiment(mlflow, name: str, uri: str, output_root: str | Path) -> None:
    """The experiment, unless a process started beside this one has just created it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    # a local database keeps artefacts beside it; a tracking server (http://...) stores them
    # where it is configured to (e.g. --serve-artifacts), so other pods can load the models
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    artifacts = (Path(output_root).resolve() / "mlartifacts").as_uri() if local else None
    try:
        mlflow.create_experiment(name, artifact_location=artifacts)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


# tags every run started inside `extra_tags` carries besides its own
_EXTRA_TAGS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("segstudy_extra_tags",
                                                                                     default=None)


@contextlib.contextmanager
def extra_tags(tags: dict[str, str]) -> Iterator[None]:
    """Runs started in the block carry `tags` too: `segstudy tune` nests each trial's training under its
    study's run (mlflow.parentRunId) without the training knowing it is a trial."""
    token = _EXTRA_TAGS.set((_EXTRA_TAGS.get() or {}) | tags)
    try:
        yield
    finally:
        _EXTRA_TAGS.reset(token)


# W&B refuses a tag longer than 64 characters (a commit or a CPU's name may be)
WANDB_TAG_LIMIT = 64
# per-step values wait up to this long for one batched write: each write is a database transaction,
# a visible share of a short training step on a 2-core CPU or a GPU (docs/results.md)
STEP_FLUSH_S = 10.0


class Tracker:
    """One run. `backend` none makes every call a no-op, so the engine never branches on it."""

    def __init__(self, cfg: TrackingConfig, output_root: str | Path, run_name: str, params: dict,
                 tags: dict[str, str] | None = None):
        self.backend = cfg.backend
        self.cfg = cfg
        self.run_id: str | None = None
        self._pending: list = []  # mlflow.entities.Metric of steps not yet written (log_step), oldest first
        tags = (tags or {}) | (_EXTRA_TAGS.get() or {})
        if self.backend == "mlflow":
            self.mlflow = use_mlflow(cfg, output_root)
            self.uri = mlflow_uri(cfg, output_root)
            self.params = params
            with mlflow_database(self.uri, f"starting run {run_name}"):
                run = self.mlflow.start_run(run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            try:
                retry_locked(lambda: self.mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()}),
                             self.uri, f"logging the parameters of run {self.run_id}")
            except UserError:
                self.finish("FAILED")
                raise
        elif self.backend == "wandb":
            try:
                import wandb
            except ImportError as exc:
                raise UserError("tracking.backend = wandb needs the wandb package: pip install wandb "
                                "(or set tracking.backend: mlflow / none)") from exc
            os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb
            # the same parameters as MLflow's (flat, dotted keys); the tags' values as W&B's tags, a
            # study's trials grouped by its name
            self.run = wandb.init(project=cfg.experiment, name=run_name, config=flatten(params),
                                  dir=str(output_root), group=tags.get("segstudy.study"),
                                  tags=sorted({str(v)[:WANDB_TAG_LIMIT] for v in tags.values() if str(v)}))
            self.run_id = self.run.id
        elif self.backend != "none":
            raise UserError(f"tracking.backend = '{self.backend}'; choose mlflow, wandb or none")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Written now, after the steps log_step holds."""
        self.flush_steps()
        clean = _clean(metrics)
        if self.backend == "mlflow":
            retry_locked(lambda: self.mlflow.log_metrics(clean, step=step), self.uri,
                         f"logging step {step} of run {self.run_id}")
        elif self.backend == "wandb":
            self.run.log(clean, step=step)

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        """A training step's values, with the time they were taken: MLflow gets them in one batch every
        STEP_FLUSH_S (and at log_metrics and finish); W&B batches on its own."""
        clean = _clean(metrics)
        if self.backend == "mlflow":
            now = int(time.time() * 1000)
            self._pending += [self.mlflow.entities.Metric(k, v, now, step) for k, v in clean.items()]
            if self._pending and now - self._pending[0].timestamp >= STEP_FLUSH_S * 1000:  # empty: NaN steps only
                self.flush_steps()
        elif self.backend == "wandb":
            self.run.log(clean, step=step)

    def flush_steps(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        client = self.mlflow.MlflowClient(tracking_uri=self.uri)
        retry_locked(lambda: client.log_batch(self.run_id, metrics=pending), self.uri,
                     f"logging steps {pending[0].step}-{pending[-1].step} of run {self.run_id}")

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`. A run that failed is marked FAILED even when the database was
        locked a while (twice the attempts); only when it stays locked is the run left for a line to name."""
        if self.backend == "mlflow":
            if status == "FINISHED":
                self.flush_steps()
                retry_locked(lambda: self.mlflow.end_run(status=status), self.uri, f"ending run {self.run_id}")
                return
            try:
                self.flush_steps()  # the curve up to the failure
            except UserError as exc:
                print(f"[segstudy] could not log the last steps of MLflow run {self.run_id}: {exc}", flush=True)
            try:
                retry_locked(lambda: self.mlflow.end_run(status=status), self.uri, f"ending run {self.run_id}",
                             attempts=2 * LOCK_ATTEMPTS)
            except UserError as exc:  # already failing: say it, and let the first error be the one raised
                print(f"[segstudy] could not mark MLflow run {self.run_id} {status}: {exc}", flush=True)
        elif self.backend == "wandb":
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
