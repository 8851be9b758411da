"""The real control plane (tests/cluster/) behaves as a cluster does, and only on loopback.

What the operator tests will rely on, checked against the real v1.36 apiserver, Job controller, garbage collector,
scheduler and kwok nodes: the CRD and its schema validation, an Indexed Job's pods scheduled on GPU nodes with the
names, hostnames and loopback IPs the rendezvous uses, garbage collection, and PodSecurity admission.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from pathlib import Path

import pytest
from cluster import binaries
from cluster.control_plane import ControlPlane
from cluster.processes import listening_addresses

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
LOOPBACK = {"127.0.0.1", "::1"}
cluster = pytest.mark.cluster


def test_an_unbuilt_control_plane_skips_naming_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGERUN_CLUSTER_CACHE", str(tmp_path))
    assert set(binaries.missing()) >= {"kube-apiserver", "etcd", "kwok", "kubectl"}
    assert "run `tests/cluster/build.sh`" in binaries.skip_reason()
    assert str(tmp_path) in binaries.skip_reason()


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_pool(control_plane: ControlPlane) -> tuple[str, list[str]]:
    """Two kwok nodes with 8 nvidia.com/gpu each, behind a label no other test's nodes carry."""
    pool = uuid.uuid4().hex[:6]
    names = [f"gpu-{pool}-{i}" for i in range(2)]
    for name in names:
        control_plane.add_node(name, gpus=8, labels={"stagerun.io/test-pool": pool})
    return pool, names


def _manifest(control_plane: ControlPlane, path: Path) -> dict:
    """The object kubectl sends for `path` (kubectl's YAML reading, e.g. of 3e-3, not PyYAML's), namespace-free."""
    manifest = json.loads(control_plane.kubectl("create", "--dry-run=client", "-o", "json", "-f", str(path)).stdout)
    manifest["metadata"].pop("namespace", None)  # the client fills in "default"; each test applies with -n
    return manifest


def _pods(control_plane: ControlPlane, namespace: str, selector: str) -> list[dict]:
    path = f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}"
    return control_plane.request("GET", path)["items"]


# -- the control plane itself --------------------------------------------------------------------------------
@cluster
def test_the_control_plane_is_v1_36_and_listens_only_on_loopback(control_plane: ControlPlane, gpu_pool):
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"
    for proc in control_plane.processes:
        assert proc.running, proc.log_tail()
        addresses = listening_addresses(proc.popen.pid)
        assert addresses and addresses <= LOOPBACK, f"{proc.name} listens on {addresses}"
    # What the operator would dial: the nodes' addresses (and the pods', in the Job test below).
    _, names = gpu_pool
    for name in names:
        node = control_plane.request("GET", f"/api/v1/nodes/{name}")
        assert {a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"} == {"127.0.0.1"}
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"


# -- the CRD -------------------------------------------------------------------------------------------------
@cluster
def test_the_crd_applies_server_side_with_its_printer_columns(control_plane: ControlPlane, trainingrun_crd: str):
    assert "serverside-applied" in trainingrun_crd
    crd = control_plane.request(
        "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/trainingruns.stagerun.io"
    )
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:3] == ["STATE", "PHASE", "STEP"] and "RESTARTS" in columns


