# lightning-ctx image. Installs through the same `make install` as a checkout and runs `make demo` by default.
#
# CPU (default):
#   docker build -t lightning-ctx .
#   docker run --rm -v "$PWD/mlruns:/app/mlruns" -v "$PWD/demo_runs:/app/demo_runs" lightning-ctx   # make demo
#   docker run --rm -it -v "$PWD/mlruns:/app/mlruns" -v "$PWD/checkpoints:/app/checkpoints" \
#     -v "$PWD/exports:/app/exports" lightning-ctx lightning-ctx fit --config experiments/world_anchored.yaml
# Everything a run writes lives in the volumes below; without -v they are anonymous volumes that `--rm` deletes.
# The store records /app/mlruns/... as its artifact paths; lightning-ctx re-roots them when the store is opened on
# the host (lightning-ctx ui, compare, export, or the next fit there), so plots and tables stay reachable.
#
# CUDA: a CUDA base image and the matching PyTorch wheel index (torch stays pinned by TORCH_SPEC):
#   docker build -t lightning-ctx:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --rm --gpus all -v /models:/models -v "$PWD/mlruns:/app/mlruns" lightning-ctx:cuda \
#     lightning-ctx fit --config experiments/qwen2.5_0.5b_medmcqa.yaml --model.student /models/Qwen2.5-0.5B-Instruct
#
# The index is passed to pip as PIP_EXTRA_INDEX_URL, so `make install TORCH_SPEC=torch==2.13.0` resolves to the
# index's local build (2.13.0+cpu / 2.13.0+cu128 rank above PyPI's plain 2.13.0). Outside Docker the same works:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 make install TORCH_SPEC=torch==2.13.0
# (TORCH_SPEC is one quoted pip requirement; put pip options such as the index in PIP_* variables.)
# Weights are never downloaded at run time: mount model folders (-v /models:/models) and pass their paths.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL} \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    DEBIAN_FRONTEND=noninteractive

# make, and on CUDA (Ubuntu) bases a Python with venv; python:3.11-slim already has Python.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && (command -v python3 >/dev/null 2>&1 && python3 -c "import venv, ensurepip" 2>/dev/null \
        || apt-get install -y --no-install-recommends python3 python3-venv) \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Layer cache: the virtual environment and torch (the big download) only depend on the Makefile.
COPY Makefile ./
RUN make .venv/bin/python PYTHON=python3 && .venv/bin/python -m pip install "${TORCH_SPEC}"

# The project itself, installed exactly as `make install` does on a checkout (torch is already satisfied).
COPY . .
RUN make install PYTHON=python3 TORCH_SPEC="${TORCH_SPEC}" \
    && .venv/bin/python -c "import torch, lightning_ctx; print('torch', torch.__version__)"

ENV PATH=/app/.venv/bin:${PATH} \
    MLFLOW_TRACKING_URI=sqlite:////app/mlruns/mlflow.db
# runs (MLflow), the demo's plots and checkpoints, checkpoints of `fit`, folders of `lightning-ctx export`
VOLUME ["/app/mlruns", "/app/demo_runs", "/app/checkpoints", "/app/exports"]
# MLflow UI: docker run --rm -p 5000:5000 -v "$PWD/mlruns:/app/mlruns" lightning-ctx lightning-ctx ui --host 0.0.0.0
EXPOSE 5000

CMD ["make", "demo"]
