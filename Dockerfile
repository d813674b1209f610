# segstudy images (no Docker engine exists on the machines this project is checked on: this file
# is linted and built by CI's docker job, not by the test suite).
#
#   docker build -t segstudy:0.1.0 .                              # GPU training image (default target)
#   docker run --gpus all --ipc=host -v /data/cityscapes:/data/cityscapes \
#       -v $PWD/outputs:/opt/segstudy/outputs segstudy:0.1.0     # = ./run_all.sh full
#   docker build --target serve -t segstudy-serve:0.1.0 .         # CPU REST server (MLflow's, + /metrics)
#   docker run -p 8080:8080 -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#       -e MODEL_URI=models:/segstudy-custom@champion segstudy-serve:0.1.0
#
# --ipc=host: the loader workers pass their batches through /dev/shm, and Docker's default 64 MB
# holds none of full's (5.3 GiB on one GPU or four: data/shared_memory.py, which stops a
# run that lacks the room before it trains); --shm-size=<N>g is the alternative.
#
# Both install requirements.lock (hash-checked) through scripts/setup_env.sh; SEGSTUDY_TORCH picks
# the torch build (cpu for the server; for training the PyPI default, whose CUDA 13.0 libraries
# match the base below and need a driver >= 580: for a driver from 525.60.13 build with
# --build-arg CUDA_BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 --build-arg SEGSTUDY_TORCH=cu126).

# CUDA runtime base. torch's wheel ships its own CUDA libraries (nvidia-* wheels, CUDA 13 for
# torch 2.14.1 from PyPI); the base brings the NVIDIA container settings for the same major version.
ARG CUDA_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---- serve: CPU-only REST server for the registered model --------------------------------------
FROM python:3.11-slim AS serve
ARG SEGSTUDY_TORCH=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SEGSTUDY_VENV=/opt/segstudy/.venv SEGSTUDY_TORCH=${SEGSTUDY_TORCH} SEGSTUDY_EXTRAS= \
    PATH=/opt/segstudy/.venv/bin:$PATH
WORKDIR /opt/segstudy
# the locked dependencies first, from a stub package: a cached layer while only code changes
COPY pyproject.toml requirements.lock README.md LICENSE ./
COPY scripts/ scripts/
RUN mkdir -p lib/segstudy && touch lib/segstudy/__init__.py && bash -c 'source scripts/setup_env.sh'
COPY lib/ lib/
RUN groupadd --gid 10001 segstudy && useradd --create-home --uid 10001 --gid 10001 segstudy
USER 10001
ENV MODEL_URI=models:/segstudy-custom@champion PORT=8080 WORKERS=1 OMP_NUM_THREADS=2
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/ping')"]
# MLFLOW_TRACKING_URI (the registry holding MODEL_URI) is given at run time. deploy/server.py does
# what `mlflow models serve --env-manager local` does, with GET /metrics on the same port (and
# prometheus_client's multiprocess folder when WORKERS > 1)
CMD ["sh", "-c", "exec python -m segstudy.deploy.server -m \"$MODEL_URI\" -h 0.0.0.0 -p \"$PORT\" -w \"$WORKERS\""]

# ---- train (default): the whole study on a GPU box -----------------------------------------------
FROM ${CUDA_BASE} AS train
ARG SEGSTUDY_TORCH=default
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=python3.11 SEGSTUDY_VENV=/opt/segstudy/.venv SEGSTUDY_TORCH=${SEGSTUDY_TORCH} SEGSTUDY_EXTRAS= \
    PATH=/opt/segstudy/.venv/bin:$PATH TORCH_HOME=/opt/torch CITYSCAPES_ROOT=/data/cityscapes
# Python 3.11, as in CI and environment.yml (Ubuntu 24.04 ships 3.12); the deadsnakes PPA keeps
# one build per release, so the packages are not pinned to versions that it would drop
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/segstudy
# the locked dependencies first, from a stub package: a cached layer while only code changes
COPY pyproject.toml requirements.lock README.md LICENSE ./
COPY scripts/ scripts/
RUN mkdir -p lib/segstudy && touch lib/segstudy/__init__.py && bash -c 'source scripts/setup_env.sh' \
    && python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"
# the ImageNet ResNet-50 backbone the full profile starts from, so the job needs no download
RUN python -c "from torchvision.models import resnet50, ResNet50_Weights; resnet50(weights=ResNet50_Weights.IMAGENET1K_V1)"
COPY . .
RUN groupadd --gid 10001 segstudy && useradd --create-home --uid 10001 --gid 10001 segstudy \
    && mkdir -p outputs && chown -R 10001:10001 outputs "$TORCH_HOME"
USER 10001
# single GPU: the whole study. Multi-GPU training of one model:
#   torchrun --nproc_per_node 4 -m segstudy train --profile full --model custom
CMD ["./run_all.sh", "full"]
