# syntax=docker/dockerfile:1
# The stagerun trainer image: what TrainingRuns name in spec.image. Pods run `stagerun launch`.
#
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/stagerun/stagerun-trainer:0.1.0 .     # from the repo root
#
# Build arguments:
#   BASE_IMAGE          a CUDA runtime image with cuDNN; its CUDA must match TORCH_INDEX_URL
#   PYTHON_VERSION      Python for the virtual environment (installed by uv; the base image's Python is not used)
#   TORCH_VERSION       torch release (stagerun accepts >=2.11,<2.15)
#   TORCH_INDEX_URL     the PyTorch wheel index for that CUDA (cu128 for CUDA 12.8, cu130 for 13.0, cpu for none)
#   INSTALL_FLASH_ATTN  1 = also install flash-attn and the `gpu` extra; 0 = skip flash-attn (default)
#   FLASH_ATTN          with INSTALL_FLASH_ATTN=1: a wheel URL matching Python/torch/CUDA (recommended), or a pip
#                       requirement such as flash-attn==2.8.3 (compiles from source: needs a -devel BASE_IMAGE, nvcc,
#                       and an hour)

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG INSTALL_FLASH_ATTN=0
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8

FROM ${UV_IMAGE} AS uv

# ---- base: Python, torch for the chosen CUDA, stagerun with the `trainer` extra --------------------------------------
FROM ${BASE_IMAGE} AS base
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
COPY --from=uv /uv /usr/local/bin/uv
RUN uv venv --python ${PYTHON_VERSION} /opt/venv
# torch first, from the CUDA index: stagerun's own requirement (a range) is then already satisfied, and nothing pulls
# a torch build for another CUDA from PyPI.
RUN uv pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /opt/stagerun/src
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
# nvidia-ml-py: the GPU telemetry of the `gpu` extra (the part of it that needs no compiler).
RUN uv pip install ".[trainer]" "nvidia-ml-py>=12"

# ---- optional flash-attn layer ----------------------------------------------------------------------------------------
FROM base AS flash-attn-0

FROM base AS flash-attn-1
ARG FLASH_ATTN=flash-attn
# --no-build-isolation: a source build compiles against the torch installed above.
RUN uv pip install --no-build-isolation "${FLASH_ATTN}"
RUN uv pip install ".[gpu]"

# ---- final: non-root, stagerun as the entrypoint ---------------------------------------------------------------------
FROM flash-attn-${INSTALL_FLASH_ATTN}
# 65532, as the operator. Trainer pods write to emptyDirs (always writable) and to checkpoint storage: object stores
# need no uid; a PVC (spec.checkpoint.volumeClaim) must be writable by 65532 (group-writable with fsGroup, or chown).
RUN groupadd --gid 65532 stagerun
RUN useradd --uid 65532 --gid 65532 --create-home --home-dir /home/stagerun --shell /usr/sbin/nologin stagerun
USER 65532:65532
# HOME holds the caches of triton and torch.compile.
ENV HOME=/home/stagerun
WORKDIR /home/stagerun
# 29400: torchrun's c10d rendezvous (pod 0); 8090: rank 0's /progress and /metrics.
EXPOSE 29400 8090
ENTRYPOINT ["stagerun"]
CMD ["--help"]
