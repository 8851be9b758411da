"""pytest fixtures for the real control plane (registered from tests/conftest.py via `pytest_plugins`).

`control_plane` (session): one control plane for the whole run, started on first use; tests that use it carry the
`cluster` marker, and skip, naming the build command, when tests/cluster/build.sh has not been run.
`namespace` (function): a fresh namespace with its default ServiceAccount, deleted afterwards.
`trainingrun_crd` (session): the TrainingRun CRD from crds/ applied server-side and Established.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import binaries
from .control_plane import ControlPlane

CRD = Path(__file__).resolve().parents[2] / "crds" / "trainingrun.yaml"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    if binaries.missing():
        pytest.skip(binaries.skip_reason())
    plane = ControlPlane(tmp_path_factory.mktemp("cluster"))
    plane.start()
    yield plane
    plane.stop()  # raises (an error in teardown) if a process it started outlives it


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def trainingrun_crd(control_plane: ControlPlane) -> str:
    """kubectl's output of the apply (a test of the CRD itself reads it)."""
    out = control_plane.kubectl("apply", "--server-side", "-f", str(CRD)).stdout
    control_plane.kubectl("wait", "--for=condition=Established", "crd/trainingruns.stagerun.io", "--timeout=60s")
    return out


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a test using the control plane is a `cluster` test
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
