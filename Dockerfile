# segstudy images (no Docker engine exists on the machines this project is checked on: this file
# is built by CI's docker job, not by the test suite).
#
#   docker build -t segstudy:0.1.0 .                              # GPU training image (default target)
#   docker run --gpus all -v /data/cityscapes:/data/cityscapes -v $PWD/outputs:/opt/segstudy/outputs \
#       segstudy:0.1.0                                            # = ./run_all.sh full
#   docker build --target serve -t segstudy-serve:0.1.0 .         # CPU REST server (mlflow models serve)
#   docker run -p 8080:8080 -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#       -e MODEL_URI=models:/segstudy-custom@champion segstudy-serve:0.1.0

# CUDA runtime base. torch's PyPI wheel ships its own CUDA libraries (nvidia-* wheels), so this
# base mainly brings the NVIDIA container settings; the host driver must support the CUDA version
# `python -c "import torch; print(torch.version.cuda)"` prints inside the image.
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu22.04

# ---- serve: CPU-only REST server for the registered model --------------------------------------
FROM python:3.11-slim AS serve
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SEGSTUDY_VENV=/opt/segstudy/.venv PATH=/opt/segstudy/.venv/bin:$PATH
WORKDIR /opt/segstudy
# the pinned torch/torchvision as CPU wheels (no CUDA libraries in a CPU server), then the package
RUN python -m venv .venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY lib/ lib/
RUN bash -c 'source scripts/setup_env.sh'
RUN useradd --create-home segstudy
USER segstudy
ENV MODEL_URI=models:/segstudy-custom@champion PORT=8080 WORKERS=1 OMP_NUM_THREADS=2
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/ping')"
# MLFLOW_TRACKING_URI (the registry holding MODEL_URI) is given at run time
CMD exec mlflow models serve -m "$MODEL_URI" --env-manager local -h 0.0.0.0 -p "$PORT" -w "$WORKERS"

# ---- train (default): the whole study on a GPU box -----------------------------------------------
FROM ${CUDA_BASE} AS train
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=python3.11 SEGSTUDY_VENV=/opt/segstudy/.venv PATH=/opt/segstudy/.venv/bin:$PATH \
    TORCH_HOME=/opt/torch CITYSCAPES_ROOT=/data/cityscapes
# Python 3.11, as in CI and environment.yml (Ubuntu 22.04 ships 3.10)
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/segstudy
# dependencies first (a cached layer while only code changes): the same setup script as
# run_all.sh / run_tests.sh, so the pins are pyproject.toml's (torch==2.14.1, torchvision==0.29.1)
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY lib/ lib/
RUN bash -c 'source scripts/setup_env.sh' \
    && python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"
# the ImageNet ResNet-50 backbone the full profile starts from, so the job needs no download
RUN python -c "from torchvision.models import resnet50, ResNet50_Weights; resnet50(weights=ResNet50_Weights.IMAGENET1K_V1)"
COPY . .
# single GPU: the whole study. Multi-GPU training of one model:
#   torchrun --nproc_per_node 4 -m segstudy train --params full --model custom
CMD ["./run_all.sh", "full"]
