"""Deployment files that cannot run here (no Docker engine, no cluster): parsed and checked.

The Kubernetes manifests, the CI workflow and the Dockerfile must agree with each other and with
the README: image names, the serving port and probes, the model URI, the test command. The
manifests validate against Kubernetes' schemas (kubernetes-validate --strict, offline: the schemas
ship with the package) and run unprivileged as the image's user; the workflow is pinned and passes
zizmor's offline audits.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGE, SERVE_IMAGE = "segstudy:0.1.0", "segstudy-serve:0.1.0"


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _container(manifest: dict) -> dict:
    containers = manifest["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _stages(dockerfile: str) -> dict[str, str]:
    """Dockerfile stage name -> its text."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\w+)\s*$", dockerfile, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2]))


def test_serving_deployment_and_service():
    dep, svc = _load("k8s/serve-deployment.yaml"), _load("k8s/serve-service.yaml")
    assert (dep["apiVersion"], dep["kind"]) == ("apps/v1", "Deployment")
    assert (svc["apiVersion"], svc["kind"]) == ("v1", "Service")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    c = _container(dep)
    assert c["image"] == SERVE_IMAGE
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = _env(c)
    assert re.fullmatch(r"models:/segstudy-[\w-]+@champion", env["MODEL_URI"])
    assert env["MLFLOW_TRACKING_URI"].startswith("http") and int(env["PORT"]) == ports["http"]
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/ping" and get["port"] in ("http", ports["http"]), probe
    assert c["livenessProbe"]["initialDelaySeconds"] > c["readinessProbe"]["initialDelaySeconds"]
    requests = c["resources"]["requests"]
    assert {"cpu", "memory"} <= requests.keys() and "memory" in c["resources"]["limits"]
    assert env["OMP_NUM_THREADS"] == str(requests["cpu"])
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", ports["http"])


def test_training_job_uses_the_notebooks_entry_point_on_all_its_gpus():
    job = _load("k8s/train-job.yaml")
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"  # a new pod per failure, which resumes from the checkpoint
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    c = _container(job)
    assert c["image"] == TRAIN_IMAGE
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    cmd = c["command"]
    assert cmd[:4] == ["segstudy", "train", "--profile", "full"] and f"train.gpus={gpus}" in cmd
    assert _env(c)["CITYSCAPES_ROOT"] in {m["mountPath"] for m in c["volumeMounts"]}
    assert "/dev/shm" in {m["mountPath"] for m in c["volumeMounts"]}


def test_ci_workflow_runs_the_readme_test_command_and_builds_the_images():
    wf = _load(".github/workflows/ci.yml")
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"push", "pull_request"} <= set(triggers)
    test = wf["jobs"]["test"]
    setup = next(s for s in test["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert str(setup["with"]["python-version"]) == "3.11" and setup["with"]["cache"] == "pip"
    readme = (ROOT / "README.md").read_text()
    readme_cmd = re.search(r"^(\./run_tests\.sh)\s", readme, flags=re.M).group(1)
    assert readme_cmd in [s.get("run", "").strip() for s in test["steps"]]
    assert "./run_all.sh rehearsal" in [s.get("run", "").strip() for s in test["steps"]]
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "./run_tests.sh" in ci_run and "./run_all.sh rehearsal" in ci_run  # the real-scale path too
    builds = {m["target"]: m["tag"] for m in wf["jobs"]["docker"]["strategy"]["matrix"]["include"]}
    assert builds == {"train": TRAIN_IMAGE, "serve": SERVE_IMAGE}
    assert set(builds) <= set(_stages((ROOT / "Dockerfile").read_text()))


def test_dockerfile_pins_and_commands():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:[\w.-]+runtime[\w.-]*$", text, flags=re.M)
    stages = _stages(text)
    train, serve = stages["train"], stages["serve"]
    assert 'CMD ["./run_all.sh", "full"]' in train and "scripts/setup_env.sh" in train
    pins = re.findall(r'"(torch|torchvision)==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert dict(pins) == {"torch": "2.14.1", "torchvision": "0.29.1"}
    assert "ARG SEGSTUDY_TORCH=cpu" in serve and "requirements.lock" in serve  # CPU wheels of the locked pins
    # MLflow's scoring server with /metrics on the same port (deploy/server.py)
    assert re.search(r'python -m segstudy\.deploy\.server -m \\"\$MODEL_URI\\" -h 0\.0\.0\.0 -p \\"\$PORT', serve)
    for stage in (train, serve):  # dependencies before the code, so a code change reuses that layer
        assert stage.index("requirements.lock") < stage.index("COPY lib/" if "COPY lib/" in stage else "COPY . .")
        assert re.search(r"^USER 10001$", stage, flags=re.M) and "SEGSTUDY_EXTRAS= " in stage  # no root, no dev
    assert "EXPOSE 8080" in serve and "/ping" in serve
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "outputs", "**/*.egg-info"} <= set(ignored)


# kinds of CustomResourceDefinitions (the Prometheus Operator's PrometheusRule): no Kubernetes schema
# knows them and kubernetes-validate only warns, so they are checked by test_prometheus_rule instead
CRD_GROUPS = ("monitoring.coreos.com/",)
MANIFESTS = [p for p in sorted((ROOT / "k8s").glob("*.yaml"))
             if not yaml.safe_load(p.read_text())["apiVersion"].startswith(CRD_GROUPS)]
OLDEST_K8S = "1.30"  # the oldest Kubernetes the manifests are checked against


def _kubernetes_validate(version: str, *paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--kubernetes-version", version,
                           *map(str, paths)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", [OLDEST_K8S, "newest"])
def test_manifests_validate_strictly(version):
    from kubernetes_validate.utils import latest_version  # the newest Kubernetes the package knows

    version = latest_version() if version == "newest" else version
    names = {m.name for m in MANIFESTS}
    assert {"serve-deployment.yaml", "serve-service.yaml", "train-job.yaml", "tune-job.yaml"} <= names
    result = _kubernetes_validate(version, *MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(MANIFESTS), result.stdout


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    job = _load("k8s/train-job.yaml")
    job["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {"runAsNonRoot": True}  # a typo
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = _kubernetes_validate(OLDEST_K8S, tmp_path / "job.yaml")
    assert result.returncode != 0 and "securityContex" in result.stdout + result.stderr


# the rule schema of the Prometheus Operator's PrometheusRule CRD (monitoring.coreos.com/v1, v0.7x),
# written out here: no CRD schema ships offline
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_RULE = {"type": "object", "required": ["expr"], "additionalProperties": False,
         "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
         "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                        "expr": {"type": "string", "minLength": 1}, "for": {"type": "string", "pattern": _DURATION},
                        "keep_firing_for": {"type": "string", "pattern": _DURATION},
                        "labels": _STRINGS, "annotations": _STRINGS}}
PROMETHEUS_RULE = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {"groups": {
        "type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "rules"],
                                                  "additionalProperties": False, "properties": {
            "name": {"type": "string", "minLength": 1}, "interval": {"type": "string", "pattern": _DURATION},
            "rules": {"type": "array", "minItems": 1, "items": _RULE}}}}}}}}


