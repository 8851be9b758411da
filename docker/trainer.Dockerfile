# syntax=docker/dockerfile:1
# The stagerun trainer image: what TrainingRuns name in spec.image; its pods run `stagerun launch`. Built by
# docker/build.sh, or by hand from the repo root:
#
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/stagerun/stagerun-trainer:0.1.0 .
#
# By default everything comes from Docker Hub (python:3.11-slim) and PyPI: PyPI's Linux torch wheels are CUDA builds
# that carry their CUDA runtime in nvidia-* wheels, so no CUDA base image and no PyTorch index are needed (the host
# needs an NVIDIA driver new enough for that CUDA). Build arguments:
#   PYTHON_IMAGE        an image with Python and pip, used to fetch uv (default python:3.11-slim)
#   BASE_IMAGE          the image the trainer is built on (default: PYTHON_IMAGE), e.g. a CUDA base
#                       (nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04); Debian or Ubuntu, since apt installs
#                       SYSTEM_PACKAGES; without Python PYTHON_VERSION, uv downloads a standalone Python
#   PYTHON_VERSION      Python of the virtual environment (default 3.11)
#   TORCH_SPEC          the torch requirement (default torch==2.13.0, the version CI tests; stagerun accepts
#                       >=2.11,<2.15)
#   TORCH_INDEX_URL     another index for torch, e.g. https://download.pytorch.org/whl/cu128 for CUDA 12.8 (default:
#                       none, PyPI)
#   UV_VERSION          uv, from PyPI (default 0.13.9)
#   SYSTEM_PACKAGES     apt packages: gcc and the C library headers, which triton compiles its GPU launchers with
#                       (torch.compile is on by default with GPUs); Python's headers come with python:*-slim
#   INSTALL_FLASH_ATTN  1 = also install flash-attn (completing the `gpu` extra); 0 = skip it (default)
#   FLASH_ATTN          with INSTALL_FLASH_ATTN=1: a wheel URL matching Python/torch/CUDA (recommended), or a pip
#                       requirement such as flash-attn==2.8.3 (compiles from source: needs a -devel CUDA BASE_IMAGE,
#                       nvcc, and an hour)

ARG PYTHON_IMAGE=python:3.11-slim
ARG BASE_IMAGE=${PYTHON_IMAGE}

# ---- uv from PyPI: its wheel holds one binary that runs on any glibc Linux, so it is copied into BASE_IMAGE --------
FROM ${PYTHON_IMAGE} AS uv
ARG UV_VERSION=0.13.9
# build-ca: a CA bundle the build machine's proxy needs (docker/build.sh --build-ca), mounted for this step only.
RUN --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export PIP_CERT=/run/secrets/build-ca; fi \
    && pip install --no-cache-dir --disable-pip-version-check --target /opt/uv "uv==${UV_VERSION}"

# ---- the trainer: Python, torch, stagerun's dependencies, stagerun -------------------------------------------------
FROM ${BASE_IMAGE}
ARG PYTHON_VERSION=3.11
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ARG SYSTEM_PACKAGES="gcc libc6-dev"
ENV PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN if [ -n "${SYSTEM_PACKAGES}" ]; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${SYSTEM_PACKAGES} \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=uv /opt/uv/bin/uv /usr/local/bin/uv
# build-ca as above (uv reads SSL_CERT_FILE). The uv cache is a build cache mount, kept by the builder between builds
# and never part of the image: a rebuild with another torch or new dependencies downloads only what changed.
RUN --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca; fi \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
# torch first, alone (from TORCH_INDEX_URL when set, which also serves torch's dependencies): stagerun's own
# requirement (a range) is then already satisfied, and this multi-GB layer stays cached while stagerun changes.
RUN --mount=type=cache,id=stagerun-uv,target=/root/.cache/uv --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca; fi \
    && uv pip install "${TORCH_SPEC}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}
# stagerun's dependencies (the `trainer` extra, and the GPU telemetry of the `gpu` extra: the part that needs no
# compiler), read from pyproject.toml, so that a change of stagerun's code rebuilds only the small layer at the end.
# STAGERUN_DEPENDENCIES: a digest of pyproject.toml (docker/build.sh sets it), the key of this step's layer cache,
# since buildah (unlike BuildKit) does not look into what a bind mount holds.
ARG STAGERUN_DEPENDENCIES=
RUN --mount=type=bind,source=pyproject.toml,target=/context/pyproject.toml \
    --mount=type=cache,id=stagerun-uv,target=/root/.cache/uv --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca; fi \
    && uv pip install -r /context/pyproject.toml --extra trainer "nvidia-ml-py>=12"

# Optional flash-attn (INSTALL_FLASH_ATTN=1); --no-build-isolation: a source build compiles against the torch above.
ARG INSTALL_FLASH_ATTN=0
ARG FLASH_ATTN=flash-attn
RUN --mount=type=cache,id=stagerun-uv,target=/root/.cache/uv --mount=type=secret,id=build-ca \
    if [ "${INSTALL_FLASH_ATTN}" = 1 ]; then \
        if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca; fi; \
        uv pip install --no-build-isolation "${FLASH_ATTN}"; \
    fi

# ---- stagerun itself, non-root, stagerun as the entrypoint -----------------------------------------------------------
# 65532, as the operator. HOME is /tmp: with a read-only root filesystem, /tmp is the one folder a pod must mount
# writable (an emptyDir), and every cache lands there: triton's (~/.triton), torch.compile's (/tmp/torchinductor_*),
# matplotlib's (~/.config). Run data goes to the operator's work emptyDir (STAGERUN_RUN_DIR), checkpoints to
# spec.checkpoint.path: object stores need no uid; a PVC (spec.checkpoint.volumeClaim) must be writable by 65532.
RUN groupadd --gid 65532 stagerun \
    && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin stagerun
# STAGERUN_SOURCE: a digest of the source (docker/build.sh sets it), this step's cache key, as above. The source is
# bind-mounted read-only, copied to build, and kept by no layer; --no-deps: everything it needs is installed above.
ARG STAGERUN_SOURCE=
RUN --mount=type=bind,target=/context --mount=type=cache,id=stagerun-uv,target=/root/.cache/uv \
    --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca; fi \
    && mkdir /tmp/src \
    && cp -r /context/pyproject.toml /context/README.md /context/core /context/trainer /context/operator /tmp/src/ \
    && uv pip install --no-deps /tmp/src \
    && rm -rf /tmp/src
USER 65532:65532
ENV HOME=/tmp
WORKDIR /tmp
# 29400: torchrun's c10d rendezvous (pod 0); 8090: rank 0's /progress and /metrics.
EXPOSE 29400 8090
ENTRYPOINT ["stagerun"]
CMD ["--help"]
