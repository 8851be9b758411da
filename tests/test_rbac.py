"""The chart's RBAC is exactly what the operator needs, as a real kube-apiserver's authoriser decides it.

Each case is a Helm release of its own, installed for real (`helm install`) into the test control plane
(tests/cluster): the chart's CRDs, ServiceAccount, Roles/ClusterRoles and bindings, and its kopf peering object(s).
The operator then runs in-process (the real kopf operator, with the peering and scope flags of the installed
Deployment's command line, so peered through the chart's ClusterKopfPeering or KopfPeering) on a token the apiserver
issued to the release's ServiceAccount (TokenRequest), so RBAC checks every call it makes. The test drives a scenario
as admin through every code path of the operator that calls the API: launch, an accepted edit of a later phase (the
ConfigMap patch), a failed pod and the restart, a phase relaunch with a new topology, suspend, resume, deletion, and
the node-readiness read of every reconcile, and the peering keep-alives. Pods run on a kwok node; the test ends them
by writing their status.

The evidence is the apiserver's audit log (tests/cluster/audit.py): every request of the ServiceAccount with RBAC's
decision and the response code. Both ways: no request was refused (no `forbid`, no 403: the owner-reference
admission check asks the authoriser too), and every (verb, group, resource) the installed roles grant was used.
The chart's Deployment itself never runs: its pod is kept Pending by a node selector no node matches.
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from cluster.audit import AuditEvent, parse_lines, service_account_user
from cluster.control_plane import ApiError, ControlPlane
from cluster.kwok_pods import MERGE, KwokPods
from cluster.operator import fresh_operator, quickstart
from conftest import ROOT
from helm_tool import helm_binary, why_no_helm
from kopf.testing import KopfRunner

CHART = ROOT / "charts" / "stagerun"
RUN = "quickstart"
FAST = {
    "STAGERUN_RECONCILE_SECONDS": "0.5",
    "STAGERUN_BACKOFF_BASE_SECONDS": "0.3",
    "STAGERUN_BACKOFF_MAX_SECONDS": "1",
    "STAGERUN_FAILURE_GRACE_SECONDS": "1",
    "STAGERUN_SUSPEND_GRACE_SECONDS": "1",
    "STAGERUN_FORCE_DELETE_AFTER_SECONDS": "1",
}
WAIT_S = 60.0  # a cluster reaction (Job controller, kwok, the operator's next reconcile) on a loaded 2-core machine
# The chart's own operator pod must never run: a process kubelet of another test could pick it up.
NEVER_SCHEDULED = {"stagerun.io/rbac-test": "no-node-has-this"}
CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions", "clusterkopfpeerings"}

# Rules granted although no API request uses them, each with the evidence that they are needed instead.
# trainingruns/finalizers update: no request asks for it; the OwnerReferencesPermissionEnforcement admission plugin
# asks the authoriser for it on every child created with blockOwnerDeletion (issue 13 item 9). `check_rbac` requires
# that children carrying blockOwnerDeletion were created (and no 403), which is that check passing.
ADMISSION_CHECKED: dict[tuple[str, str, str], str] = {
    ("update", "stagerun.io", "trainingruns/finalizers"): "OwnerReferencesPermissionEnforcement (blockOwnerDeletion)",
}
# Rules granted although the scenarios cannot show them used, with why. (Empty: every rule is exercised.)
ALLOWED_UNUSED: dict[tuple[str, str, str], str] = {}


# -- the operator's command line ----------------------------------------------------------------------------------


def kopf_args(command: list[str]) -> list[str]:
    """kopf's arguments for the chart's Deployment command: the same peering and namespace scope (the liveness and
    metrics endpoints are left out: they would listen beyond loopback and call no API; the priority is kopf's
    default, as the only peer's priority decides nothing)."""
    assert command[:2] == ["stagerun", "operator"] and "--standalone" not in command, command
    scope, peering, rest = [], [], iter(command[2:])
    for arg in rest:
        if arg == "-A":
            scope.append(arg)
        elif arg == "-n":
            scope += [arg, next(rest)]
        elif arg.startswith("--peering="):
            peering = ["--peering", arg.split("=", 1)[1]]
    assert scope, f"no namespace scope in {command}"
    assert peering, f"no --peering in {command}"
    return ["run", *peering, *scope]


# -- Helm and the installed RBAC -------------------------------------------------------------------------------------


class Grant(NamedTuple):
    verb: str
    group: str
    resource: str
    namespace: str | None  # None: cluster-wide (ClusterRoleBinding)

    @property
    def rule(self) -> tuple[str, str, str]:
        return (self.verb, self.group, self.resource)


@dataclass
class Release:
    """One `helm install` of the chart, its operator's identity, and the namespace its TrainingRuns go in."""

    name: str  # also its namespace, its objects' prefix and its ServiceAccount's name
    runs_namespace: str
    values: dict

    @property
    def user(self) -> str:
        return service_account_user(self.name, self.name)


def helm(control_plane: ControlPlane, *args: str) -> str:
    path = helm_binary()
    if path is None:
        pytest.skip(why_no_helm())
    result = subprocess.run(
        [str(path), *args, "--kubeconfig", str(control_plane.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def install(control_plane: ControlPlane, tmp: Path, release: Release) -> None:
    values = tmp / f"{release.name}-values.yaml"
    values.write_text(yaml.safe_dump({"nodeSelector": NEVER_SCHEDULED, **release.values}))
    helm(
        control_plane, "install", release.name, str(CHART), "-n", release.name, "--create-namespace", "-f", str(values)
    )
    # Helm installs crds/ only when absent (an earlier test may have applied it): either way it must serve.
    control_plane.wait_until(
        "the TrainingRun API",
        lambda: _serves(control_plane, "/apis/stagerun.io/v1alpha1/trainingruns?limit=1"),
        timeout_s=WAIT_S,
    )


def _serves(control_plane: ControlPlane, path: str) -> bool:
    try:
        control_plane.request("GET", path)
        return True
    except ApiError:
        return False


def installed_grants(control_plane: ControlPlane, release: Release) -> set[Grant]:
    """What the installed bindings give the release's ServiceAccount, read back from the apiserver."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    bindings = control_plane.request("GET", f"{rbac}/clusterrolebindings")["items"]
    bindings += control_plane.request("GET", f"{rbac}/rolebindings")["items"]
    found: set[Grant] = set()
    for binding in bindings:
        subjects = binding.get("subjects") or []
        if not any(
            s["kind"] == "ServiceAccount" and (s["name"], s.get("namespace")) == (release.name,) * 2 for s in subjects
        ):
            continue
        scope = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        ref = binding["roleRef"]
        if ref["kind"] == "Role":
            role = control_plane.request("GET", f"{rbac}/namespaces/{scope}/roles/{ref['name']}")
        else:
            role = control_plane.request("GET", f"{rbac}/clusterroles/{ref['name']}")
        for rule in role.get("rules") or []:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"wildcard rule {rule}"
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
            found |= {
                Grant(verb, group, resource, scope)
                for verb in rule["verbs"]
                for group in rule["apiGroups"]
                for resource in rule["resources"]
            }
    assert found, f"no binding of the chart names ServiceAccount {release.name}/{release.name}"
    return found


def service_account_kubeconfig(control_plane: ControlPlane, release: Release, path: Path) -> Path:
    """The admin kubeconfig's cluster with a token the apiserver issued to the release's ServiceAccount."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    issued = control_plane.request(
        "POST", f"/api/v1/namespaces/{release.name}/serviceaccounts/{release.name}/token", request
    )
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["users"] = [{"name": release.user, "user": {"token": issued["status"]["token"]}}]
    config["contexts"][0]["context"]["user"] = release.user
    path.write_text(yaml.safe_dump(config))
    return path


# -- the scenario, driven as admin -----------------------------------------------------------------------------------


def relaunch_message(phase_index: int, step: int) -> str:
    """What pod 0 of a gang writes as its termination message when the next phase needs another topology."""
    checkpoint = f"s3://bucket/runs/quickstart/step-{step:08d}"
    return json.dumps(
        {"state": "relaunch", "phaseIndex": phase_index, "step": step, "tokens": step * 8192, "checkpoint": checkpoint}
    )


class Driver:
    """The test's side: TrainingRun edits, pod endings (tests/cluster/kwok_pods.py writes them as a kubelet would),
    waits. All as admin, whose requests the audit policy leaves out: the audited requests of the ServiceAccount are
    the operator's own. The pods run on one kwok node of the driver's own."""

    def __init__(self, control_plane: ControlPlane, namespace: str, operator_user: str):
        self.cp, self.ns, self.operator_user = control_plane, namespace, operator_user
        self.runs = f"/apis/stagerun.io/v1alpha1/namespaces/{namespace}/trainingruns"
        self.pods = KwokPods(control_plane, namespace)
        self.node_selector, self.nodes = self.pods.add_pool(1, gpus=0)

    def close(self) -> None:
        self.pods.delete_nodes(self.nodes)

    def manifest(self) -> dict:
        doc = copy.deepcopy(quickstart(self.cp))
        doc["metadata"]["namespace"] = self.ns
        doc["spec"].update(image="ghcr.io/example/stagerun:0.1", checkpoint={"path": "s3://bucket/runs/quickstart"})
        doc["spec"]["scheduling"] = {"nodeSelector": dict(self.node_selector)}
        doc["spec"]["phases"][1]["parallelism"] = {"tensorParallel": 2}  # phase 1 needs a new gang: a relaunch
        doc["spec"]["phases"][1]["microBatchSize"] = 16
        return doc

    def create(self) -> None:
        self.cp.request("POST", self.runs, self.manifest())

    def run(self) -> dict | None:
        try:
            return self.cp.request("GET", f"{self.runs}/{RUN}")
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def status(self) -> dict:
        return (self.run() or {}).get("status") or {}

    def patch_spec(self, spec: dict) -> None:
        self.cp.request("PATCH", f"{self.runs}/{RUN}", {"spec": spec}, MERGE)

    def wait(self, what: str, ready: Callable[[], Any], timeout_s: float = WAIT_S) -> None:
        try:
            self.cp.wait_until(what, lambda: bool(ready()), timeout_s=timeout_s)
        except TimeoutError as exc:
            refused = [(e.verb, e.uri, e.code) for e in self.cp.audit_events(self.operator_user) if e.code == 403]
            raise TimeoutError(
                f"{what}; the operator's refused calls: {refused}; the run's status: {self.status()}; "
                f"pods: {self.pods.describe_pods()}\n{exc}"
            ) from None

    def running_pod(self, attempt: int) -> dict:
        """Pod 0 of the attempt, once kwok has it Running (with a loopback pod IP)."""
        pod = self.pods.wait_for_pods(1, job=f"{RUN}-a{attempt}", timeout=WAIT_S)[0]
        assert pod["status"]["podIP"].startswith("127."), pod["status"]
        return pod

    def next_attempt(self, after: int) -> int:
        """Waits for the operator to launch an attempt after `after` and for its pod to run; returns the attempt."""
        self.wait(
            f"an attempt after {after}, Running",
            lambda: self.status().get("attempt", 0) > after and self.status().get("state") == "Running",
        )
        attempt = self.status()["attempt"]
        self.running_pod(attempt)
        return attempt

    def configmap_phase_tokens(self, attempt: int, phase: int) -> Any:
        configmap = self.cp.request("GET", f"/api/v1/namespaces/{self.ns}/configmaps/{RUN}-a{attempt}")
        return yaml.safe_load(configmap["data"]["trainingrun.yaml"])["spec"]["phases"][phase]["tokens"]

    def blocks_owner_deletion(self, attempt: int) -> bool:
        """The attempt's ConfigMap points at its TrainingRun with blockOwnerDeletion (what admission checked)."""
        configmap = self.cp.request("GET", f"/api/v1/namespaces/{self.ns}/configmaps/{RUN}-a{attempt}")
        refs = configmap["metadata"].get("ownerReferences") or []
        return any(r["kind"] == "TrainingRun" and r.get("blockOwnerDeletion") for r in refs)

    def delete_run(self) -> None:
        self.cp.request("DELETE", f"{self.runs}/{RUN}")
        self.wait("the TrainingRun gone (the operator's finalizer removed)", lambda: self.run() is None)


def full_scenario(driver: Driver) -> dict[str, bool]:
    """Every operator path that calls the API; returns facts about the children, read as admin on the way."""
    driver.create()  # kopf: finalizer; operator: ConfigMap, Service, Job; status; Events
    attempt = driver.next_attempt(0)
    facts = {"children block owner deletion": driver.blocks_owner_deletion(attempt)}
    # An accepted edit of a later phase is copied into the running gang's ConfigMap (patch configmaps).
    phases = driver.manifest()["spec"]["phases"]
    phases[2]["tokens"] = "128K"
    driver.patch_spec({"phases": phases})
    driver.wait("the edit in the ConfigMap", lambda: driver.configmap_phase_tokens(attempt, 2) == 128_000)
    # A failed pod: the Job controller fails the Job; the operator tears the gang down and relaunches it.
    driver.pods.fail(driver.running_pod(attempt), exit_code=1)
    attempt = driver.next_attempt(attempt)
    # The phase ends and the next one needs another topology: a new gang for phase 1.
    driver.pods.succeed(driver.running_pod(attempt), message=relaunch_message(1, 42))
    driver.wait("the relaunch for phase 1", lambda: driver.status().get("phaseIndex") == 1)
    attempt = driver.next_attempt(attempt)
    # Suspend frees the pods; resume launches again.
    driver.patch_spec({"suspend": True})
    driver.wait("Suspended", lambda: driver.status().get("state") == "Suspended")
    driver.patch_spec({"suspend": False})
    driver.next_attempt(attempt)
    # Deletion: the operator removes the children (list + delete of each kind), kopf removes its finalizer.
    driver.delete_run()
    return facts


def short_scenario(driver: Driver) -> dict[str, bool]:
    """Launch, a failed pod and its restart, deletion: enough to show the operator works without a rule."""
    driver.create()
    attempt = driver.next_attempt(0)
    driver.pods.fail(driver.running_pod(attempt), exit_code=1)
    driver.next_attempt(attempt)
    driver.delete_run()
    return {}


# -- one case: install, run the operator as the ServiceAccount, collect the audit log --------------------------------


@dataclass
class Evidence:
    release: Release
    grants: set[Grant]
    events: list[AuditEvent]  # the ServiceAccount's requests, as audited
    facts: dict[str, bool]

    def used(self) -> set[tuple[str, str, str]]:
        """Rules the authoriser allowed a request by (a 404 or 409 after that still used the rule)."""
        return {e.rule for e in self.events if e.resource and e.decision == "allow"}

    def refused(self) -> list[AuditEvent]:
        """Requests RBAC forbade, anywhere, and 403s in this case's namespace or on cluster-scoped objects (the
        owner-reference admission check answers 403 after RBAC allowed the create). With -A the operator also
        finishes the deletion of other tests' leftover runs, and the Events it posts in their Terminating namespaces
        get a 403 from the NamespaceLifecycle admission plugin, which is not about RBAC."""
        ours = (self.release.runs_namespace, None)
        return [e for e in self.events if e.decision != "allow" or (e.code == 403 and e.namespace in ours)]


@pytest.fixture(scope="module")
def run_case(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory):
    """run_case(values, scenario) -> Evidence; every release and namespace it made is removed after the module."""
    made: list[Release] = []

    def run(values: Callable[[str], dict], scenario: Callable[[Driver], dict[str, bool]]) -> Evidence:
        key = uuid.uuid4().hex[:6]
        release = Release(name=f"stagerun-{key}", runs_namespace=f"runs-{key}", values={})
        release.values = values(release.runs_namespace)
        made.append(release)
        tmp = tmp_path_factory.mktemp(release.name)
        control_plane.create_namespace(release.runs_namespace)  # watchNamespaces must exist before the install
        install(control_plane, tmp, release)
        deployment = control_plane.request("GET", f"/apis/apps/v1/namespaces/{release.name}/deployments/{release.name}")
        command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
        kubeconfig = service_account_kubeconfig(control_plane, release, tmp / "kubeconfig")
        driver = Driver(control_plane, release.runs_namespace, release.user)
        try:
            facts = run_operator(kopf_args(command), kubeconfig, lambda: scenario(driver))
        finally:
            driver.close()
        return Evidence(
            release, installed_grants(control_plane, release), control_plane.audit_events(release.user), facts
        )

    yield run
    for release in made:
        helm(control_plane, "uninstall", release.name, "-n", release.name)  # no --wait: nothing to wait for
        for namespace in (release.name, release.runs_namespace):
            control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def run_operator(args: list[str], kubeconfig: Path, scenario: Callable[[], dict[str, bool]]) -> dict[str, bool]:
    """The real operator (kopf with the operator's handlers, loaded fresh) as the ServiceAccount of `kubeconfig`,
    through `scenario`."""
    from kubernetes import client

    default_config = client.Configuration.get_default_copy()  # login loads the kubeconfig into the global default
    with pytest.MonkeyPatch.context() as monkeypatch:
        registry, handlers = fresh_operator(monkeypatch, kubeconfig, FAST)
        # The kubernetes client reads $KUBECONFIG once, at its import, into KUBE_CONFIG_DEFAULT_LOCATION: an earlier
        # test's (admin) kubeconfig would stay in force and the operator would run as admin.
        monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        # Rank 0's /progress is plain HTTP to the pod IP, not an API call; kwok pods serve nothing there.
        monkeypatch.setattr(handlers, "fetch_progress", lambda ip, port: None)
        try:
            with KopfRunner(args, registry=registry, timeout=60) as runner:
                facts = scenario()
        finally:
            client.Configuration.set_default(default_config)
    assert runner.exception is None, runner.output[-5000:]
    return facts


@pytest.fixture(scope="module")
def clusterwide(run_case) -> Evidence:
    return run_case(lambda runs_namespace: {}, full_scenario)


@pytest.fixture(scope="module")
def namespaced(run_case) -> Evidence:
    return run_case(lambda runs_namespace: {"watchNamespaces": [runs_namespace]}, full_scenario)


@pytest.fixture(scope="module")
def without_nodes(run_case) -> Evidence:
    return run_case(lambda runs_namespace: {"rbac": {"readNodes": False}}, short_scenario)


# -- the checks ------------------------------------------------------------------------------------------------------


def check_rbac(evidence: Evidence) -> None:
    """Both ways: the authoriser refused nothing, and every granted rule was used (or checked by admission)."""
    refused = [(e.verb, e.uri, e.code, e.decision) for e in evidence.refused()]
    assert not refused, f"the apiserver refused calls of the operator: {refused}"
    assert evidence.facts["children block owner deletion"], "admission never checked trainingruns/finalizers"
    used = evidence.used() | set(ADMISSION_CHECKED)
    unused = sorted({g.rule for g in evidence.grants} - used - set(ALLOWED_UNUSED))
    assert not unused, f"the chart grants what the operator never used: {unused}"
    stale = sorted(set(ALLOWED_UNUSED) & used)
    assert not stale, f"ALLOWED_UNUSED lists rules that are used now: {stale}"


def test_audit_log_shows_every_code_path(clusterwide):
    """The scenario took the paths it is meant to, as the apiserver saw them (an empty or partial record would make
    the RBAC checks vacuous)."""
    paths = {
        "kopf watches the runs": ("watch", "stagerun.io", "trainingruns"),
        "kopf's finalizer and annotations": ("patch", "stagerun.io", "trainingruns"),
        "a fresh read before each reconcile": ("get", "stagerun.io", "trainingruns"),
        "status": ("patch", "stagerun.io", "trainingruns/status"),
        "Events": ("create", "", "events"),
        "launch: ConfigMap": ("create", "", "configmaps"),
        "launch: Service": ("create", "", "services"),
        "launch: Job": ("create", "batch", "jobs"),
        "launch: NetworkPolicy": ("create", "networking.k8s.io", "networkpolicies"),
        "observe: the attempt's Job": ("get", "batch", "jobs"),
        "observe: its pods": ("list", "", "pods"),
        "observe: node readiness": ("get", "", "nodes"),
        "an accepted edit of a later phase": ("patch", "", "configmaps"),
        "teardown: pods": ("delete", "", "pods"),
        "teardown: Job": ("delete", "batch", "jobs"),
        "teardown: Service": ("delete", "", "services"),
        "teardown: ConfigMap": ("delete", "", "configmaps"),
        "teardown: NetworkPolicy": ("delete", "networking.k8s.io", "networkpolicies"),
        "deletion: every NetworkPolicy by label": ("list", "networking.k8s.io", "networkpolicies"),
        "deletion: every child by label": ("list", "", "services"),
        "kopf's CRD scan": ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
        "peering: the other replicas' records": ("watch", "kopf.dev", "clusterkopfpeerings"),
        "peering: this replica's keep-alive": ("patch", "kopf.dev", "clusterkopfpeerings"),
    }
    used = clusterwide.used()
    missing = {path: rule for path, rule in paths.items() if rule not in used}
    assert not missing, missing
    reasons = {e.reason for e in clusterwide.events if e.resource}
    assert all(f'"{clusterwide.release.name}"' in r for r in reasons), reasons  # allowed by the chart's binding


def test_clusterwide_rbac_is_exactly_what_the_operator_uses(clusterwide):
    assert {g.namespace for g in clusterwide.grants} == {None}  # one ClusterRole, bound cluster-wide
    check_rbac(clusterwide)


def test_namespaced_rbac_is_exactly_what_the_operator_uses(namespaced):
    check_rbac(namespaced)
    watched = namespaced.release.runs_namespace
    # Peered through the KopfPeering in the watched namespace (its keep-alive written there), not a cluster-wide one.
    keepalives = {(e.namespace, e.name) for e in namespaced.events if e.rule == ("patch", "kopf.dev", "kopfpeerings")}
    assert keepalives == {(watched, namespaced.release.name)}, keepalives
    # Nothing namespaced is granted cluster-wide: the operator cannot touch namespaces it does not watch.
    wide = {g for g in namespaced.grants if g.namespace is None}
    assert {g.resource for g in wide} <= CLUSTER_SCOPED, wide
    assert {g.namespace for g in namespaced.grants} == {None, watched}
    # And it only ever asked for its own namespace (or cluster-scoped objects).
    strays = [
        (e.verb, e.uri)
        for e in namespaced.events
        if e.resource and e.resource.split("/")[0] not in CLUSTER_SCOPED and e.namespace != watched
    ]
    assert not strays, strays


def test_without_read_nodes_only_the_nodes_rule_goes(clusterwide, without_nodes):
    """rbac.readNodes=false drops exactly `get nodes`; the operator copes with the 403 and still restarts a gang."""
    assert clusterwide.grants - without_nodes.grants == {Grant("get", "", "nodes", None)}
    assert without_nodes.grants < clusterwide.grants
    refused = without_nodes.refused()
    assert refused, "no call was refused: the operator never tried to read nodes"
    assert {(e.rule, e.code, e.decision) for e in refused} == {(("get", "", "nodes"), 403, "forbid")}


# -- the audit-log reader ---------------------------------------------------------------------------------------------


def _audit_line(audit_id: str, stage: str, verb: str, code: int, **ref: str) -> str:
    return json.dumps(
        {
            "auditID": audit_id,
            "stage": stage,
            "verb": verb,
            "requestURI": "/x",
            "user": {"username": "system:serviceaccount:a:b"},
            "objectRef": ref,
            "responseStatus": {"code": code},
            "annotations": {"authorization.k8s.io/decision": "allow" if code != 403 else "forbid"},
        }
    )


def test_audit_reader_keeps_one_event_per_request_and_rbac_attributes():
    lines = [
        _audit_line("w", "ResponseStarted", "watch", 200, resource="trainingruns", apiGroup="stagerun.io"),
        _audit_line(
            "s", "ResponseComplete", "patch", 200, resource="trainingruns", subresource="status", namespace="n"
        ),
        _audit_line("w", "ResponseComplete", "watch", 200, resource="trainingruns", apiGroup="stagerun.io"),
        _audit_line("f", "ResponseComplete", "list", 403, resource="nodes"),
        '{"auditID": "cut", "stage": "Respo',  # the apiserver was still writing this one
    ]
    events = parse_lines(lines)
    assert [(e.rule, e.namespace, e.code, e.decision, e.stage) for e in events] == [
        (("watch", "stagerun.io", "trainingruns"), None, 200, "allow", "ResponseComplete"),
        (("patch", "", "trainingruns/status"), "n", 200, "allow", "ResponseComplete"),
        (("list", "", "nodes"), None, 403, "forbid", "ResponseComplete"),
    ]
    with pytest.raises(json.JSONDecodeError):  # only the last line may be incomplete
        parse_lines(lines[-1:] + lines[:1])
