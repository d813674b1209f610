"""The MLflow model registry: the best model of each family, registered with an alias.

    from segstudy.deploy import registry
    v = registry.register(cfg, "outputs/demo/runs/custom/checkpoint_best.pt", "segstudy-custom",
                          {"val_miou": 0.27, "latency_ms": 540.0})        # alias "champion"
    v["uri"]   # "models:/segstudy-custom@champion": for segstudy predict and mlflow models serve

The registry is the profile's MLflow database (tracking.mlflow_uri: outputs/mlflow.db by default,
`tracking.uri` to use another), artefacts under outputs/mlartifacts. Each call logs a new version
of the servable pyfunc model (segstudy.deploy.serving), tags it with its metrics and moves the alias to
it: the notebook picks the best candidate, the latest call holds the alias. The drift reference of
the model (deploy/drift.py: its inputs and predictions on monitoring.reference_images val images,
and its threshold) is logged with it, for the server's drift score.
"""

from __future__ import annotations

import re
from pathlib import Path

from segstudy.config import Config
from segstudy.engine import provenance
from segstudy.errors import UserError
from segstudy.models.checkpoint import model_format
from segstudy.tracking import mlflow_database, mlflow_uri, prepare_database, use_mlflow

URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?$")


def client(cfg: Config):
    """An MlflowClient on the profile's registry."""
    from mlflow import MlflowClient

    uri = mlflow_uri(cfg.tracking, cfg.output_root)
    prepare_database(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register(cfg: Config, model: str | Path, name: str, metrics: dict[str, float] | None = None,
             alias: str | None = "champion", *, base_size: int | None = None,
             tags: dict[str, str] | None = None) -> dict | None:
    """Register `model` (a segstudy checkpoint .pt, fp32 or pruned, an .onnx file, fp32 or int8, or an
    OpenVINO int8 .xml)
    as a new version of `name`, with `metrics` as version tags (and run metrics), and point `alias`
    at it. `base_size`: the pre-processing's shorter side (default cfg.data.base_size).

    Returns {"name", "version", "alias", "uri", "run_id"}; None when tracking.backend is none
    (the smoke profile), which turns the registry off with the rest of tracking.
    """
    if cfg.tracking.backend == "none":
        print(f"[segstudy] registry: tracking.backend is none, {name} not registered")
        return None

    model = Path(model)
    if not model.is_file():
        raise UserError(f"cannot register {model}: no such file; give a checkpoint (.pt), an .onnx file or an "
                        f"OpenVINO .xml")
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    mlflow = use_mlflow(cfg.tracking, cfg.output_root)
    base_size = int(base_size or cfg.data.base_size)
    with mlflow_database(mlflow_uri(cfg.tracking, cfg.output_root), f"registering {name}"):
        return _register(cfg, mlflow, model, name, metrics, alias, base_size, tags)


def _register(cfg: Config, mlflow, model: Path, name: str, metrics: dict[str, float], alias: str | None,
              base_size: int, tags: dict[str, str] | None) -> dict:
    from segstudy.deploy.drift import reference_for
    from segstudy.deploy.serving import log_servable

    reference = reference_for(cfg, model, base_size)  # before the run: a failure leaves no empty run
    with mlflow.start_run(run_name=f"register-{name}", nested=mlflow.active_run() is not None,
                          tags={"profile": cfg.profile, "registered_model": name} | (tags or {})
                          | provenance.as_tags(provenance.stamp(cfg))) as run:
        mlflow.log_params({"source": str(model), "base_size": base_size})
        if metrics:
            mlflow.log_metrics({k.replace(" ", "_"): v for k, v in metrics.items() if v == v})
        info = log_servable(model, base_size, registered_model_name=name,
                            input_example=cfg.tracking.input_example, reference=reference)
        mlflow.log_metrics({"drift_threshold": min(reference.threshold, 1e9), "drift_window": reference.window})
    version = str(info.registered_model_version)
    mc = client(cfg)
    version_tags = {"source": str(model), "format": model_format(model),
                    "base_size": str(base_size), "profile": cfg.profile} | (tags or {})
    version_tags |= {k: f"{v:.6g}" for k, v in metrics.items()}
    for key, value in version_tags.items():
        mc.set_model_version_tag(name, version, key, value)
    if alias:
        mc.set_registered_model_alias(name, alias, version)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    print(f"[segstudy] registered {model.name} as {name} version {version}" + (f" ({uri})" if alias else ""))
    return {"name": name, "version": version, "alias": alias, "uri": uri, "run_id": run.info.run_id}


def log_trained(cfg: Config, result: dict) -> str | None:
    """Log a finished training's best weights into its own MLflow run as the servable model, a new
    version of segstudy-<model> without alias (tracking.log_model, tracking.register): what
    `segstudy train` does. The notebooks register the same checkpoint with an alias instead
    (register), so the weights are stored once. Returns the logged model's URI, None when off."""
    t = cfg.tracking
    if (t.backend != "mlflow" or not t.log_model or not result.get("finished") or result.get("reused")
            or not result.get("mlflow_run_id") or not result.get("checkpoint_best")):
        return None
    from segstudy.deploy.drift import reference_for  # imported here: MLflow costs seconds a command
    from segstudy.deploy.serving import log_servable

    mlflow = use_mlflow(t, cfg.output_root)
    with mlflow_database(mlflow_uri(t, cfg.output_root), f"logging the model of run {result['mlflow_run_id']}"), \
            mlflow.start_run(run_id=result["mlflow_run_id"]):  # log_servable keeps only the weights and meta
        info = log_servable(result["checkpoint_best"], cfg.data.base_size,
                            registered_model_name=f"segstudy-{result['model']}" if t.register else None,
                            input_example=t.input_example,
                            reference=reference_for(cfg, result["checkpoint_best"], cfg.data.base_size))
    return info.model_uri


def describe(cfg: Config) -> str:
    """Every registered model with its versions and aliases, for error messages."""
    models = client(cfg).search_registered_models()
    if not models:
        return "no model is registered there yet (train with tracking.backend: mlflow, or registry.register)"
    return "; ".join(_versions_text(cfg, m.name) for m in sorted(models, key=lambda m: m.name))


def _versions_text(cfg: Config, name: str) -> str:
    mc = client(cfg)
    aliases = mc.get_registered_model(name).aliases  # {alias: version}; search results carry none
    versions = sorted(int(v.version) for v in mc.search_model_versions(f"name='{name}'"))
    listed = ", ".join(str(v) + "".join(f" @{a}" for a, av in aliases.items() if int(av) == v) for v in versions)
    return f"{name}: versions {listed or 'none'}"


def resolve(cfg: Config, uri: str) -> dict:
    """Check that `uri` names something in the profile's registry before anything loads it.

    models:/NAME@ALIAS, models:/NAME/VERSION (or /latest): returns {"name", "version", "uri"};
    runs:/RUN_ID/PATH: checks the run. A missing model, alias, version or run is a UserError
    that names the URI and lists what is registered.
    """
    from mlflow.exceptions import MlflowException

    where = mlflow_uri(cfg.tracking, cfg.output_root)
    mc = client(cfg)
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/")[0]
        try:
            mc.get_run(run_id)
        except MlflowException:
            raise UserError(f"{uri}: no run '{run_id}' in {where}; use models:/NAME@ALIAS "
                            f"({describe(cfg)})") from None
        return {"name": None, "version": None, "uri": uri}
    match = URI.match(uri)
    if not match:
        raise UserError(f"'{uri}' is not a model URI this command reads; write models:/NAME@ALIAS, "
                        f"models:/NAME/VERSION or runs:/RUN_ID/model (or give a .pt / .onnx file)")
    name, alias, version = match["name"], match["alias"], match["version"] or "latest"
    try:
        mc.get_registered_model(name)
    except MlflowException:
        raise UserError(f"{uri}: no registered model '{name}' in {where}; registered: {describe(cfg)}") from None
    try:
        if alias:
            found = mc.get_model_version_by_alias(name, alias)
        elif version == "latest":
            found = max(mc.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        else:
            found = mc.get_model_version(name, version)
    except (MlflowException, ValueError):
        what = f"alias '{alias}' is not set" if alias else f"there is no version '{version}'"
        raise UserError(f"{uri}: {what} for '{name}' in {where}; {_versions_text(cfg, name)}; use one of "
                        f"those (models:/{name}/VERSION or models:/{name}@ALIAS)") from None
    return {"name": name, "version": str(found.version), "uri": uri}


def load(cfg: Config, uri: str):
    """resolve(), then load the registered model in-process (a serving.SegmentationModel)."""
    import mlflow

    from segstudy.deploy.serving import load_segmenter

    resolve(cfg, uri)
    mlflow.set_tracking_uri(mlflow_uri(cfg.tracking, cfg.output_root))
    return load_segmenter(uri)
