"""What happens to pods on kwok nodes, played by the test through the real apiserver: it stands in for the
kubelet of a kwok node, which does not exist (kwok fakes node and pod lifecycles but runs no containers).

kwok (tests/cluster/control_plane.py) runs nothing: the scheduler binds pods, kwok's pod-ready stage marks a bound
pod Running with a 127.1.x.x IP, and its pod-delete stage removes a pod being deleted at a random moment within its
grace period (at its deletionTimestamp at the latest, and only once the Job controller dropped its tracking
finalizer). Everything else a kubelet would report — a container exiting, an image that cannot be pulled, a node
that stops answering — this driver writes as a kubelet or a lost node does: pod and node status through the
`/status` subresource, and a grace-0 delete for a pod that vanished.

kwok leaves terminal pods alone (its only pod stages select Pending pods and pods being deleted), so a status
written here stays. A pod kwok has not run yet cannot be held back on a kwok node: `add_held_node` makes a node
kwok does not manage, whose pods stay Pending until the test says what their kubelet saw (`image_pull_backoff`).
`node_not_ready` takes a node out of kwok's hands (see there how), so nothing finalises its pods any more.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .control_plane import KWOK_ANNOTATION, ApiError, ControlPlane

JOB_INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME = "batch.kubernetes.io/job-name"
LABEL_RUN = "stagerun.io/run"
TERMINAL = ("Succeeded", "Failed")
# kwok's pod-delete stage waits this long (capped at the deletionTimestamp) when a pod carries it: a duration far
# past any grace period makes the pod go exactly at SIGKILL time, as a process that ignores SIGTERM does.
KWOK_DELETE_DELAY = "pod-delete.stage.kwok.x-k8s.io/delay"
MERGE = "application/merge-patch+json"
DEFAULT_TIMEOUT_S = 60.0  # the scheduler, kwok and the Job controller on a loaded 2-core machine


def now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def pod_index(pod: dict) -> int:
    value = (pod["metadata"].get("annotations") or {}).get(JOB_INDEX, "-1")
    return int(value) if value.lstrip("-").isdigit() else -1


def _name(ref: dict | str) -> str:
    return ref if isinstance(ref, str) else ref["metadata"]["name"]


def _condition(obj: dict, kind: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or () if c.get("type") == kind), {})


def _terminating(pod: dict) -> bool:
    return "deletionTimestamp" in pod["metadata"]


def _with_conditions(pod: dict, *changed: dict) -> list[dict]:
    """The pod's conditions with ``changed`` replacing (or joining) those of the same type."""
    kinds = {c["type"] for c in changed}
    return [c for c in pod["status"].get("conditions") or () if c["type"] not in kinds] + list(changed)


