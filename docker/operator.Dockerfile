# syntax=docker/dockerfile:1
# The stagerun operator image (the chart's image.repository).
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/stagerun/stagerun-operator:0.1.0 .   # from the repo root
#
# Only the `operator` extra is installed (kopf, the kubernetes client) on top of stagerun's pure-Python spec and plan:
# no torch, which the operator never imports. The image stays small (about 200 MB) and starts in a second.

ARG PYTHON_IMAGE=python:3.11-slim

# Build stage: wheels of stagerun and its operator dependencies (no compiler needed, all pure Python or manylinux).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# 65532: the conventional "nonroot" uid/gid, the one the chart's securityContext runs as.
RUN groupadd --gid 65532 nonroot
RUN useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin nonroot
# The wheels are bind-mounted from the build stage (BuildKit), so they take no layer of their own.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "stagerun[operator]"
USER 65532:65532
WORKDIR /tmp
# 8080: kopf's health endpoint (--liveness); 8081: the operator's Prometheus metrics (--metrics-port).
EXPOSE 8080 8081
ENTRYPOINT ["stagerun"]
CMD ["operator"]
