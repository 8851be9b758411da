"""The real stagerun operator in a test: its kopf handlers loaded into a fresh registry with fast settings and run
in-process (kopf.testing.KopfRunner, the code `stagerun operator` runs) against the test control plane.

It stands in for the operator Deployment the Helm chart installs: same handlers, same API client, but admin
credentials from the control plane's kubeconfig and one namespace per test (`-n`), so a test's operator never sees
another test's runs. `operator_harness` gives a test that operator, fresh kwok nodes of its own, the pods' driver
(kwok_pods.KwokPods) and helpers to read what the operator made (Harness).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import json
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kopf
import pytest
import yaml
from kopf.testing import KopfRunner

from .control_plane import ApiError, ControlPlane
from .kwok_pods import LABEL_RUN, MERGE, KwokPods, wait_for
from .processes import Process, stop_all

ROOT = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/stagerun.io/v1alpha1"
WAIT_S = 60.0  # the real Job controller, garbage collector and scheduler on a loaded 2-core machine
# The operator's timings in seconds, shortened so a scenario takes seconds (production: 10 s reconcile, 10-300 s
# backoff, 30 s failure grace, 600 s suspend grace, 60 s before a stuck pod is force-deleted).
FAST_SETTINGS = {
    "STAGERUN_RECONCILE_SECONDS": "0.2",
    "STAGERUN_BACKOFF_BASE_SECONDS": "0.5",
    "STAGERUN_BACKOFF_MAX_SECONDS": "2",
    "STAGERUN_FAILURE_GRACE_SECONDS": "1",
    "STAGERUN_SUSPEND_GRACE_SECONDS": "5",
    "STAGERUN_FORCE_DELETE_AFTER_SECONDS": "1",
    "STAGERUN_IMAGE_PULL_DEADLINE_SECONDS": "3",
    "STAGERUN_NODE_CHECK_SECONDS": "1",
}


def fresh_operator(
    monkeypatch: pytest.MonkeyPatch, kubeconfig: Path, settings: dict[str, str] | None = None
) -> tuple[kopf.OperatorRegistry, ModuleType]:
    """(registry, handlers module): the operator's handlers re-registered into a new registry (so no other test's
    handlers run beside them) after ``settings`` (``STAGERUN_*`` variables, FAST_SETTINGS by default) and
    ``KUBECONFIG`` are in place, with the operator's cached API client dropped (each session's apiserver has its
    own port and token)."""
    for key, value in (FAST_SETTINGS if settings is None else settings).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # The kubernetes client reads $KUBECONFIG once, at import, for kopf's login and the operator's client alike.
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the in-cluster config of a CI pod
    monkeypatch.setattr("stagerun.operator.kube._api", None)
    registry, previous = kopf.OperatorRegistry(), kopf.get_default_registry()
    kopf.set_default_registry(registry)
    try:
        from stagerun.operator import handlers

        importlib.reload(handlers)  # the decorators register into `registry`; module constants re-read the env
    finally:
        kopf.set_default_registry(previous)
    return registry, handlers


@contextlib.contextmanager
def running_operator(registry: kopf.OperatorRegistry, namespace: str) -> Iterator[KopfRunner]:
    """The operator watching only ``namespace`` until the block ends; fails the test if it crashed."""
    # --standalone: no peering (leader election) objects, one operator per namespace; an exception of the block wins.
    with KopfRunner(["run", "--standalone", "-n", namespace], registry=registry, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-5000:]


@functools.cache
def quickstart(plane: ControlPlane) -> dict:
    """examples/quickstart.yaml as kubectl reads it (YAML 1.2 numbers: PyYAML would leave 3e-3 a string)."""
    out = plane.kubectl("create", "--dry-run=client", "-o", "json", "-f", str(ROOT / "examples" / "quickstart.yaml"))
    doc = json.loads(out.stdout)
    doc["metadata"] = {"name": doc["metadata"]["name"]}
    return doc


class Harness:
    """One test's view of its namespace: the runs, the operator's children and Events, the pods (driven through
    ``pods``), the test's own nodes (``node_selector``) and the rank-0 progress the operator polls (``progress``,
    pod IP -> /progress answer: kwok pods run nothing, so the test says what rank 0 would answer)."""

    def __init__(
        self,
        plane: ControlPlane,
        namespace: str,
        monkeypatch: pytest.MonkeyPatch,
        nodes: int,
        gpus: int,
        settings: dict[str, str] | None = None,
    ):
        self.plane, self.namespace, self.monkeypatch = plane, namespace, monkeypatch
        self.registry, self.handlers = fresh_operator(monkeypatch, plane.kubeconfig, settings)
        self.progress: dict[str, dict] = {}
        monkeypatch.setattr(self.handlers, "fetch_progress", lambda ip, port: self.progress.get(ip))
        self.pods = KwokPods(plane, namespace)
        self.node_selector, self.nodes = self.pods.add_pool(nodes, gpus=gpus)
        self.runner: KopfRunner | None = None  # the operator of operator_harness(start=True)

    # -- the operator ----------------------------------------------------------------------------------------------
    def operator(self) -> contextlib.AbstractContextManager[KopfRunner]:
        return running_operator(self.registry, self.namespace)

    # -- TrainingRuns ----------------------------------------------------------------------------------------------
    def manifest(self, **spec_changes: Any) -> dict:
        """The quickstart with an image and checkpoint path (as a cluster needs), on this test's nodes."""
        doc = copy.deepcopy(quickstart(self.plane))
        doc["spec"].update(image="ghcr.io/example/stagerun:0.1", checkpoint={"path": "s3://bucket/runs/quickstart"})
        doc["spec"]["scheduling"] = {"nodeSelector": dict(self.node_selector)}
        doc["spec"].update(copy.deepcopy(spec_changes))
        return doc

    def create(self, doc: dict) -> dict:
        return self.plane.request("POST", f"{GROUP_PATH}/namespaces/{self.namespace}/trainingruns", doc)

    def run(self, name: str = "quickstart") -> dict | None:
        return self.get("trainingruns", name)

    def status(self, name: str = "quickstart") -> dict:
        return (self.run(name) or {}).get("status") or {}

    def condition(self, kind: str, name: str = "quickstart") -> dict:
        return next((c for c in self.status(name).get("conditions") or () if c["type"] == kind), {})

    def patch_spec(self, spec: dict, name: str = "quickstart") -> None:
        path = f"{GROUP_PATH}/namespaces/{self.namespace}/trainingruns/{name}"
        self.plane.request("PATCH", path, {"spec": spec}, content_type=MERGE)

    def delete_run(self, name: str = "quickstart") -> None:
        self.plane.request("DELETE", f"{GROUP_PATH}/namespaces/{self.namespace}/trainingruns/{name}")

    # -- what the operator made ----------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> dict | None:
        try:
            return self.plane.request("GET", f"{_collection(kind, self.namespace)}/{name}")
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def list(self, kind: str, run: str = "quickstart") -> list[dict]:
        return self.plane.request("GET", f"{_collection(kind, self.namespace)}?labelSelector={LABEL_RUN}={run}")[
            "items"
        ]

    def jobs(self, run: str = "quickstart") -> list[str]:
        return sorted(j["metadata"]["name"] for j in self.list("jobs", run))

    def events(self) -> list[dict]:
        """The operator's Events on TrainingRuns, oldest first (kopf stamps eventTime in microseconds)."""
        items = self.plane.request("GET", f"/api/v1/namespaces/{self.namespace}/events")["items"]
        mine = [e for e in items if e["involvedObject"].get("kind") == "TrainingRun"]
        return sorted(mine, key=lambda e: e.get("eventTime") or e["metadata"]["creationTimestamp"])

    def reasons(self) -> list[str]:
        return [e["reason"] for e in self.events()]

    def rank_zero_reports(self, pod: dict, **progress: Any) -> None:
        """What rank 0's /progress answers from now on (the operator polls the pod's IP)."""
        self.progress[pod["status"]["podIP"]] = progress

    # -- waiting ---------------------------------------------------------------------------------------------------
    def wait(self, predicate: Callable[[], Any], message: str, timeout: float = WAIT_S) -> Any:
        """The predicate's first truthy answer; TimeoutError (with the run's status and the pods) after timeout."""
        return wait_for(
            predicate, timeout, lambda: f"{message}; status: {self.status()}; pods: {self.pods.describe_pods()}"
        )

    def wait_state(self, state: str, timeout: float = WAIT_S, name: str = "quickstart") -> None:
        self.wait(lambda: self.status(name).get("state") == state, f"run never reached {state}", timeout)

    def holds_within(self, predicate: Callable[[], Any], timeout: float) -> bool:
        """Whether the predicate becomes true within ``timeout`` (for the final check of a test: `assert` it)."""
        try:
            wait_for(predicate, timeout, "")
        except TimeoutError:
            return False
        return True

    # -- cleanup ---------------------------------------------------------------------------------------------------
    def release(self) -> None:
        """After the operator stopped: drop kopf's finalizer from the runs (nothing would remove it and the
        namespace could never be deleted) and delete the test's nodes."""
        for run in self.plane.request("GET", f"{GROUP_PATH}/namespaces/{self.namespace}/trainingruns")["items"]:
            path = f"{GROUP_PATH}/namespaces/{self.namespace}/trainingruns/{run['metadata']['name']}"
            with contextlib.suppress(ApiError):
                self.plane.request("PATCH", path, {"metadata": {"finalizers": None}}, content_type=MERGE)
        self.pods.delete_nodes(self.nodes)


