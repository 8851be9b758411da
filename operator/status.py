"""The vocabulary of a TrainingRun's status: its states and its Kubernetes-style conditions (pure).

``state.reconcile`` decides the state; this module turns a status into the ``status.conditions`` list that
``kubectl describe`` shows (type/status/reason/message/lastTransitionTime, as the API conventions ask).
"""

from __future__ import annotations

from datetime import UTC, datetime

from .observe import Observation

PENDING, QUEUED, STARTING, RUNNING, RESTARTING, SUSPENDING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending",
    "Queued",  # the attempt's Job is suspended by a queue (Kueue: waiting for admission, or preempted)
    "Starting",  # the Job exists, not every pod of the gang runs yet (creation, scheduling, image pulls)
    "Running",
    "Restarting",
    "Suspending",
    "Suspended",
    "Succeeded",
    "Failed",
)
TERMINAL = (SUCCEEDED, FAILED)
CONDITION_TYPES = ("Ready", "Progressing", "Suspended", "Failed", "Succeeded")


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def set_condition(conditions: list[dict], kind: str, status: bool, reason: str, message: str, now: float) -> list:
    """Kubernetes-style condition list; lastTransitionTime changes only when the status flips."""
    value = "True" if status else "False"
    out, found = [], False
    for condition in conditions:
        if condition.get("type") == kind:
            found = True
            since = condition.get("lastTransitionTime") if condition.get("status") == value else iso(now)
            condition = {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
            }
        out.append(condition)
    if not found:
        out.append(
            {"type": kind, "status": value, "reason": reason, "message": message, "lastTransitionTime": iso(now)}
        )
    return out


def conditions_for(status: dict, obs: Observation, now: float) -> list[dict]:
    state = status["state"]
    failure = status.get("lastFailure") or {}
    pods_running = bool(obs.pods) and all(p.phase == "Running" for p in obs.pods)
    waiting = status.get("waitingFor") or {}  # what keeps a Starting gang from running, in the cluster's words
    table = {
        "Ready": (
            state == RUNNING and pods_running,
            "PodsRunning" if state == RUNNING and pods_running else waiting.get("reason") or state,
            "every pod of the gang is running"
            if state == RUNNING and pods_running
            else waiting.get("message") or f"run is {state}",
        ),
        "Progressing": (
            state in (PENDING, QUEUED, STARTING, RUNNING, RESTARTING),
            state,
            status.get("message", "")
            if state in TERMINAL
            else f"attempt {status.get('attempt', 0)}, phase {status.get('phase', '')}",
        ),
        "Suspended": (
            state in (SUSPENDING, SUSPENDED),
            "SuspendRequested" if state in (SUSPENDING, SUSPENDED) else "NotSuspended",
            "spec.suspend is true" if state in (SUSPENDING, SUSPENDED) else "",
        ),
        "Failed": (
            state == FAILED,
            status.get("failureReason", failure.get("reason", "")) if state == FAILED else "NotFailed",
            status.get("message", "") if state == FAILED else "",
        ),
        "Succeeded": (
            state == SUCCEEDED,
            "AllPhasesDone" if state == SUCCEEDED else "NotFinished",
            status.get("message", "") if state == SUCCEEDED else "",
        ),
    }
    conditions = list(status.get("conditions", []))
    for kind in CONDITION_TYPES:
        value, reason, message = table[kind]
        conditions = set_condition(conditions, kind, value, reason or kind, message, now)
    return conditions
