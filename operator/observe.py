"""What the operator sees of one attempt, reduced to plain values the state machine can decide on.

These views are built from raw API objects (dicts) by the handlers and from literals by the unit tests, so the
state machine never touches the Kubernetes API. The trainer's messages in them (a pod's termination message, rank 0's
/progress) are the typed ones of ``stagerun.core.protocol``; given in their JSON form (a dict, as tests write them),
they are parsed on construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from stagerun.core.protocol import Progress, TerminationMessage, from_json_dict

from . import naming

# Container waiting reasons that will not go away by retrying: the run is Failed with the reason shown.
PERMANENT_WAITING = {"InvalidImageName"}
# Waiting reasons that often pass (a registry hiccup, a rate limit, a Secret or ConfigMap created a moment later):
# the gang waits for them up to a deadline (Settings.image_pull_deadline_seconds), then the run is Failed.
TRANSIENT_WAITING = {"ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "CreateContainerError"}


@dataclass(frozen=True)
class PodView:
    name: str
    index: int
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    node_ready: bool = True
    node_not_ready_since: float | None = None  # when the pod's node last turned NotReady
    deleting_since: float | None = None  # deletionTimestamp (seconds since epoch)
    waiting_reason: str | None = None
    waiting_message: str | None = None  # the kubelet's words for it (which image, which Secret key)
    exit_code: int | None = None  # set once the trainer container terminated
    terminated_reason: str | None = None  # Completed, Error, OOMKilled, ...
    message: TerminationMessage | None = None  # the termination message (written by `stagerun launch`)
    unschedulable: str | None = None  # the scheduler's message while PodScheduled is False (Unschedulable)
    failed_reason: str | None = None  # status.reason of a pod that failed as a whole (Evicted, OutOfcpu, ...)
    failed_message: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.message, Mapping):
            object.__setattr__(self, "message", from_json_dict(TerminationMessage, dict(self.message)))


@dataclass(frozen=True)
class JobView:
    name: str
    attempt: int
    completions: int
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_condition: str | None = None  # reason of a Failed condition (e.g. BackoffLimitExceeded)
    suspended: bool = False  # spec.suspend: a queue (Kueue) holds it, before admission or after a preemption


@dataclass(frozen=True)
class Observation:
    now: float
    job: JobView | None = None
    pods: tuple[PodView, ...] = ()
    progress: Progress | None = None  # rank 0's /progress answer, when reachable
    # The Job controller's FailedCreate messages, oldest first (quota, Pod Security, a missing ServiceAccount, a
    # webhook): read only while the gang is Starting, the one time they explain anything.
    job_warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.progress, Mapping):
            object.__setattr__(self, "progress", from_json_dict(Progress, dict(self.progress)))


def timestamp(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def pod_view(pod: dict, not_ready_nodes: dict[str, float] | None) -> PodView:
    """``not_ready_nodes``: NotReady node name -> since when (None: node readiness unknown, taken as ready)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {}) or {}
    labels, annotations = meta.get("labels", {}), meta.get("annotations", {})
    index = annotations.get(naming.JOB_INDEX_ANNOTATION, labels.get(naming.JOB_INDEX_ANNOTATION, "0"))
    waiting = terminated = None
    for container in status.get("containerStatuses", []) or []:
        if container.get("name") == naming.CONTAINER:
            state = container.get("state", {}) or {}
            waiting, terminated = state.get("waiting"), state.get("terminated")
    text = (terminated or {}).get("message")
    message = TerminationMessage.from_json(text) if text else None
    node = spec.get("nodeName")
    scheduled: dict = next((c for c in status.get("conditions") or () if c.get("type") == "PodScheduled"), {})
    unschedulable = scheduled.get("message") or "unschedulable" if scheduled.get("status") == "False" else None
    not_ready_since = (not_ready_nodes or {}).get(node) if node else None
    return PodView(
        name=meta["name"],
        index=int(index),
        phase=status.get("phase", "Pending"),
        node_ready=not_ready_since is None,
        node_not_ready_since=not_ready_since,
        deleting_since=timestamp(meta.get("deletionTimestamp")),
        waiting_reason=(waiting or {}).get("reason"),
        waiting_message=(waiting or {}).get("message"),
        exit_code=(terminated or {}).get("exitCode"),
        terminated_reason=(terminated or {}).get("reason"),
        message=message,
        unschedulable=unschedulable,
        failed_reason=status.get("reason") if status.get("phase") == "Failed" else None,
        failed_message=status.get("message") if status.get("phase") == "Failed" else None,
    )


def job_view(job: dict) -> JobView:
    meta, status = job["metadata"], job.get("status", {}) or {}
    conditions = {c.get("type"): c for c in status.get("conditions", []) or [] if c.get("status") == "True"}
    return JobView(
        name=meta["name"],
        attempt=int(meta.get("labels", {}).get(naming.LABEL_ATTEMPT, "0")),
        completions=job.get("spec", {}).get("completions", 1),
        succeeded=status.get("succeeded", 0) or 0,
        failed=status.get("failed", 0) or 0,
        complete="Complete" in conditions,
        failed_condition=conditions["Failed"].get("reason", "Failed") if "Failed" in conditions else None,
        suspended=bool(job.get("spec", {}).get("suspend")),
    )


def failed_create_messages(events: list[dict]) -> tuple[str, ...]:
    """The Job controller's FailedCreate Warnings among a Job's Events, oldest first."""
    mine = [e for e in events if e.get("reason") == "FailedCreate" and e.get("type") == "Warning"]
    mine.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return tuple(e.get("message", "") for e in mine)


def not_ready_nodes(nodes: list[dict]) -> dict[str, float]:
    """NotReady (or Unknown) nodes and since when their Ready condition says so."""
    result = {}
    for node in nodes:
        for condition in node.get("status", {}).get("conditions", []) or []:
            if condition.get("type") == "Ready" and condition.get("status") != "True":
                result[node["metadata"]["name"]] = timestamp(condition.get("lastTransitionTime")) or 0.0
    return result


def job_change_matters(job: dict) -> bool:
    """A Job's change that decides something for its run: a pod of it failed (``status.failed``: an exit code, an
    eviction, a lost node's pod), it completed, failed or was suspended, or it is being deleted. A queue's admission
    and pods that start are seen at the run's next timer tick."""
    status = job.get("status") or {}
    ended = any(
        c.get("type") in ("Complete", "Failed", "Suspended") and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    return ended or bool(status.get("failed")) or bool(job.get("metadata", {}).get("deletionTimestamp"))
