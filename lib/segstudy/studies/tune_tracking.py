"""A tuning study in MLflow: one parent run per study (found by a tag naming its storage and name, so
every worker of the study shares it), the trials' trainings nested under it (mlflow.parentRunId) and
tagged with the trial's final state, the parent holding each trial's value and the best so far."""

from __future__ import annotations

import hashlib
import json

import optuna
from optuna.trial import FrozenTrial, TrialState

from segstudy import tracking
from segstudy.config import Config
from segstudy.studies import tune_space


def _client(cfg: Config):
    mlflow = tracking.use_mlflow(cfg.tracking, cfg.output_root)
    return mlflow, mlflow.MlflowClient(), tracking.mlflow_uri(cfg.tracking, cfg.output_root)


def parent_run(cfg: Config, storage: str, study: str) -> str | None:
    """The MLflow run of study `study` in `storage` (its URL as shown): found by a tag naming both, or
    begun; None without MLflow. Workers that begin one at the same time keep the earliest and delete
    their own."""
    if cfg.tracking.backend != "mlflow":
        return None
    mlflow, client, uri = _client(cfg)
    key = hashlib.sha256(f"{storage}#{study}".encode()).hexdigest()[:16]
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id

    def earliest() -> str | None:
        runs = client.search_runs([experiment], f"tags.`segstudy.tune_study` = '{key}'",
                                  order_by=["attributes.start_time ASC"], max_results=1)
        return runs[0].info.run_id if runs else None

    with tracking.mlflow_database(uri, f"opening the MLflow run of study {study}"):
        if found := earliest():
            return found
        run = client.create_run(experiment, run_name=f"{cfg.profile}-tune-{study}",
                                tags={"segstudy.tune_study": key, "segstudy.study": study,
                                      "segstudy.storage": storage, "profile": cfg.profile})
        for param, value in tune_space.signature(cfg).items():
            client.log_param(run.info.run_id, param, json.dumps(value)[:500])
        kept = earliest()
        if kept != run.info.run_id:
            client.delete_run(run.info.run_id)
    return kept


def set_status(cfg: Config, run_id: str | None, status: str) -> None:
    """The study's run marked `status` (RUNNING, FINISHED, KILLED, FAILED); nothing without one."""
    if run_id:
        _, client, uri = _client(cfg)
        tracking.retry_locked(lambda: client.update_run(run_id, status=status), uri,
                              f"marking the study's run {status}")


def record_trial(cfg: Config, run_id: str | None, study: optuna.Study, trial: FrozenTrial) -> None:
    """The trial's run gets its final state (a pruned one ends KILLED, not FAILED); the parent `run_id`
    the trial's value and the best so far."""
    if not run_id:
        return
    _, client, uri = _client(cfg)
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run_id}' and "
                                             f"tags.`segstudy.trial` = '{trial.number}'")

    def update() -> None:
        for run in found:
            client.set_tag(run.info.run_id, "segstudy.trial_state", trial.state.name)
            if trial.state == TrialState.PRUNED:
                client.set_terminated(run.info.run_id, "KILLED")
        if trial.value is not None:
            client.log_metric(run_id, "trial_val_miou", trial.value, step=trial.number)
        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            client.log_metric(run_id, "best_val_miou", study.best_value, step=trial.number)

    tracking.retry_locked(update, uri, f"recording trial {trial.number} of study {study.study_name}")