def _collection(kind: str, namespace: str) -> str:
    group = {"jobs": "/apis/batch/v1", "trainingruns": GROUP_PATH}.get(kind, "/api/v1")
    return f"{group}/namespaces/{namespace}/{kind}"


@contextlib.contextmanager
def operator_harness(
    plane: ControlPlane,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    *,
    nodes: int = 2,
    gpus: int = 1,
    start: bool = True,
    settings: dict[str, str] | None = None,
) -> Iterator[Harness]:
    """A Harness with ``nodes`` fresh kwok nodes of ``gpus`` GPUs each and, unless ``start`` is False, the operator
    running for the whole block (a test that restarts it calls ``harness.operator()`` itself)."""
    harness = Harness(plane, namespace, monkeypatch, nodes, gpus, settings)
    try:
        if start:
            with harness.operator() as runner:
                harness.runner = runner
                yield harness
        else:
            yield harness
    finally:
        harness.release()


# -- `stagerun operator` as processes of its own, peered (tests/test_operator_ha.py) ---------------------------------

PEERING_CRDS = ROOT / "charts" / "stagerun" / "crds" / "kopf-peering.yaml"


def install_peering_crds(plane: ControlPlane) -> None:
    """The chart's kopf peering CRDs (ClusterKopfPeering, KopfPeering), applied server-side and Established."""
    plane.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
    for crd in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