def _served_series() -> set[str]:
    """Every series name the server exports (a ServingMetrics with a drift reference, scraped)."""
    import numpy as np
    from prometheus_client.parser import text_string_to_metric_families

    from segstudy.deploy import drift, serving_metrics

    reference = drift.Reference(np.full((4, drift.WIDTH), 0.1), window=2, step=2, false_alarm=0.05)
    text = serving_metrics.exposition(serving_metrics.ServingMetrics(reference)).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_prometheus_rule_alerts_on_errors_latency_and_drift_from_served_series():
    import jsonschema

    rule = _load("k8s/serve-alerts.yaml")
    jsonschema.validate(rule, PROMETHEUS_RULE)
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert len(exprs) == len(rules)  # unique names
    served = _served_series()
    for name, expr in exprs.items():
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), name
        used = set(re.findall(r"\bsegstudy_\w+", expr))
        assert used and used <= served, (name, used - served)
        assert all(r.get("labels", {}).get("severity") in ("warning", "critical") for r in rules), name
    text = " ".join(exprs.values())
    for needed in ("segstudy_request_errors_total", "segstudy_request_seconds_bucket", "segstudy_drift_alarms_total"):
        assert needed in text, needed  # error rate, p95 latency, drift
    assert "histogram_quantile(0.95" in text
    # every pod is scraped where it serves
    dep = _load("k8s/serve-deployment.yaml")
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    port = _container(dep)["ports"][0]["containerPort"]
    assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def _image_uid_gid() -> tuple[int, int]:
    """The unprivileged user every Dockerfile stage runs as: (uid, gid) of its useradd, = USER."""
    text = (ROOT / "Dockerfile").read_text()
    users = set(re.findall(r"useradd [^\n]*--uid (\d+) --gid (\d+)", text))
    assert len(users) == 1, users
    uid, gid = map(int, users.pop())
    assert set(re.findall(r"^USER (\d+)$", text, flags=re.M)) == {str(uid)}
    assert f"groupadd --gid {gid}" in text
    return uid, gid


