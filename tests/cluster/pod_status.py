"""The pod status a process kubelet reports, in the shapes a kubelet writes them (sent as strategic merge patches
of the /status subresource, so the conditions of the scheduler and the Job controller stay beside these).

- waiting: phase Pending, each container waiting with a reason (ContainerCreating, CreateContainerConfigError);
- running: phase Running, podIP/podIPs, hostIP 127.0.0.1, the Ready, ContainersReady, Initialized,
  PodReadyToStartContainers and PodScheduled conditions, each container running (or terminated, after a
  StartError);
- terminated: phase Succeeded when every container exited 0, else Failed; each container terminated with its exit
  code, reason (Completed or Error) and message: the termination message file (at most 4096 bytes, the kubelet's
  cap), or, with `terminationMessagePolicy: FallbackToLogsOnError` and an empty file after a failure, the log's
  last 80 lines (at most 2048 bytes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

HOST_IP = "127.0.0.1"
MAX_MESSAGE = 4096
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(ready: bool, reason: str | None = None) -> list[dict]:
    stamp = now()
    found = [
        {"type": kind, "status": "True", "lastTransitionTime": stamp}
        for kind in ("PodReadyToStartContainers", "Initialized", "PodScheduled")
    ]
    for kind in ("ContainersReady", "Ready"):
        condition = {"type": kind, "status": "True" if ready else "False", "lastTransitionTime": stamp}
        if reason:
            condition["reason"] = reason
        found.append(condition)
    return found


def container_status(name: str, image: str, container_id: str, state: dict) -> dict:
    running = "running" in state
    return {
        "name": name,
        "image": image,
        "imageID": f"process://{image}",
        "containerID": container_id,
        "ready": running,
        "started": running,
        "restartCount": 0,
        "state": state,
    }


def termination_message(code: int, termination_log: Path, log: Path, policy: str) -> str:
    message = termination_log.read_bytes()[:MAX_MESSAGE].decode(errors="replace") if termination_log.exists() else ""
    if not message and code != 0 and policy == "FallbackToLogsOnError" and log.exists():
        lines = log.read_text(errors="replace").splitlines()[-FALLBACK_LINES:]
        message = "\n".join(lines)[-FALLBACK_BYTES:]
    return message


def terminated_state(code: int, started_at: str, message: str, reason: str | None = None) -> dict:
    state = {
        "exitCode": code,
        "reason": reason or ("Completed" if code == 0 else "Error"),
        "startedAt": started_at or now(),
        "finishedAt": now(),
    }
    if message:
        state["message"] = message
    return state


def waiting(containers: list[dict], reason: str, message: str) -> dict:
    return {
        "phase": "Pending",
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
            for c in containers
        ],
    }


def running(address: str, start_time: str | None, statuses: list[dict]) -> dict:
    all_running = all("running" in s["state"] for s in statuses)
    return {
        "phase": "Running",
        "podIP": address,
        "podIPs": [{"ip": address}],
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "startTime": start_time or now(),
        "conditions": conditions(all_running, None if all_running else "ContainersNotReady"),
        "containerStatuses": statuses,
    }


def terminated(statuses: list[dict]) -> dict:
    succeeded = all(s["state"]["terminated"]["exitCode"] == 0 for s in statuses)
    return {
        "phase": "Succeeded" if succeeded else "Failed",
        "conditions": conditions(False, "PodCompleted" if succeeded else "PodFailed"),
        "containerStatuses": statuses,
    }
