# syntax=docker/dockerfile:1
# The stagerun operator image (the chart's image.repository). Built by docker/build.sh, or by hand from the repo root:
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/stagerun/stagerun-operator:0.1.0 .
#
# Only the `operator` extra is installed (kopf, the kubernetes client) on top of stagerun's pure-Python spec and plan:
# no torch, which the operator never imports. It runs with a read-only root filesystem (the chart mounts /tmp).

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# 65532: the conventional "nonroot" uid/gid, the one the chart's securityContext runs as. HOME is /tmp, the one
# writable folder of the chart's pod.
RUN groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin nonroot
# A digest of the source below (docker/build.sh sets it): it keys this step's layer cache, since buildah (unlike
# BuildKit) does not look into what a bind mount holds.
ARG STAGERUN_SOURCE=
# The source is bind-mounted from the build context (read-only, so it is copied to build), and no layer keeps it.
# build-ca: a CA bundle the build machine's proxy needs (docker/build.sh --build-ca), mounted for this step only.
# pip compiles the bytecode here: a read-only root filesystem cannot take it at run time.
RUN --mount=type=bind,target=/context --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export PIP_CERT=/run/secrets/build-ca; fi \
    && mkdir /tmp/src \
    && cp -r /context/pyproject.toml /context/README.md /context/core /context/trainer /context/operator /tmp/src/ \
    && pip install "/tmp/src[operator]" \
    && rm -rf /tmp/src
USER 65532:65532
WORKDIR /tmp
# 8080: kopf's health endpoint (--liveness); 8081: the operator's Prometheus metrics (--metrics-port).
EXPOSE 8080 8081
ENTRYPOINT ["stagerun"]
CMD ["operator"]
