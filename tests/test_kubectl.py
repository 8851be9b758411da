"""What a user sees with kubectl (v1.36, built beside the control plane) while the real operator runs a TrainingRun:
`kubectl get trainingruns` fills the CRD's printer columns (STATE PHASE STEP TOKENS LOSS TOK/S RESTARTS AGE, as the
chart's NOTES.txt promises) from the run's status, and `kubectl describe trainingrun` shows the operator's Events.

The run's pods are kwok's (tests/cluster/kwok_pods.py); rank 0's progress comes from the test's ``progress`` table,
which the operator's poll of the pod IP reads.
"""

from __future__ import annotations

import re
import time

import pytest
from cluster.control_plane import ControlPlane
from cluster.operator import Harness, operator_harness

pytestmark = pytest.mark.usefixtures("trainingrun_crd")
COLUMNS = ["NAME", "STATE", "PHASE", "STEP", "TOKENS", "LOSS", "TOK/S", "RESTARTS", "AGE"]


@pytest.fixture
def running_run(control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch):
    """A quickstart run at step 12 with a committed checkpoint, as its status and Events tell it."""
    with operator_harness(control_plane, namespace, monkeypatch, nodes=1) as h:
        h.create(h.manifest())
        pod = h.pods.wait_for_pods(1, job="quickstart-a1")[0]
        h.rank_zero_reports(
            pod,
            step=12,
            tokens=98304,
            loss=6.54321,
            tokensPerSecond=4999.7,
            phaseIndex=0,
            lastStepAt=time.time(),
            lastCheckpoint={
                "path": "s3://bucket/runs/quickstart/step-8",
                "step": 8,
                "tokens": 65536,
                "time": time.time(),
            },
        )
        h.wait(lambda: h.status().get("step") == 12, "progress never reached the status")
        h.wait(lambda: "CheckpointCommitted" in h.reasons(), "no CheckpointCommitted event")
        yield h


def get_row(h: Harness) -> dict[str, str]:
    out = h.plane.kubectl("get", "trainingruns", "-n", h.namespace).stdout
    header, *rows = out.splitlines()
    assert header.split() == COLUMNS, out
    assert len(rows) == 1, out
    return dict(zip(COLUMNS, rows[0].split(), strict=True))


def test_kubectl_get_shows_state_phase_and_progress_in_the_printer_columns(running_run: Harness):
    h = running_run
    row = get_row(h)
    age = row.pop("AGE")
    assert row == {
        "NAME": "quickstart",
        "STATE": "Running",
        "PHASE": "core",
        "STEP": "12",
        "TOKENS": "98304",
        "LOSS": "6.5432",
        "TOK/S": "5000",
        "RESTARTS": "0",
    }
    assert re.fullmatch(r"\d+s", age), age  # created seconds ago

    # A rank fails: the columns follow the run through its restart.
    h.pods.fail(h.pods.wait_for_pods(1, job="quickstart-a1")[0], exit_code=1)
    h.wait(lambda: h.status().get("attempt") == 2 and h.status().get("state") == "Running", "no second attempt")
    row = get_row(h)
    assert (row["STATE"], row["RESTARTS"], row["STEP"]) == ("Running", "1", "12")


def test_kubectl_describe_shows_the_operators_events(running_run: Harness):
    h = running_run
    h.pods.fail(h.pods.wait_for_pods(1, job="quickstart-a1")[0], exit_code=3)
    h.wait(lambda: "Restarted" in h.reasons(), "no Restarted event")
    # The new attempt is Starting until kwok runs its pod.
    h.wait(lambda: h.status().get("attempt") == 2 and h.status().get("state") == "Running", "attempt 2 not running")
    out = h.plane.kubectl("describe", "trainingrun", "quickstart", "-n", h.namespace).stdout
    status, _, events = out.partition("\nEvents:")
    assert events, out
    assert re.search(r"^\s*State:\s+Running$", status, re.M), status
    assert re.search(r"^\s*Restarts:\s+1$", status, re.M), status
    # Each event line: Type, Reason, Age, From, Message. The operator posts them through kopf.
    lines = {reason: line for line in events.splitlines() if (reason := _reason(line))}
    for kind, reason, words in [
        ("Normal", "Launched", "starting the run: attempt 1, phase core"),
        ("Normal", "CheckpointCommitted", "checkpoint step 8"),
        ("Warning", "PodFailed", "exited with code 3"),
        ("Normal", "RestartScheduled", "restart 1/10"),
        ("Normal", "Restarted", "restart 1, resuming from checkpoint step 8"),
    ]:
        assert reason in lines, events
        assert lines[reason].split()[0] == kind and words in lines[reason], lines[reason]


def _reason(line: str) -> str | None:
    fields = line.split()
    return fields[1] if len(fields) > 2 and fields[0] in ("Normal", "Warning") else None