@cluster
def test_the_quickstart_is_stored_as_written(control_plane: ControlPlane, trainingrun_crd, namespace: str):
    sent = _manifest(control_plane, QUICKSTART)
    control_plane.kubectl("apply", "--server-side", "-n", namespace, "-f", str(QUICKSTART))
    stored = json.loads(control_plane.kubectl("get", "trainingrun", "quickstart", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"] == sent["spec"]  # nothing pruned by the structural schema, nothing defaulted


MALFORMED = {
    # field path -> (value, what the apiserver says). Server-side apply types the patch against the schema first,
    # so a wrong type or an unknown field is refused in its words; the schema's enum check then reports the rest.
    "resources.nodes": ("four", ".spec.resources.nodes: expected numeric (int or float), got string"),
    "phases.0.lr.schedule": ("sawtooth", 'spec.phases[0].lr.schedule: Unsupported value: "sawtooth"'),
    # phases is a list-map keyed by name: server-side apply names the item by its key.
    "phases.0.seqLength": (128, '.spec.phases[name="core"].seqLength: field not declared in schema'),
}


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[int(key)] if key.isdigit() else doc[key]
    doc[last] = value


@cluster
@pytest.mark.parametrize("field", sorted(MALFORMED))
def test_a_malformed_trainingrun_is_refused_by_the_apiserver(control_plane, trainingrun_crd, namespace, field):
    value, message = MALFORMED[field]
    manifest = _manifest(control_plane, QUICKSTART)  # otherwise valid: exactly one thing wrong
    _set(manifest["spec"], field, value)
    result = control_plane.kubectl(
        "apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert control_plane.kubectl("get", "trainingruns", "-n", namespace, "-o", "name").stdout == ""


class StoredWithoutComplaint(AssertionError):
    """Raised only when the apiserver accepts the manifest: an xfail on it cannot pass for another reason."""


@cluster
def test_a_seqlen_that_is_not_a_count_is_refused_by_the_apiserver(control_plane, trainingrun_crd, namespace):
    manifest = _manifest(control_plane, QUICKSTART)
    manifest["spec"]["phases"][0]["seqLen"] = "long"
    result = control_plane.kubectl(
        "apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False
    )
    if result.returncode == 0:
        raise StoredWithoutComplaint(result.stdout)
    assert "spec.phases[0].seqLen" in result.stderr, result.stderr


# -- Jobs, scheduling, garbage collection ----------------------------------------------------------------------
def _indexed_job(name: str, pool: str) -> dict:
    container = {
        "name": "trainer",
        "image": "stagerun.invalid/never-pulled:0",
        "resources": {"limits": {"nvidia.com/gpu": "8"}},
    }
    pod_spec = {
        "restartPolicy": "Never",
        "subdomain": name,
        "terminationGracePeriodSeconds": 1,  # kwok deletes a terminating pod within its grace: keep the test short
        "nodeSelector": {"stagerun.io/test-pool": pool},
        "containers": [container],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {"spec": pod_spec},
        },
    }


@cluster
def test_an_indexed_job_runs_one_pod_per_gpu_node_on_loopback_and_is_collected(control_plane, gpu_pool, namespace):
    pool, nodes = gpu_pool
    name = "gang"
    control_plane.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", _indexed_job(name, pool))
    selector = f"batch.kubernetes.io/job-name={name}"

    def running() -> list[dict]:
        pods = _pods(control_plane, namespace, selector)
        return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else []

    control_plane.wait_until(f"2 Running pods of Job {name}", lambda: bool(running()), timeout_s=60)
    pods = sorted(running(), key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
    for index, pod in enumerate(pods):
        assert pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index)
        assert pod["metadata"]["name"].startswith(f"{name}-{index}-")
        assert pod["spec"]["hostname"] == f"{name}-{index}" and pod["spec"]["subdomain"] == name
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network("127.0.0.0/8")
    # 8 GPUs asked, 8 per node: the scheduler counts the extended resource, so the gang spreads over both nodes.
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(nodes)

    control_plane.kubectl("delete", "job", name, "-n", namespace, "--wait=false")
    control_plane.wait_until(
        f"the pods of deleted Job {name} collected", lambda: not _pods(control_plane, namespace, selector), timeout_s=60
    )


# -- admission ---------------------------------------------------------------------------------------------------
def _pod(name: str, security_context: dict) -> dict:
    container = {"name": "c", "image": "stagerun.invalid/never-pulled:0", "securityContext": security_context}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [container]}}


RESTRICTED_OK = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@cluster
def test_a_restricted_namespace_refuses_a_privileged_pod(control_plane: ControlPlane):
    namespace = f"restricted-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(namespace, labels={"pod-security.kubernetes.io/enforce": "restricted"})
    try:
        refused = control_plane.kubectl(
            "create",
            "-n",
            namespace,
            "-f",
            "-",
            check=False,
            input=json.dumps(_pod("privileged", {"privileged": True})),
        )
        assert refused.returncode != 0
        assert 'violates PodSecurity "restricted:latest": privileged' in refused.stderr, refused.stderr
        # The control: a pod that meets the restricted profile is admitted, so the refusal above is the profile's.
        control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_pod("compliant", RESTRICTED_OK)))
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")
