"""Where tests/cluster/build.sh puts the control-plane binaries, and whether they are all there.

The folder is keyed by a hash of go.mod and go.sum, computed exactly as build.sh computes it
(`cat go.mod go.sum | sha256sum | cut -c1-16`), so a change of pinned versions points at a fresh folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_COMMAND = "tests/cluster/build.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")
STAGES = ("node-initialize.yaml", "node-heartbeat.yaml", "pod-ready.yaml", "pod-delete.yaml")


def cache_root() -> Path:
    key = hashlib.sha256((HERE / "go.mod").read_bytes() + (HERE / "go.sum").read_bytes()).hexdigest()[:16]
    base = os.environ.get("STAGERUN_CLUSTER_CACHE") or Path.home() / ".cache" / "stagerun-cluster"
    return Path(base) / key


def bin_dir() -> Path:
    return cache_root() / "bin"


def stages_dir() -> Path:
    return cache_root() / "stages"


def missing() -> list[str]:
    """What build.sh has not produced yet (empty when the control plane can start)."""
    absent = [name for name in BINARIES if not os.access(bin_dir() / name, os.X_OK)]
    return absent + [f"stages/{name}" for name in STAGES if not (stages_dir() / name).is_file()]


def skip_reason() -> str:
    return (
        f"the test control plane is not built (missing in {cache_root()}: {', '.join(missing())}); "
        f"run `{BUILD_COMMAND}` from the repository root (~7 minutes cold on 2 cores, seconds when cached)"
    )
