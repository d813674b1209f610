"""Deployment files that cannot run here (no Docker engine, no cluster): parsed and checked.

The Kubernetes manifests, the CI workflow and the Dockerfile must agree with each other and with
the README: image names, the serving port and probes, the model URI, the test command.
"""

from __future__ import annotations

import re
from pathlib import Path

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
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
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
    assert re.search(r'mlflow models serve -m \\"\$MODEL_URI\\" --env-manager local -h 0\.0\.0\.0 -p \\"\$PORT', serve)
    for stage in (train, serve):  # dependencies before the code, so a code change reuses that layer
        assert stage.index("requirements.lock") < stage.index("COPY lib/" if "COPY lib/" in stage else "COPY . .")
        assert re.search(r"^USER 10001$", stage, flags=re.M) and "SEGSTUDY_EXTRAS= " in stage  # no root, no dev
    assert "EXPOSE 8080" in serve and "/ping" in serve
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "outputs", "**/*.egg-info"} <= set(ignored)
