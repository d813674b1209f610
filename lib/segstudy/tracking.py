"""Experiment tracking: MLflow (default, local sqlite backend, no server), W&B, or none."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segstudy.config import TrackingConfig
from segstudy.errors import UserError


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


def use_mlflow(cfg: TrackingConfig, output_root: str | Path):
    """Point MLflow at the profile's database and experiment (artifacts in output_root/mlartifacts)."""
    import mlflow

    # MLflow draws a "Downloading artifacts" bar for every model it logs and reads back: noise in a notebook
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = mlflow_uri(cfg, output_root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        # a local database keeps artefacts beside it; a tracking server (http://...) stores them
        # where it is configured to (e.g. --serve-artifacts), so other pods can load the models
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        artifacts = (Path(output_root).resolve() / "mlartifacts").as_uri() if local else None
        mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    mlflow.set_experiment(cfg.experiment)
    return mlflow


class Tracker:
    """One run. `backend` none makes every call a no-op, so the engine never branches on it."""

    def __init__(self, cfg: TrackingConfig, output_root: str | Path, run_name: str, params: dict,
                 tags: dict[str, str] | None = None):
        self.backend = cfg.backend
        self.cfg = cfg
        self.run_id: str | None = None
        if self.backend == "mlflow":
            self.mlflow = use_mlflow(cfg, output_root)
            self.params = params
            run = self.mlflow.start_run(run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self.mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        elif self.backend == "wandb":
            try:
                import wandb
            except ImportError as exc:
                raise UserError("tracking.backend = wandb needs the wandb package: pip install wandb "
                                "(or set tracking.backend: mlflow / none)") from exc
            os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb
            self.run = wandb.init(project=cfg.experiment, name=run_name, config=params,
                                  dir=str(output_root), tags=list((tags or {}).values()))
        elif self.backend != "none":
            raise UserError(f"tracking.backend = '{self.backend}'; choose mlflow, wandb or none")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace(" ", "_"): float(v) for k, v in metrics.items() if v == v}  # drop NaN
        if self.backend == "mlflow":
            self.mlflow.log_metrics(clean, step=step)
        elif self.backend == "wandb":
            self.wandb.log(clean, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        if self.backend == "mlflow":
            self.mlflow.end_run(status=status)
        elif self.backend == "wandb":
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