class KwokPods:
    """The pods (and nodes) of one namespace's tests on the kwok cluster."""

    def __init__(self, plane: ControlPlane, namespace: str):
        self.plane, self.namespace = plane, namespace

    # -- reading -------------------------------------------------------------------------------------------------
    def pods(self, run: str | None = None, job: str | None = None) -> list[dict]:
        """Pods of a TrainingRun (its `stagerun.io/run` label) and/or a Job, ordered by Job, index, age."""
        selector = ",".join(filter(None, [f"{LABEL_RUN}={run}" if run else "", f"{JOB_NAME}={job}" if job else ""]))
        path = f"/api/v1/namespaces/{self.namespace}/pods" + (f"?labelSelector={selector}" if selector else "")
        items = self.plane.request("GET", path)["items"]
        return sorted(
            items,
            key=lambda p: (
                (p["metadata"].get("labels") or {}).get(JOB_NAME, ""),
                pod_index(p),
                p["metadata"]["creationTimestamp"],
            ),
        )

    def pod(self, ref: dict | str) -> dict | None:
        try:
            return self.plane.request("GET", f"/api/v1/namespaces/{self.namespace}/pods/{_name(ref)}")
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def wait_for_pods(
        self,
        count: int,
        *,
        run: str | None = None,
        job: str | None = None,
        phase: str | None = "Running",
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> list[dict]:
        """``count`` pods not being deleted, in ``phase`` (None: any phase, but bound to a node); returns them."""

        def matching() -> list[dict]:
            return [
                p
                for p in self.pods(run, job)
                if not p["metadata"].get("deletionTimestamp")
                and (p["status"].get("phase") == phase if phase else bool(p["spec"].get("nodeName")))
            ]

        found: list[dict] = []

        def enough() -> bool:
            found[:] = matching()
            return len(found) >= count

        wait_for(enough, timeout, lambda: f"{count} pods {phase or 'bound'}: {self.describe_pods()}")
        return found

    def describe_pods(self) -> list[tuple[str, str | None, str | None, bool]]:
        """(name, phase, node, terminating) of every pod in the namespace: what a timeout message should show."""
        return [
            (pod["metadata"]["name"], pod["status"].get("phase"), pod["spec"].get("nodeName"), _terminating(pod))
            for pod in self.pods()
        ]

    # -- what a kubelet reports ------------------------------------------------------------------------------------
    def succeed(self, pod: dict | str, message: str | None = None) -> dict:
        """The container exits 0 with ``message`` as its termination message: phase Succeeded."""
        return self._terminate(pod, 0, "Completed", message)

    def fail(self, pod: dict | str, exit_code: int = 1, reason: str = "Error", message: str | None = None) -> dict:
        """The container exits ``exit_code``: phase Failed (restartPolicy Never)."""
        return self._terminate(pod, exit_code, reason, message)

    def oom_kill(self, pod: dict | str) -> dict:
        """The kernel's OOM killer ends the container: exit 137, reason OOMKilled."""
        return self._terminate(pod, 137, "OOMKilled", None)

    def succeed_job(self, job: str, message: str | None = None) -> None:
        """Every live pod of the Job succeeds; index 0 (the one whose message the operator reads) carries
        ``message``."""
        live = [
            p
            for p in self.pods(job=job)
            if p["status"].get("phase") not in TERMINAL and not p["metadata"].get("deletionTimestamp")
        ]
        if not live:
            raise LookupError(f"Job {job} has no live pods: {self.describe_pods()}")
        first = min(live, key=pod_index)
        for pod in live:
            self.succeed(pod, message if pod is first else None)

    def image_pull_backoff(self, pod: dict | str, reason: str = "ImagePullBackOff") -> dict:
        """The kubelet cannot pull the image: the pod stays Pending, its container waiting with ``reason``.
        Only for a pod on a node kwok does not manage (`add_held_node`): on a kwok node it is Running already."""
        current = self._require(pod)
        if current["status"].get("phase") != "Pending" or not current["spec"].get("nodeName"):
            raise ValueError(f"pod {_name(pod)} is not Pending on a node (use a held node): {current['status']}")
        statuses = [
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": f'Back-off pulling image "{c["image"]}"'}},
            }
            for c in current["spec"]["containers"]
        ]
        stamp = now()
        conditions = _with_conditions(
            current,
            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": stamp},
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": stamp},
            {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": stamp},
        )
        body = {
            "status": {
                "phase": "Pending",
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "startTime": stamp,
                "conditions": conditions,
                "containerStatuses": statuses,
            }
        }
        return self._patch_status(current, body)

    def ignore_sigterm(self, pod: dict | str) -> dict:
        """The pod's process ignores SIGTERM (a rank blocked in a collective whose peer died): once deleted, kwok
        removes it only when its grace period runs out, at its deletionTimestamp."""
        body = {"metadata": {"annotations": {KWOK_DELETE_DELAY: "87600h"}}}
        return self.plane.request(
            "PATCH", f"/api/v1/namespaces/{self.namespace}/pods/{_name(pod)}", body, content_type=MERGE
        )

    def exit_on_sigterm(self, pod: dict | str) -> None:
        """A pod being deleted whose process exits on SIGTERM before its grace runs out: the kubelet reports the
        container terminated (143) and removes the pod (a grace-0 delete), as it does when the process ends early."""
        current = self._require(pod)
        if not current["metadata"].get("deletionTimestamp"):
            raise ValueError(f"pod {_name(pod)} is not being deleted: nothing sent it SIGTERM")
        if current["status"].get("phase") not in TERMINAL:
            self._terminate(current, 143, "Error", None)
        self._delete_pod(current["metadata"]["name"], grace_seconds=0)

    def lose_pod(self, pod: dict | str) -> None:
        """The pod vanishes as a lost node's pod does: a force delete (grace 0), no final status."""
        self._delete_pod(_name(pod), grace_seconds=0)

    # -- nodes ---------------------------------------------------------------------------------------------------
    def add_pool(self, size: int, *, gpus: int = 1) -> tuple[dict[str, str], list[str]]:
        """``size`` kwok nodes behind a label no other test's nodes carry: (nodeSelector for them, node names)."""
        pool = uuid.uuid4().hex[:8]
        selector = {"stagerun.io/test-pool": pool}
        names = [f"kwok-{pool}-{i}" for i in range(size)]
        for name in names:
            self.plane.add_node(name, gpus=gpus, labels=selector)
        return selector, names

    def add_held_node(self, name: str, labels: dict[str, str], *, gpus: int = 1) -> None:
        """A Ready node that kwok does not manage: pods bound to it stay Pending, with no IP, until the test writes
        what their kubelet saw. Nothing renews its heartbeat; the node lifecycle controller's grace (50 s) is
        longer than a test needs it."""
        resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
        self._register_node(
            {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
            {"capacity": resources, "allocatable": resources},
            _ready_condition("True", "KubeletReady", "kubelet is posting ready status"),
        )
        # Admission taints a new node not-ready until the node lifecycle controller has seen it Ready.
        wait_for(lambda: self._schedulable(name), DEFAULT_TIMEOUT_S, f"held node {name} still tainted")

    def node_not_ready(self, node: str, status: str = "False") -> None:
        """The node stops answering: its Ready condition becomes ``status`` (False: the kubelet reports NotReady;
        Unknown: no heartbeat) and nothing runs or finalises its pods any more: a pod deleted there stays
        Terminating until it is force-deleted. The node lifecycle controller then taints the node, as in a real
        cluster; its pods keep their Ready condition (the controller marks pods not ready only when it times a node's
        heartbeat out, not when a kubelet reports NotReady).

        kwok must let go of the node first, and only a deletion makes it: it filters its node watch by annotation
        on the client side, so removing the annotation hides later updates from it while a heartbeat it has
        already scheduled still turns the node Ready again (and keeps doing so), and its pods stay managed. So the
        Node object is deleted and at once registered again under the same name without kwok's annotation (pods
        keep their binding; the pod garbage collector only removes pods of a node missing for 40 s)."""
        key, _ = KWOK_ANNOTATION
        old = self.plane.request("GET", f"/api/v1/nodes/{node}")
        metadata = {
            "name": node,
            "labels": old["metadata"].get("labels") or {},
            "annotations": {k: v for k, v in (old["metadata"].get("annotations") or {}).items() if k != key},
        }
        kept = {k: old["status"][k] for k in ("capacity", "allocatable", "addresses", "nodeInfo") if k in old["status"]}
        self.plane.request("DELETE", f"/api/v1/nodes/{node}")
        wait_for(lambda: not self._node_exists(node), 30, f"node {node} not deleted")
        reason, message = (
            ("KubeletNotReady", "container runtime is down")
            if status == "False"
            else ("NodeStatusUnknown", "Kubelet stopped posting node status.")
        )
        self._register_node(metadata, kept, _ready_condition(status, reason, message))
        time.sleep(1.0)  # nothing may turn it Ready again: look once more after kwok had the chance
        if self.node_ready_status(node) != status:
            raise AssertionError(f"node {node} did not stay Ready={status}")

    def node_ready(self, node: str) -> None:
        """The node is back: kwok manages it again (its node-initialize stage reports it Ready) and finalises the
        pods that were deleted there meanwhile."""
        key, value = KWOK_ANNOTATION
        self.plane.request(
            "PATCH", f"/api/v1/nodes/{node}", {"metadata": {"annotations": {key: value}}}, content_type=MERGE
        )
        wait_for(lambda: self.node_ready_status(node) == "True", DEFAULT_TIMEOUT_S, f"node {node} never Ready")

    def node_ready_status(self, node: str) -> str | None:
        return _condition(self.plane.request("GET", f"/api/v1/nodes/{node}"), "Ready").get("status")

    def delete_nodes(self, names: list[str]) -> None:
        for name in names:
            try:
                self.plane.request("DELETE", f"/api/v1/nodes/{name}")
            except ApiError as exc:
                if exc.code != 404:
                    raise

    # -- helpers -------------------------------------------------------------------------------------------------
    def _register_node(self, metadata: dict, status: dict, ready: dict) -> None:
        """Create a Node kwok does not manage and write its status (capacity, addresses, Ready) as a kubelet does."""
        name = metadata["name"]
        self.plane.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": metadata})
        status = {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            **status,
            "conditions": [ready],
        }
        self.plane.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": status}, content_type=MERGE)

    def _node_exists(self, name: str) -> bool:
        try:
            self.plane.request("GET", f"/api/v1/nodes/{name}")
        except ApiError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    def _schedulable(self, node: str) -> bool:
        taints = self.plane.request("GET", f"/api/v1/nodes/{node}").get("spec", {}).get("taints") or []
        return not any(t.get("effect") in ("NoSchedule", "NoExecute") for t in taints)

    def _require(self, pod: dict | str) -> dict:
        current = self.pod(pod)
        if current is None:
            raise LookupError(f"no pod {_name(pod)} in {self.namespace}: {self.describe_pods()}")
        return current

    def _terminate(self, pod: dict | str, exit_code: int, reason: str, message: str | None) -> dict:
        """What a kubelet writes when a pod's containers have exited: terminated states, the phase, conditions."""
        current = self._require(pod)
        stamp = now()
        running = {s["name"]: s for s in current["status"].get("containerStatuses") or ()}
        statuses = []
        for container in current["spec"]["containers"]:
            previous = running.get(container["name"], {})
            terminated = {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": ((previous.get("state") or {}).get("running") or {}).get("startedAt") or stamp,
                "finishedAt": stamp,
            }
            if message and container is current["spec"]["containers"][0]:
                terminated["message"] = message
            statuses.append(
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": previous.get("imageID", ""),
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            )
        ok = exit_code == 0
        why = "PodCompleted" if ok else "PodFailed"
        body = {
            "status": {
                "phase": "Succeeded" if ok else "Failed",
                "conditions": _with_conditions(
                    current,
                    {"type": "Ready", "status": "False", "reason": why, "lastTransitionTime": stamp},
                    {"type": "ContainersReady", "status": "False", "reason": why, "lastTransitionTime": stamp},
                ),
                "containerStatuses": statuses,
            }
        }
        return self._patch_status(current, body)

    def _patch_status(self, pod: dict, body: dict) -> dict:
        """A merge patch: the lists given (conditions, containerStatuses) replace the old ones whole, so no state of
        a container is left beside its new one."""
        path = f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}/status"
        return self.plane.request("PATCH", path, body, content_type=MERGE)

    def _delete_pod(self, name: str, grace_seconds: int) -> None:
        try:
            self.plane.request(
                "DELETE",
                f"/api/v1/namespaces/{self.namespace}/pods/{name}",
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": grace_seconds},
            )
        except ApiError as exc:
            if exc.code != 404:
                raise


def _ready_condition(status: str, reason: str, message: str) -> dict:
    stamp = now()
    return {
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": stamp,
        "lastTransitionTime": stamp,
    }


def wait_for(predicate: Callable[[], Any], timeout: float, message: str | Callable[[], str]) -> Any:
    """The predicate's first truthy answer, polled every 0.25 s; TimeoutError with ``message`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"not within {timeout:g} s: {text}")
        time.sleep(0.25)