def peering_records(plane: ControlPlane, namespace: str, name: str) -> dict[str, dict]:
    """The keep-alive records of the KopfPeering ``name``: identity -> {priority, lifetime, lastseen}."""
    return plane.request("GET", f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{name}").get("status") or {}


@contextlib.contextmanager
def service_account_kubeconfigs(plane: ControlPlane, namespace: str, names: list[str], folder: Path) -> Iterator[dict]:
    """{name: kubeconfig} for ServiceAccounts ``names`` of ``namespace``, bound to cluster-admin for the block: each
    operator process gets an identity of its own, so the apiserver's audit log tells which one made each request."""
    rbac = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"
    admin = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"}
    bindings = []
    try:
        paths = {}
        for name in names:
            plane.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}})
            binding = f"{namespace}-{name}"
            plane.request(
                "POST",
                rbac,
                {
                    "metadata": {"name": binding},
                    "roleRef": admin,
                    "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
                },
            )
            bindings.append(binding)
            request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
            issued = plane.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", request)
            token = issued["status"]["token"]
            config = yaml.safe_load(plane.kubeconfig.read_text())
            config["users"] = [{"name": name, "user": {"token": token}}]
            config["contexts"][0]["context"]["user"] = name
            paths[name] = folder / f"{name}.kubeconfig"
            paths[name].write_text(yaml.safe_dump(config))
        yield paths
    finally:
        for binding in bindings:
            with contextlib.suppress(ApiError):
                plane.request("DELETE", f"{rbac}/{binding}")


class OperatorProcess:
    """`stagerun operator ARGS` in a process of its own, as an operator pod runs it, with ``identity`` as kopf's
    peering identity (POD_ID, the chart's pod name) and FAST_SETTINGS plus ``settings`` as its environment.
    ``kill()`` is kill -9 (no goodbye: its keep-alive record stays until it expires), ``stop()`` SIGTERM (kopf's
    graceful exit, which removes the record)."""

    def __init__(self, identity: str, args: list[str], kubeconfig: Path, log_dir: Path, settings: dict[str, str]):
        env = {**FAST_SETTINGS, **settings, "KUBECONFIG": str(kubeconfig), "POD_ID": identity, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "stagerun.trainer.cli", "operator", *args]
        self.identity = identity
        self.process = Process(f"operator-{identity}", command, log_dir, env)

    def log(self) -> str:
        return self.process.log.read_text(errors="replace")

    def logged(self, text: str) -> bool:
        self.process.check_running()  # an operator that died says why, not a timeout later
        return text in self.log()

    def kill(self) -> None:
        self.process.popen.send_signal(signal.SIGKILL)
        self.process.popen.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM, and its exit status (SIGKILL after 30 s)."""
        stop_all([self.process], grace_s=30)
        return self.process.popen.returncode
