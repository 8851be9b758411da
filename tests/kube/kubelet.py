"""A simulated cluster for the emulated API: job controller, scheduler and a kubelet whose pods run nothing.

``FakeCluster(api, nodes=...)`` runs in a background thread (a reconcile pass every ``interval`` seconds) and plays:

- nodes: creates Ready ``Node`` objects at start (``node_not_ready``/``node_ready`` flip them);
- the Job controller (``batch/v1``): for a Job that is not suspended it creates pods up to ``parallelism`` (Indexed:
  ``<job>-<index>-<5 chars>`` with ``spec.hostname=<job>-<index>``, the completion-index label/annotation and env
  ``JOB_COMPLETION_INDEX``; NonIndexed: ``<job>-<5 chars>``), owner-referenced to the Job, with the template's
  labels plus ``job-name``/``controller-uid``; keeps ``status`` (active, ready, succeeded, failed, terminating,
  startTime, completionTime, completedIndexes, conditions). As the real controller does, a pod counts as failed when
  its phase is Failed, or when it is being deleted (deletionTimestamp) without having succeeded, or when it vanished
  (force-deleted); more failures than ``backoffLimit`` fail the Job (conditions FailureTarget + Failed, reason
  BackoffLimitExceeded) and its active pods are deleted; all indexes succeeded completes it (SuccessCriteriaMet +
  Complete, completionTime). ``spec.suspend`` deletes the active pods (not counted as failures) and sets the
  Suspended condition; resuming resets startTime. A pod the API refuses (e.g. a hostname over 63 characters) gives a
  ``FailedCreate`` Warning event on the Job, as in a real cluster;
- the scheduler: binds pending pods to the Ready, untainted node matching ``nodeSelector`` with the fewest live pods
  (so a gang spreads one pod per node), else marks them Unschedulable;
- the kubelet: pods on a Ready node go Pending -> Running (``auto_run``), with a unique ``podIP`` and running
  container statuses; a pod being deleted is terminated after ``termination_delay`` (exit code 143 unless it had
  already finished) and then removed (a grace-0 delete); pods on a NotReady node are left alone (they stay
  Terminating until force-deleted).

Test controls (synchronous, thread-safe): ``pods``, ``pod``, ``wait_for_pods``, ``set_running``, ``succeed``,
``fail``, ``oom_kill``, ``image_pull_backoff``, ``lose_pod``, ``node_not_ready``, ``node_ready``, ``succeed_job``,
``tick``. ``processes.ProcessCluster`` subclasses this with a kubelet that runs the containers.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

from .emulator import JOB_INDEX_KEY, Api, ApiError, _random_suffix, timestamp

LABEL_RUN = "stagerun.io/run"
TERMINAL = ("Succeeded", "Failed")


def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or () if c.get("type") == kind), None)


def is_ready_node(node: dict) -> bool:
    condition = _condition(node, "Ready")
    return bool(condition and condition.get("status") == "True")


def pod_index(pod: dict) -> int | None:
    meta = _meta(pod)
    value = (meta.get("annotations") or {}).get(JOB_INDEX_KEY, (meta.get("labels") or {}).get(JOB_INDEX_KEY))
    return int(value) if value is not None and str(value).isdigit() else None


def controller_uid(obj: dict) -> str | None:
    return next((ref.get("uid") for ref in _meta(obj).get("ownerReferences") or () if ref.get("controller")), None)


def _compact_ranges(indexes: Iterable[int]) -> str:
    ranges, values = [], sorted(set(indexes))
    for _, group in itertools.groupby(enumerate(values), lambda pair: pair[1] - pair[0]):
        run = [value for _, value in group]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(ranges)


@dataclasses.dataclass
class _JobTrack:
    seen: dict[str, int | None] = dataclasses.field(default_factory=dict)  # pod uid -> index
    failed: set[str] = dataclasses.field(default_factory=set)
    succeeded: dict[str, int | None] = dataclasses.field(default_factory=dict)
    excluded: set[str] = dataclasses.field(default_factory=set)  # deleted by the controller (suspend, job failed)
    create_errors: set[str] = dataclasses.field(default_factory=set)


class FakeCluster:
    """Nodes, job controller, scheduler and a pod-less kubelet over an :class:`~kube.emulator.Api`.

    ``auto_run=False`` leaves pods Pending until ``set_running(pod)``. ``pod_ip_prefix`` sets the pod network (pods
    get ``<prefix>.<node number>.<n>``); the default 10.244.x.y addresses are not routable, so anything connecting to
    a pod (e.g. the operator polling rank 0) waits for its own timeout: pass e.g. ``"127.10"`` for loopback
    addresses, where connections are refused at once."""

    def __init__(
        self,
        api: Api,
        nodes: Iterable[str] = ("node-1", "node-2"),
        *,
        auto_run: bool = True,
        interval: float = 0.1,
        termination_delay: float = 0.2,
        pod_ip_prefix: str = "10.244",
        node_labels: dict[str, str] | None = None,
    ):
        self.api = api
        self.node_names = tuple(nodes)
        self.auto_run = auto_run
        self.interval = interval
        self.termination_delay = termination_delay
        self.pod_ip_prefix = pod_ip_prefix
        self.node_labels = dict(node_labels or {})
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._jobs: dict[str, _JobTrack] = {}
        self._held: set[str] = set()  # pod uids kept Pending (image pull back-off)
        self._released: set[str] = set()  # pod uids allowed to run when auto_run is off
        self._terminating: dict[str, float] = {}  # pod uid -> when the kubelet saw the deletion
        self._ip_counters: dict[str, itertools.count] = {}
        self._unschedulable: set[str] = set()

    # lifecycle

    def start(self) -> FakeCluster:
        for number, name in enumerate(self.node_names, start=1):
            if self.api.get("nodes", name) is None:
                self.api.create(self._node(name, number))
        self._thread = threading.Thread(target=self._run, name=f"{type(self).__name__}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.stop()
        if self.errors and exc_type is None:
            raise AssertionError(f"{type(self).__name__} failed in its background thread:\n" + "\n".join(self.errors))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - reported by __exit__, the loop goes on
                if not self._stop.is_set():
                    self.errors.append(traceback.format_exc())
            self._stop.wait(self.interval)

    def tick(self) -> None:
        """One pass of every controller (the background thread calls it every ``interval`` seconds)."""
        with self._lock:
            nodes = {_meta(n)["name"]: n for n in self.api.list("nodes")}
            jobs = self.api.list("jobs")
            pods = self.api.list("pods")
            for job in jobs:
                self._ignore_gone(self._sync_job, job, pods)
            live_jobs = {_meta(job)["uid"] for job in jobs}
            for uid in list(self._jobs):
                if uid not in live_jobs:
                    del self._jobs[uid]
            pods = self.api.list("pods")
            self._schedule(pods, nodes)
            pods = self.api.list("pods")
            self._kubelet(pods, nodes)

    @staticmethod
    def _ignore_gone(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            if exc.code not in (404, 409):
                raise
            return None

    # nodes

    def _node(self, name: str, number: int) -> dict:
        now = timestamp()
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    **self.node_labels,
                },
            },
            "spec": {},
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": f"10.0.0.{number}"},
                    {"type": "Hostname", "address": name},
                ],
                "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8"},
                "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8"},
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                    "containerRuntimeVersion": "containerd://1.7.0",
                    "kernelVersion": "6.1.0",
                    "kubeProxyVersion": "v1.31.0",
                    "kubeletVersion": "v1.31.0",
                    "machineID": uuid.uuid5(uuid.NAMESPACE_URL, name).hex,
                    "operatingSystem": "linux",
                    "osImage": "Fake Linux",
                    "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_OID, name)),
                },
            },
        }

    def node_not_ready(self, node: str) -> None:
        """The node stops reporting: Ready=False, the not-ready NoExecute taint, its pods' Ready conditions False.
        Its pods are no longer run or finalised (a pod deleted there stays Terminating until force-deleted)."""
        with self._lock:
            now = timestamp()
            self.api.patch_status(
                "nodes",
                None,
                node,
                {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "False",
                            "reason": "KubeletNotReady",
                            "message": "node is not ready",
                            "lastHeartbeatTime": now,
                            "lastTransitionTime": now,
                        }
                    ]
                },
            )
            self.api.patch(
                "nodes",
                None,
                node,
                {
                    "spec": {
                        "taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute", "timeAdded": now}]
                    }
                },
            )
            for pod in self.api.list("pods", field_selector=f"spec.nodeName={node}"):
                status = pod.get("status") or {}
                if status.get("phase") in TERMINAL:
                    continue
                conditions = [
                    c
                    if c.get("type") not in ("Ready", "ContainersReady")
                    else {**c, "status": "False", "lastTransitionTime": now}
                    for c in status.get("conditions") or ()
                ]
                self._ignore_gone(
                    self.api.patch_status,
                    "pods",
                    _meta(pod)["namespace"],
                    _meta(pod)["name"],
                    {"conditions": conditions},
                )
            self._on_node_lost(node)

    def node_ready(self, node: str) -> None:
        with self._lock:
            now = timestamp()
            self.api.patch_status(
                "nodes",
                None,
                node,
                {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": now,
                            "lastTransitionTime": now,
                        }
                    ]
                },
            )
            self.api.patch("nodes", None, node, {"spec": {"taints": None}})

    def _on_node_lost(self, node: str) -> None:
        """Hook: ProcessCluster kills the node's processes."""

    # job controller

    def _sync_job(self, job: dict, pods: list[dict]) -> None:
        meta, spec, status = _meta(job), job.get("spec") or {}, job.get("status") or {}
        if meta.get("deletionTimestamp"):
            return
        uid, namespace = meta["uid"], meta["namespace"]
        track = self._jobs.setdefault(uid, _JobTrack())
        owned = [p for p in pods if controller_uid(p) == uid]
        present = {_meta(p)["uid"] for p in owned}
        for pod in owned:
            puid, phase = _meta(pod)["uid"], (pod.get("status") or {}).get("phase")
            track.seen[puid] = pod_index(pod)
            if phase == "Succeeded":
                track.succeeded[puid] = pod_index(pod)
            elif puid not in track.excluded and (phase == "Failed" or _meta(pod).get("deletionTimestamp")):
                track.failed.add(puid)
        for puid in track.seen:
            if puid not in present and puid not in track.succeeded and puid not in track.excluded:
                track.failed.add(puid)
        live = [p for p in owned if (p.get("status") or {}).get("phase") not in TERMINAL]
        active = [p for p in live if not _meta(p).get("deletionTimestamp")]
        terminating = [p for p in live if _meta(p).get("deletionTimestamp")]
        conditions = [dict(c) for c in status.get("conditions") or ()]
        finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)
        now = timestamp()
        indexed = spec.get("completionMode") == "Indexed"
        completions = spec.get("completions")
        succeeded_indexes = {i for i in track.succeeded.values() if i is not None}
        new_status: dict[str, Any] = {k: v for k, v in status.items() if k in ("startTime", "completionTime")}

        def set_condition(kind: str, value: str, reason: str, message: str) -> None:
            old = next((c for c in conditions if c.get("type") == kind), None)
            if old is not None and old.get("status") == value and old.get("reason") == reason:
                return
            new = {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": message,
                "lastProbeTime": now,
                "lastTransitionTime": now
                if old is None or old.get("status") != value
                else old.get("lastTransitionTime", now),
            }
            if old is None:
                conditions.append(new)
            else:
                conditions[conditions.index(old)] = new

        if not finished:
            suspended = bool(spec.get("suspend"))
            if suspended:
                for pod in active:
                    track.excluded.add(_meta(pod)["uid"])
                    self._ignore_gone(self.api.delete, "pods", namespace, _meta(pod)["name"])
                active = []
                set_condition("Suspended", "True", "JobSuspended", "Job suspended")
                new_status.pop("startTime", None)
            else:
                suspended_condition = next((c for c in conditions if c.get("type") == "Suspended"), None)
                if suspended_condition is not None and suspended_condition.get("status") == "True":
                    set_condition("Suspended", "False", "JobResumed", "Job resumed")
                    new_status.pop("startTime", None)
                if len(track.failed) > int(spec.get("backoffLimit", 6)):
                    message = "Job has reached the specified backoff limit"
                    set_condition("FailureTarget", "True", "BackoffLimitExceeded", message)
                    set_condition("Failed", "True", "BackoffLimitExceeded", message)
                    for pod in active:
                        track.excluded.add(_meta(pod)["uid"])
                        self._ignore_gone(self.api.delete, "pods", namespace, _meta(pod)["name"])
                    active = []
                elif self._job_complete(indexed, completions, succeeded_indexes, len(track.succeeded), active):
                    set_condition(
                        "SuccessCriteriaMet", "True", "CompletionsReached", "Reached expected number of succeeded pods"
                    )
                    set_condition("Complete", "True", "CompletionsReached", "Reached expected number of succeeded pods")
                    new_status["completionTime"] = now
                else:
                    new_status.setdefault("startTime", now)
                    active += self._create_pods(job, track, active, succeeded_indexes)
        new_status.update(
            {
                "active": len(active),
                "ready": sum(1 for p in active if (_condition(p, "Ready") or {}).get("status") == "True"),
                "succeeded": len(track.succeeded),
                "failed": len(track.failed),
                "terminating": len(terminating),
                "uncountedTerminatedPods": {},
            }
        )
        if indexed and succeeded_indexes:
            new_status["completedIndexes"] = _compact_ranges(succeeded_indexes)
        if conditions:
            new_status["conditions"] = conditions
        if new_status != status:
            self.api.replace(
                {**job, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}, "status": new_status},
                subresource="status",
            )

    @staticmethod
    def _job_complete(
        indexed: bool, completions: int | None, succeeded_indexes: set[int], succeeded: int, active: list
    ) -> bool:
        if indexed:
            return completions is not None and succeeded_indexes >= set(range(completions))
        if completions is None:  # work queue: done when one succeeded and none is left running
            return succeeded > 0 and not active
        return succeeded >= completions

    def _create_pods(self, job: dict, track: _JobTrack, active: list[dict], succeeded_indexes: set[int]) -> list:
        spec = job.get("spec") or {}
        parallelism = int(spec.get("parallelism", 1))
        completions = spec.get("completions")
        room = parallelism - len(active)
        if room <= 0:
            return []
        if spec.get("completionMode") == "Indexed":
            taken = {pod_index(p) for p in active} | succeeded_indexes
            wanted: list[int | None] = [i for i in range(int(completions)) if i not in taken][:room]
        else:
            remaining = (int(completions) - len(track.succeeded)) if completions is not None else parallelism
            wanted = [None] * max(0, min(room, remaining - len(active)))
        created = []
        for index in wanted:
            pod = self._pod_for(job, index)
            try:
                created.append(self.api.create(pod))
            except ApiError as exc:
                if exc.code == 409:
                    continue
                if exc.message not in track.create_errors:  # FailedCreate, once per distinct error
                    track.create_errors.add(exc.message)
                    self._event(job, "Warning", "FailedCreate", f"Error creating: {exc.message}")
                continue
            track.seen[_meta(created[-1])["uid"]] = index
            self._event(job, "Normal", "SuccessfulCreate", f"Created pod: {_meta(created[-1])['name']}")
        return created

    def _pod_for(self, job: dict, index: int | None) -> dict:
        meta, spec = _meta(job), job.get("spec") or {}
        template = spec.get("template") or {}
        tmeta = template.get("metadata") or {}
        pod_spec = dict(template.get("spec") or {})
        labels = dict(tmeta.get("labels") or {})
        labels.update(
            {
                "job-name": meta["name"],
                "batch.kubernetes.io/job-name": meta["name"],
                "controller-uid": meta["uid"],
                "batch.kubernetes.io/controller-uid": meta["uid"],
            }
        )
        annotations = dict(tmeta.get("annotations") or {})
        if index is not None:
            labels[JOB_INDEX_KEY] = str(index)
            annotations[JOB_INDEX_KEY] = str(index)
            pod_spec.setdefault("hostname", f"{meta['name']}-{index}")
            index_env = {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_INDEX_KEY}']"}},
            }
            pod_spec["containers"] = [
                {**c, "env": [*(c.get("env") or ()), index_env]}
                if not any(e.get("name") == "JOB_COMPLETION_INDEX" for e in c.get("env") or ())
                else c
                for c in pod_spec.get("containers") or ()
            ]
        name = (
            f"{meta['name']}-{index}-{_random_suffix()}" if index is not None else f"{meta['name']}-{_random_suffix()}"
        )
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        }

    def _event(self, obj: dict, kind: str, reason: str, message: str, component: str = "job-controller") -> None:
        meta = _meta(obj)
        now = timestamp()
        self._ignore_gone(
            self.api.create,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                    "namespace": meta.get("namespace") or "default",
                },
                "involvedObject": {
                    "apiVersion": obj.get("apiVersion"),
                    "kind": obj.get("kind"),
                    "name": meta["name"],
                    "namespace": meta.get("namespace"),
                    "uid": meta["uid"],
                },
                "type": kind,
                "reason": reason,
                "message": message,
                "source": {"component": component},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "reportingComponent": component,
            },
        )

    # scheduler

    def _schedule(self, pods: list[dict], nodes: dict[str, dict]) -> None:
        load = {name: 0 for name in nodes}
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            if node in load and (pod.get("status") or {}).get("phase") not in TERMINAL:
                load[node] += 1
        for pod in pods:
            spec, meta = pod.get("spec") or {}, _meta(pod)
            if (
                spec.get("nodeName")
                or meta.get("deletionTimestamp")
                or (pod.get("status") or {}).get("phase") in TERMINAL
            ):
                continue
            selector = spec.get("nodeSelector") or {}
            candidates = [
                name
                for name, node in nodes.items()
                if is_ready_node(node)
                and not any(
                    t.get("effect") in ("NoSchedule", "NoExecute") for t in (node.get("spec") or {}).get("taints") or ()
                )
                and all(_meta(node).get("labels", {}).get(k) == v for k, v in selector.items())
            ]
            if not candidates:
                if meta["uid"] not in self._unschedulable:
                    self._unschedulable.add(meta["uid"])
                    self._ignore_gone(
                        self.api.patch_status,
                        "pods",
                        meta["namespace"],
                        meta["name"],
                        {
                            "conditions": [
                                {
                                    "type": "PodScheduled",
                                    "status": "False",
                                    "reason": "Unschedulable",
                                    "message": f"0/{len(nodes)} nodes are available",
                                    "lastTransitionTime": timestamp(),
                                }
                            ]
                        },
                    )
                continue
            node = min(candidates, key=lambda name: (load[name], self.node_order(name)))
            load[node] += 1
            self._unschedulable.discard(meta["uid"])
            self._ignore_gone(self.api.patch, "pods", meta["namespace"], meta["name"], {"spec": {"nodeName": node}})
            self._ignore_gone(
                self.api.patch_status,
                "pods",
                meta["namespace"],
                meta["name"],
                {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": timestamp()}]},
            )

    def node_order(self, name: str) -> tuple[int, str]:
        return (self.node_names.index(name) if name in self.node_names else len(self.node_names), name)

    # kubelet

    def _kubelet(self, pods: list[dict], nodes: dict[str, dict]) -> None:
        present = set()
        for pod in pods:
            meta, spec = _meta(pod), pod.get("spec") or {}
            present.add(meta["uid"])
            node = nodes.get(spec.get("nodeName") or "")
            if node is None or not is_ready_node(node):
                continue  # unscheduled, or a lost node: nothing runs, nothing is finalised
            if meta.get("deletionTimestamp"):
                self._ignore_gone(self._terminate, pod)
                continue
            phase = (pod.get("status") or {}).get("phase")
            if (
                phase == "Pending"
                and meta["uid"] not in self._held
                and (self.auto_run or meta["uid"] in self._released)
            ):
                self._ignore_gone(self._start, pod, node)
            elif phase == "Running":
                self._ignore_gone(self._sync_running, pod)
        self._reap(present)
        for uid in list(self._terminating):
            if uid not in present:
                del self._terminating[uid]

    def _allocate_ip(self, pod: dict, node: str | None = None) -> str:
        node = node or (pod.get("spec") or {}).get("nodeName") or ""
        counter = self._ip_counters.setdefault(node, itertools.count(2))
        n = next(counter)
        return (
            f"{self.pod_ip_prefix}.{self.node_order(node)[0] + 1}.{n}"
            if n < 255
            else f"{self.pod_ip_prefix}.{self.node_order(node)[0] + 101}.{n % 250 + 2}"
        )

    def _start(self, pod: dict, node: dict) -> None:
        """Pending -> Running (FakeCluster: nothing runs)."""
        self._write_status(pod, self._running_status(pod, node, self._allocate_ip(pod, _meta(node)["name"])))

    def _sync_running(self, pod: dict) -> None:
        """Hook: ProcessCluster reports processes that exited."""

    def _reap(self, present: set[str]) -> None:
        """Hook: pods gone from the API (ProcessCluster kills what still runs)."""

    def _terminate(self, pod: dict) -> None:
        """A pod is being deleted: after ``termination_delay`` its containers stop (143) and it is removed."""
        uid = _meta(pod)["uid"]
        seen = self._terminating.setdefault(uid, time.monotonic())
        if time.monotonic() - seen < self.termination_delay:
            return
        status = pod.get("status") or {}
        if status.get("phase") not in TERMINAL:
            self._write_status(
                pod,
                self._terminated_status(
                    pod, {c["name"]: (143, "Error", None) for c in (pod.get("spec") or {}).get("containers") or ()}
                ),
            )
        self._remove_pod(pod)

    def _remove_pod(self, pod: dict) -> None:
        meta = _meta(pod)
        self._ignore_gone(self.api.delete, "pods", meta["namespace"], meta["name"], grace_period_seconds=0)
        self._terminating.pop(meta["uid"], None)

    def _write_status(self, pod: dict, status: dict) -> dict | None:
        meta = _meta(pod)
        return self._ignore_gone(self.api.patch_status, "pods", meta["namespace"], meta["name"], status)

    @staticmethod
    def _conditions(ready: bool, reason: str | None = None) -> list[dict]:
        now = timestamp()
        conditions = [
            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True" if ready else "False", "lastTransitionTime": now},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        ]
        if reason:
            for condition in conditions[2:4]:
                condition["reason"] = reason
        return conditions

    def _running_status(self, pod: dict, node: dict | None, ip: str) -> dict:
        now = timestamp()
        host_ip = next(
            (
                a["address"]
                for a in (node or {}).get("status", {}).get("addresses") or ()
                if a.get("type") == "InternalIP"
            ),
            "10.0.0.1",
        )
        return {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": (pod.get("status") or {}).get("startTime") or now,
            "conditions": self._conditions(True),
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": f"{c.get('image', '')}@sha256:0",
                    "containerID": f"containerd://{uuid.uuid4().hex}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                    "lastState": {},
                }
                for c in (pod.get("spec") or {}).get("containers") or ()
            ],
        }

    def _terminated_status(self, pod: dict, results: dict[str, tuple[int, str, str | None]]) -> dict:
        """``results``: container name -> (exit code, reason, termination message)."""
        now = timestamp()
        status = pod.get("status") or {}
        old = {c.get("name"): c for c in status.get("containerStatuses") or ()}
        statuses = []
        for container in (pod.get("spec") or {}).get("containers") or ():
            name = container["name"]
            previous = old.get(name) or {}
            started = ((previous.get("state") or {}).get("running") or {}).get("startedAt") or now
            code, reason, message = results.get(name, (0, "Completed", None))
            terminated = {
                "exitCode": code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now,
                "containerID": previous.get("containerID") or f"containerd://{uuid.uuid4().hex}",
            }
            if message:
                terminated["message"] = message
            statuses.append(
                {
                    "name": name,
                    "image": container.get("image", ""),
                    "imageID": previous.get("imageID", ""),
                    "containerID": terminated["containerID"],
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                    "lastState": {},
                }
            )
        succeeded = all(s["state"]["terminated"]["exitCode"] == 0 for s in statuses)
        return {
            "phase": "Succeeded" if succeeded else "Failed",
            "conditions": self._conditions(False, "PodCompleted" if succeeded else "PodFailed"),
            "containerStatuses": statuses,
        }

    # test controls

    def pods(self, run: str | None = None, job: str | None = None, namespace: str | None = None) -> list[dict]:
        """Pods (of a TrainingRun by its ``stagerun.io/run`` label, of a Job by ``job-name``), by job, index, age."""
        selector = ",".join(filter(None, [f"{LABEL_RUN}={run}" if run else "", f"job-name={job}" if job else ""]))
        pods = self.api.list("pods", namespace, selector or None)
        return sorted(
            pods,
            key=lambda p: (
                (_meta(p).get("labels") or {}).get("job-name", ""),
                pod_index(p) if pod_index(p) is not None else -1,
                int(_meta(p)["resourceVersion"]),
            ),
        )

    def pod(self, ref: dict | str, namespace: str | None = None) -> dict:
        """The current state of a pod given by name (any namespace unless given) or as an object."""
        if isinstance(ref, dict):
            namespace, ref = _meta(ref).get("namespace"), _meta(ref)["name"]
        found = self.api.list("pods", namespace, field_selector=f"metadata.name={ref}")
        if not found:
            raise LookupError(f"no pod {ref!r}")
        return found[0]

    def wait_for_pods(
        self,
        count: int,
        *,
        run: str | None = None,
        job: str | None = None,
        phase: str | None = "Running",
        timeout: float = 10.0,
    ) -> list[dict]:
        """Wait until ``count`` pods (not being deleted) are in ``phase`` (any phase when None); returns them."""

        def ready() -> list[dict] | None:
            pods = [
                p
                for p in self.pods(run, job)
                if not _meta(p).get("deletionTimestamp")
                and (phase is None or (p.get("status") or {}).get("phase") == phase)
            ]
            return pods if len(pods) >= count else None

        return self.api.wait_for(
            ready,
            timeout,
            message=lambda: (
                f"{count} pods {phase}: "
                f"{[(_meta(p)['name'], (p.get('status') or {}).get('phase')) for p in self.pods()]}"
            ),
        )

    def set_running(self, pod: dict | str) -> dict:
        """Start a pod held Pending (``auto_run=False`` or ``image_pull_backoff``) now."""
        with self._lock:
            current = self.pod(pod)
            uid = _meta(current)["uid"]
            self._held.discard(uid)
            self._released.add(uid)
            node = self.api.get("nodes", (current.get("spec") or {}).get("nodeName") or "")
            if node is None:
                self.tick()
                current = self.pod(current)
                node = self.api.get("nodes", (current.get("spec") or {}).get("nodeName") or "")
            if (current.get("status") or {}).get("phase") == "Pending" and node is not None:
                self._start(current, node)
            return self.pod(current)

    def succeed(self, pod: dict | str, message: str | None = None) -> dict:
        """The pod's containers exit 0 (``message`` as the termination message): phase Succeeded."""
        return self._finish(pod, 0, "Completed", message)

    def fail(self, pod: dict | str, exit_code: int = 1, reason: str = "Error", message: str | None = None) -> dict:
        """The pod's containers exit ``exit_code`` with ``reason``: phase Failed."""
        return self._finish(pod, exit_code, reason, message)

    def oom_kill(self, pod: dict | str) -> dict:
        return self._finish(pod, 137, "OOMKilled", None)

    def _finish(self, pod: dict | str, code: int, reason: str, message: str | None) -> dict:
        with self._lock:
            current = self.pod(pod)
            containers = (current.get("spec") or {}).get("containers") or ()
            results = {c["name"]: (code, reason, message if i == 0 else None) for i, c in enumerate(containers)}
            self._write_status(current, self._terminated_status(current, results))
            return self.pod(current)

    def image_pull_backoff(self, pod: dict | str, reason: str = "ImagePullBackOff") -> dict:
        """The image cannot be pulled: the pod stays Pending, its containers waiting with ``reason``."""
        with self._lock:
            current = self.pod(pod)
            self._held.add(_meta(current)["uid"])
            statuses = [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "lastState": {},
                    "state": {
                        "waiting": {"reason": reason, "message": f'Back-off pulling image "{c.get("image", "")}"'}
                    },
                }
                for c in (current.get("spec") or {}).get("containers") or ()
            ]
            self._write_status(
                current,
                {
                    "phase": "Pending",
                    "containerStatuses": statuses,
                    "conditions": self._conditions(False, "ContainersNotReady"),
                },
            )
            return self.pod(current)

    def lose_pod(self, pod: dict | str) -> None:
        """The pod vanishes as a lost node's pod does (a force delete): no termination, no final status."""
        with self._lock:
            current = self.pod(pod)
            self._ignore_gone(
                self.api.delete, "pods", _meta(current)["namespace"], _meta(current)["name"], grace_period_seconds=0
            )

    def succeed_job(self, job: str, message: str | None = None, namespace: str | None = None) -> None:
        """Every live pod of the Job succeeds; index 0 (or the first pod) carries ``message``."""
        with self._lock:
            pods = [
                p
                for p in self.pods(job=job, namespace=namespace)
                if (p.get("status") or {}).get("phase") not in TERMINAL and not _meta(p).get("deletionTimestamp")
            ]
            if not pods:
                raise LookupError(f"job {job!r} has no live pods")
            first = min(pods, key=lambda p: pod_index(p) if pod_index(p) is not None else 0)
            for pod in pods:
                self.succeed(pod, message if pod is first else None)