@pytest.mark.parametrize("name", ["k8s/serve-deployment.yaml", "k8s/train-job.yaml", "k8s/tune-job.yaml"])
def test_pods_run_unprivileged_as_the_image_user(name):
    uid, gid = _image_uid_gid()
    pod = _load(name)["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid)
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not csc.get("privileged") and "add" not in csc["capabilities"], c["name"]
        assert csc.get("runAsUser", uid) == uid and csc.get("runAsNonRoot", True) is True, c["name"]


def test_training_job_outputs_volume_is_writable_by_the_image_user():
    """A replacement pod resumes from the checkpoints in the outputs PVC: uid 10001 must own them."""
    _, gid = _image_uid_gid()
    pod = _load("k8s/train-job.yaml")["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == gid
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"  # no recursive chown per restart
    outputs = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/opt/segstudy/outputs")
    assert not outputs.get("readOnly")
    volume = next(v for v in pod["volumes"] if v["name"] == outputs["name"])
    assert "persistentVolumeClaim" in volume  # survives the pod


def test_tuning_job_runs_full_s_study_on_indexed_workers_sharing_a_database_from_a_secret():
    job = _load("k8s/tune-job.yaml")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == job["spec"]["completions"]
    container = _container(job)
    command = container["command"]
    assert command[:4] == ["segstudy", "tune", "--profile", "full"] and container["image"] == TRAIN_IMAGE
    trials = int(command[command.index("--trials") + 1])
    full = yaml.safe_load((ROOT / "params" / "full.yaml").read_text())
    assert trials * job["spec"]["completions"] == full["tune"]["trials"]
    assert command[command.index("--storage") + 1] == "$(TUNE_STORAGE)"
    storage = next(e for e in container["env"] if e["name"] == "TUNE_STORAGE")
    assert storage["valueFrom"]["secretKeyRef"] == {"name": "segstudy-tune-db", "key": "url"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def _uses_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".github" / "workflows" / "ci.yml").read_text().splitlines()
            if re.match(r"^\s*(- )?uses:", line)]


# what the manifests' memory comments add up, besides the batches: a loader worker's own memory
# (peak USS of one worker of full's loaders at 2048x1024, measured on CPU: validation 405-566 MiB,
# training 147-210 MiB) and a rank process's (Python, torch and its CUDA libraries, the model: an
# estimate, no GPU here)
VAL_WORKER, TRAIN_WORKER, RANK_PROCESS = 0.6 * 2**30, 0.25 * 2**30, 3 * 2**30


def _bytes(quantity: str) -> float:
    """A Kubernetes memory quantity ('24Gi', '512Mi', '8G') in bytes."""
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]i?)?", quantity).groups()
    return float(number) * ({"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
                             "Ti": 2**40}[unit] if unit else 1)


@pytest.mark.parametrize("name", ["k8s/train-job.yaml", "k8s/tune-job.yaml"])
def test_gpu_jobs_memory_fits_full_s_ranks_and_loader_workers(name, monkeypatch):
    """/dev/shm holds every batch the ranks' loader workers may have in flight; the memory request
    holds those batches twice (in /dev/shm, then pinned), every worker and every rank process; the
    limit is at least the request. The memory-backed emptyDir counts against the limit."""
    from segstudy.config_profiles import load_config
    from segstudy.data.shared_memory import loader_shm_bytes

    monkeypatch.setenv("CITYSCAPES_ROOT", "/data/cityscapes")
    job = _load(name)
    pod, resources = job["spec"]["template"]["spec"], _container(job)["resources"]
    ranks = int(resources["limits"]["nvidia.com/gpu"])
    cfg = load_config("full", {"train.gpus": ranks})
    shm = next(v["emptyDir"] for v in pod["volumes"] if v["name"] == "dshm")
    batches = loader_shm_bytes(cfg)
    assert shm["medium"] == "Memory" and batches <= _bytes(shm["sizeLimit"]) <= batches + 4 * 2**30
    workers = ranks * cfg.data.num_workers * (VAL_WORKER + TRAIN_WORKER)  # both loaders' workers persist
    need = 2 * batches + workers + ranks * RANK_PROCESS
    requested, limit = _bytes(resources["requests"]["memory"]), _bytes(resources["limits"]["memory"])
    assert need <= requested <= limit, f"{name}: {need / 2**30:.1f} GiB needed, {requested / 2**30:.0f} requested"


def test_ci_actions_are_pinned_to_commits_and_the_token_is_read_only():
    uses = _uses_lines()
    assert len(uses) == 5
    for line in uses:  # uses: owner/repo@<40 hex> # vX.Y.Z
        assert re.fullmatch(r"(- )?uses: [\w.-]+/[\w.-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+", line), line
    wf = _load(".github/workflows/ci.yml")
    assert wf["permissions"] == {"contents": "read"}
    for name, job in wf["jobs"].items():
        assert "write" not in str(job.get("permissions", "")), name  # widen only with a reason, per job
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name


def test_ci_workflow_passes_zizmor_offline():
    zizmor = shutil.which("zizmor", path=str(Path(sys.executable).parent)) or shutil.which("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (it is in the dev extra: scripts/setup_env.sh installs it)")
    result = subprocess.run([zizmor, "--offline", "--no-progress", str(ROOT / ".github" / "workflows" / "ci.yml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout, result.stdout
