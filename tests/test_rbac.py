"""The chart's RBAC grants exactly what the operator uses: every API call it makes is allowed, every rule is used.

The calls are recorded, not listed by hand: the real kopf operator runs against the emulated API (tests/kube) through
a scenario that takes every code path that talks to the API (launch, an accepted edit of a later phase, a failed pod
and the restart, a phase relaunch with a new topology, suspend, resume, deletion), once watching all namespaces
(``-A``, the chart's default) and once watching one namespace (``-n default``, the chart's ``watchNamespaces``). Each
HTTP request becomes an RBAC attribute (verb, API group, resource[/subresource], namespace), which the rendered
Roles/ClusterRoles and their bindings must allow; conversely each granted (verb, group, resource) must have been
used by some request.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
from typing import NamedTuple

import pytest
import yaml
from conftest import ROOT
from helm_tool import helm_binary, why_no_helm
from kopf.testing import KopfRunner
from kube.emulator import KubeEmulator, running_api
from kube.kubelet import FakeCluster
from kube.operator import fresh_operator

CHART = ROOT / "charts" / "stagerun"
NS = "default"
RELEASE, RELEASE_NS = "stagerun", "stagerun"
SERVICE_ACCOUNT = ("stagerun", RELEASE_NS)  # the chart's default ServiceAccount for release "stagerun"
FAST = {
    "STAGERUN_RECONCILE_SECONDS": "0.2",
    "STAGERUN_BACKOFF_BASE_SECONDS": "0.3",
    "STAGERUN_BACKOFF_MAX_SECONDS": "1",
    "STAGERUN_FAILURE_GRACE_SECONDS": "1",
    "STAGERUN_SUSPEND_GRACE_SECONDS": "1",
    "STAGERUN_FORCE_DELETE_AFTER_SECONDS": "1",
}

# Rules granted although the scenarios cannot show them used. Each entry: (verb, group, resource) and why.
# (Empty: every rule the chart grants is exercised by the scenarios below.)
ALLOWED_UNUSED: dict[tuple[str, str, str], str] = {}


class Call(NamedTuple):
    verb: str
    group: str
    resource: str  # plural, or plural/subresource
    namespace: str | None  # None: cluster-scoped, or a namespaced resource across all namespaces


# -- from HTTP requests to RBAC attributes -----------------------------------------------------------------------------


def rbac_call(method: str, path: str, query: dict) -> Call | None:
    """The RBAC attributes the API server would check for this request; None for non-resource (discovery) URLs,
    which every authenticated user may read (the system:discovery ClusterRole)."""
    parts = [p for p in path.strip("/").split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /api, /api/v1, /apis, /apis/<group>[/<version>], /version, /healthz...
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), "/".join(rest[2:])
    if resource == "namespaces" and name is not None:
        namespace = name  # a namespace object is authorised within itself
    method = method.upper()
    if method == "GET":
        watching = str(query.get("watch", "")).lower() in ("true", "1")
        verb = "watch" if watching else "get" if name is not None else "list"
    else:
        verb = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name is not None else "deletecollection",
        }[method]
    return Call(verb, group, f"{resource}/{sub}" if sub else resource, namespace)


@contextlib.contextmanager
def tapped_requests():
    """Every HTTP request the emulator answers: (method, path, query). ``api.requests`` (kmock's log) misses the
    paths the emulator serves itself (``/api/v1/namespaces``, pod logs), hence this tap on the server's entry."""
    seen: list[tuple[str, str, dict]] = []
    original = KubeEmulator.__call__

    async def tap(self, raw_request):
        seen.append((raw_request.method, raw_request.path, dict(raw_request.query)))
        return await original(self, raw_request)

    KubeEmulator.__call__ = tap
    try:
        yield seen
    finally:
        KubeEmulator.__call__ = original


# -- the scenario ------------------------------------------------------------------------------------------------------


def quickstart() -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["namespace"] = NS
    doc["spec"].update(image="ghcr.io/example/stagerun:0.1", checkpoint={"path": "s3://bucket/runs/quickstart"})
    doc["spec"]["phases"][1]["parallelism"] = {"tensorParallel": 2}  # phase 1 needs a new gang: a relaunch
    doc["spec"]["phases"][1]["microBatchSize"] = 16
    return doc


def relaunch_message(phase_index: int, step: int) -> str:
    return json.dumps(
        {
            "state": "relaunch",
            "phaseIndex": phase_index,
            "step": step,
            "tokens": step * 8192,
            "checkpoint": f"s3://bucket/runs/quickstart/step-{step:08d}",
        }
    )


def run_scenario(api, cluster) -> None:
    """Every operator path that calls the API. The test acts through the store (no HTTP), so that every recorded
    request is the operator's own."""

    def status() -> dict:
        return (api.get("trainingruns", NS, "quickstart") or {}).get("status") or {}

    def jobs() -> list[str]:
        return sorted(
            j["metadata"]["name"] for j in api.list("jobs", NS, label_selector={"stagerun.io/run": "quickstart"})
        )

    doc = quickstart()
    api.create(copy.deepcopy(doc))  # kopf: finalizer; operator: ConfigMap, Service, Job; status; Events
    cluster.wait_for_pods(1, job="quickstart-a1")
    api.wait_for(lambda: status().get("attempt") == 1 and status().get("state") == "Running", message=status)
    # An accepted edit of a later phase is copied into the running gang's ConfigMap (patch configmaps).
    phases = copy.deepcopy(doc["spec"]["phases"])
    phases[2]["tokens"] = "128K"
    api.patch("trainingruns", NS, "quickstart", {"spec": {"phases": phases}})
    api.wait_for(
        lambda: (
            yaml.safe_load(api.get("configmaps", NS, "quickstart-a1")["data"]["trainingrun.yaml"])["spec"]["phases"][2][
                "tokens"
            ]
            == 128_000
        ),
        message="the edit never reached the ConfigMap",
    )
    # A failed pod: the gang is torn down (delete pods, job, service, configmap) and relaunched.
    cluster.fail(cluster.wait_for_pods(1, job="quickstart-a1")[0], exit_code=1)
    api.wait_for(lambda: jobs() == ["quickstart-a2"], timeout=20, message=status)
    # The phase ends and the next one needs another topology: a new gang.
    cluster.wait_for_pods(1, job="quickstart-a2")
    cluster.succeed_job("quickstart-a2", message=relaunch_message(1, 42))
    api.wait_for(lambda: jobs() == ["quickstart-a3"], timeout=20, message=status)
    cluster.wait_for_pods(1, job="quickstart-a3")
    # Suspend frees the pods; resume launches again.
    api.patch("trainingruns", NS, "quickstart", {"spec": {"suspend": True}})
    api.wait_for(lambda: status().get("state") == "Suspended", timeout=20, message=status)
    api.patch("trainingruns", NS, "quickstart", {"spec": {"suspend": False}})
    api.wait_for(lambda: jobs() == ["quickstart-a4"], timeout=20, message=status)
    cluster.wait_for_pods(1, job="quickstart-a4")
    # Deletion: the operator removes the children (list + delete), kopf removes its finalizer.
    api.delete("trainingruns", NS, "quickstart")
    api.wait_for(
        lambda: api.get("trainingruns", NS, "quickstart") is None,
        timeout=30,
        message="the TrainingRun was not deleted (finalizer stuck?)",
    )


def record(scope_args: list[str]) -> set[Call]:
    """Run the operator with ``scope_args`` (``-A`` or ``-n default``) through the scenario; its RBAC calls."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        registry, handlers = fresh_operator(monkeypatch, FAST)

        monkeypatch.setattr(handlers, "fetch_progress", lambda ip, port: None)
        with (
            tapped_requests() as seen,
            running_api() as api,
            api.use_kubeconfig(),
            FakeCluster(api, nodes=("node-1", "node-2"), pod_ip_prefix="127.10") as cluster,
            KopfRunner(["run", "--standalone", *scope_args], registry=registry) as runner,
        ):
            run_scenario(api, cluster)
            logged = [(r.method.value, r.url.path, dict(r.params)) for r in api.requests]
        assert runner.exception is None, runner.output[-5000:]
    calls = {rbac_call(*request) for request in seen + logged}
    calls.discard(None)
    return calls


@pytest.fixture(scope="module")
def clusterwide_calls() -> set[Call]:
    return record(["-A"])


@pytest.fixture(scope="module")
def namespaced_calls() -> set[Call]:
    return record(["-n", NS])


# -- the chart's grants ------------------------------------------------------------------------------------------------


class Grant(NamedTuple):
    verb: str
    group: str
    resource: str
    namespace: str | None  # None: cluster-wide (ClusterRoleBinding)


@pytest.fixture(scope="module")
def helm():
    path = helm_binary()
    if path is None:
        pytest.skip(why_no_helm())
    return path


def render(helm, *set_args: str) -> list[dict]:
    result = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "-n", RELEASE_NS, *set_args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def grants(objects: list[dict]) -> set[Grant]:
    """What the chart's ServiceAccount may do: rules of the roles bound to it, with the scope of each binding."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("rules") or []
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    found: set[Grant] = set()
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if not any(
            s["kind"] == "ServiceAccount" and (s["name"], s.get("namespace")) == SERVICE_ACCOUNT
            for s in binding["subjects"]
        ):
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        rules = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        for rule in rules:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"wildcard rule {rule}"
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
            found |= {
                Grant(verb, group, resource, scope)
                for verb in rule["verbs"]
                for group in rule["apiGroups"]
                for resource in rule["resources"]
            }
    return found


def allowed(call: Call, granted: set[Grant]) -> bool:
    if Grant(call.verb, call.group, call.resource, None) in granted:
        return True  # cluster-wide grants cover every namespace
    return call.namespace is not None and Grant(call.verb, call.group, call.resource, call.namespace) in granted


def check(calls: set[Call], granted: set[Grant]) -> None:
    missing = sorted(c for c in calls if not allowed(c, granted))
    assert not missing, f"the operator made calls the chart does not allow: {missing}"
    used = {(c.verb, c.group, c.resource) for c in calls}
    excess = sorted({(g.verb, g.group, g.resource) for g in granted} - used - set(ALLOWED_UNUSED))
    assert not excess, f"the chart grants what the operator never used: {excess}"


# -- the tests ---------------------------------------------------------------------------------------------------------


def test_recording_sees_every_call_path(clusterwide_calls):
    """The scenario really took the paths it is meant to (a weaker recording would make the RBAC check vacuous)."""
    verbs = {(c.verb, c.group, c.resource) for c in clusterwide_calls}
    expected = {
        ("create", "", "configmaps"),
        ("patch", "", "configmaps"),
        ("delete", "", "configmaps"),
        ("create", "batch", "jobs"),
        ("get", "batch", "jobs"),
        ("delete", "batch", "jobs"),
        ("list", "", "pods"),
        ("delete", "", "pods"),
        ("list", "", "nodes"),
        ("create", "", "events"),
        ("get", "stagerun.io", "trainingruns"),
        ("patch", "stagerun.io", "trainingruns"),
        ("patch", "stagerun.io", "trainingruns/status"),
        ("watch", "stagerun.io", "trainingruns"),
    }
    assert expected <= verbs, sorted(expected - verbs)


def test_clusterwide_rbac_is_exactly_what_the_operator_uses(helm, clusterwide_calls):
    objects = render(helm)
    assert {o["kind"] for o in objects} >= {"ClusterRole", "ClusterRoleBinding"}
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding")]
    check(clusterwide_calls, grants(objects))


def test_namespaced_rbac_is_exactly_what_the_operator_uses(helm, namespaced_calls):
    objects = render(helm, "--set", f"watchNamespaces={{{NS}}}")
    granted = grants(objects)
    check(namespaced_calls, granted)
    # Nothing namespaced is granted cluster-wide: the operator cannot touch namespaces it does not watch.
    cluster_scoped = {"nodes", "namespaces", "customresourcedefinitions"}
    wide = {g for g in granted if g.namespace is None}
    assert {g.resource for g in wide} <= cluster_scoped, wide
    # And it only ever asked for its own namespace (or cluster-scoped objects).
    strays = [c for c in namespaced_calls if c.resource.split("/")[0] not in cluster_scoped and c.namespace != NS]
    assert not strays, strays


def test_without_read_nodes_only_the_nodes_rule_goes(helm, clusterwide_calls):
    with_nodes = grants(render(helm))
    without = grants(render(helm, "--set", "rbac.readNodes=false"))
    assert with_nodes - without == {Grant("list", "", "nodes", None)}
    calls = {c for c in clusterwide_calls if c.resource != "nodes"}
    assert all(allowed(c, without) for c in calls)


def test_rbac_call_mapping():
    assert rbac_call("GET", "/api", {}) is None
    assert rbac_call("GET", "/apis/batch/v1", {}) is None
    assert rbac_call("GET", "/api/v1/nodes", {}) == Call("list", "", "nodes", None)
    assert rbac_call("GET", "/api/v1/namespaces", {"watch": "true"}) == Call("watch", "", "namespaces", None)
    assert rbac_call("GET", "/api/v1/namespaces/default", {}) == Call("get", "", "namespaces", "default")
    assert rbac_call("GET", "/api/v1/namespaces/x/pods", {"labelSelector": "a=b"}) == Call("list", "", "pods", "x")
    assert rbac_call("DELETE", "/api/v1/namespaces/x/pods/p", {}) == Call("delete", "", "pods", "x")
    assert rbac_call("DELETE", "/api/v1/namespaces/x/pods", {}) == Call("deletecollection", "", "pods", "x")
    assert rbac_call("PATCH", "/apis/stagerun.io/v1alpha1/namespaces/x/trainingruns/r/status", {}) == Call(
        "patch", "stagerun.io", "trainingruns/status", "x"
    )
    assert rbac_call("GET", "/apis/stagerun.io/v1alpha1/trainingruns", {"watch": "1"}) == Call(
        "watch", "stagerun.io", "trainingruns", None
    )
    assert rbac_call("POST", "/api/v1/namespaces/x/events", {}) == Call("create", "", "events", "x")
    assert rbac_call("GET", "/api/v1/namespaces/x/pods/p/log", {}) == Call("get", "", "pods/log", "x")
