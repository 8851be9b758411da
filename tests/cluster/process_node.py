"""The Node and Lease objects a process kubelet keeps in the apiserver: what a real kubelet registers and renews.

A node is `Ready` to the control plane while its Lease in kube-node-lease is renewed: the node lifecycle controller
marks it `Unknown` (and taints it unreachable) when the renewals stop for its grace period (50 s). The Node is
created with its status, as kubelets do (nodes keep the status they are created with), and the
TaintNodesByCondition admission plugin gives every new Node the `node.kubernetes.io/not-ready` taint, which the
node lifecycle controller removes once it has seen the Ready condition: `schedulable` waits for that.

The kubelet's own label and taint `stagerun.test/process-kubelet=<id>` keep the pods of the tests that use it on
its nodes (`placement`) and every other pod, such as those of tests using kwok nodes, off them.
"""

from __future__ import annotations

from datetime import UTC, datetime

LABEL = "stagerun.test/process-kubelet"  # node label and taint key; the value is the kubelet's id
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
RENEW_SECONDS = 5.0  # well inside the lifecycle controller's 50 s grace, even on a loaded machine
KUBELET_VERSION = "v1.36.3-process"


LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"


def lease_path(node: str) -> str:
    return f"{LEASES}/{node}"


def micro_time() -> str:
    """A metav1.MicroTime, as Lease renewTime wants it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_object(name: str, kubelet_id: str, capacity: dict[str, str]) -> dict:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = [
        {
            "type": kind,
            "status": "False",
            "reason": f"KubeletHasNo{kind}",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
    ]
    conditions.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "process kubelet is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "process",
                LABEL: kubelet_id,
            },
        },
        "spec": {"taints": [{"key": LABEL, "value": kubelet_id, "effect": "NoSchedule"}]},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "kubeletVersion": KUBELET_VERSION,
                "containerRuntimeVersion": "process://",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


def lease_object(node: dict) -> dict:
    """The node's Lease, owned by the Node (the garbage collector removes it with the node, as for kubelets)."""
    name = node["metadata"]["name"]
    owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_time()},
    }


def schedulable(node: dict) -> bool:
    """Ready, and no taint left but the kubelet's own."""
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions") or ())
    return ready and {t["key"] for t in node["spec"].get("taints") or ()} == {LABEL}


def placement(kubelet_id: str) -> dict:
    """What a pod spec needs to run on the kubelet's nodes (the operator's `spec.scheduling` takes both fields)."""
    return {
        "nodeSelector": {LABEL: kubelet_id},
        "tolerations": [{"key": LABEL, "operator": "Equal", "value": kubelet_id, "effect": "NoSchedule"}],
    }
