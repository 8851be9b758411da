"""High availability: two real `stagerun operator` processes peered through kopf's peering object, against the real
control plane; the active one is killed with SIGKILL and the standby takes over.

The operators run as the chart's pods do (`--peering NAME`, their priorities by start time, kopf's identity from
POD_ID), each as a ServiceAccount of its own, so the apiserver's audit log says which process made every request:
that is the evidence that exactly one of them acts. The peering CRDs are the chart's (charts/stagerun/crds/).
The keep-alive lifetime is LIFETIME_S instead of the chart's 30 s, so a takeover after a crash takes seconds.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from cluster.audit import AuditEvent, service_account_user
from cluster.control_plane import ControlPlane
from cluster.operator import (
    Harness,
    OperatorProcess,
    install_peering_crds,
    operator_harness,
    peering_records,
    service_account_kubeconfigs,
)

PEERING = "stagerun"
PEERING_OBJECT = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}  # the chart's
LIFETIME_S = 6  # STAGERUN_PEERING_LIFETIME_SECONDS here: keep-alives every second, records expire 6 s after
# How late a takeover may come beyond the record's expiry: the standby's wake-up, its own keep-alive write and the
# watch event it reads back, then the new watch streams (a loaded 2-core machine).
TAKEOVER_SLACK_S = 6.0
GRACEFUL_TAKEOVER_S = 4.0  # a SIGTERM'd operator removes its record on the way out: no expiry to wait for
RESUMED = "Resuming operations after the pause"
# What a paused kopf operator still asks for: its keep-alive and the peering watch, and kopf's discovery of
# namespaces and CRDs. Any other request (TrainingRuns, Jobs, pods, Events, ...) is the operator acting.
PEERING_ONLY = {"kopfpeerings", "customresourcedefinitions", "namespaces", ""}


@pytest.fixture
def plane(control_plane: ControlPlane, trainingrun_crd: str) -> ControlPlane:
    install_peering_crds(control_plane)
    return control_plane


class Peers:
    """The test's operator processes in one namespace, their identities and what each asked the apiserver."""

    def __init__(self, plane: ControlPlane, h: Harness, kubeconfigs: dict[str, Path], log_dir: Path):
        self.plane, self.h, self.kubeconfigs, self.log_dir = plane, h, kubeconfigs, log_dir
        self.running: list[OperatorProcess] = []

    def start(self, identity: str, account: str) -> OperatorProcess:
        args = ["-n", self.h.namespace, "--peering", PEERING]
        settings = {"STAGERUN_PEERING_LIFETIME_SECONDS": str(LIFETIME_S)}
        operator = OperatorProcess(identity, args, self.kubeconfigs[account], self.log_dir, settings)
        self.running.append(operator)
        return operator

    def records(self) -> dict[str, dict]:
        return peering_records(self.plane, self.h.namespace, PEERING)

    def requests(self, account: str) -> list[AuditEvent]:
        return self.plane.audit_events(service_account_user(self.h.namespace, account))

    def acting_requests(self, account: str) -> list[tuple[str, str, str | None]]:
        return [(e.verb, e.resource, e.name) for e in self.requests(account) if e.resource not in PEERING_ONLY]

    def job_creations(self) -> list[tuple[str, str | None, int]]:
        """(ServiceAccount, Job, response code) of every Job creation by either operator, in order (not the dry
        runs the operator makes before each launch: they store nothing)."""
        return [
            (e.username.rsplit(":", 1)[1], e.name, e.code)
            for account in self.kubeconfigs
            for e in self.requests(account)
            if (e.verb, e.group, e.resource) == ("create", "batch", "jobs") and "dryRun=" not in e.uri
        ]

    def stop_all(self) -> None:
        for operator in self.running:
            if operator.process.running:
                operator.stop()


def logged_at(h: Harness, operator: OperatorProcess, text: str, after: float, timeout: float) -> float:
    """When (seconds since the epoch, by its log's timestamp) ``operator`` first logged ``text`` at or after
    ``after``; waits up to ``timeout`` for it."""

    def find() -> float | None:
        operator.process.check_running()
        for line in operator.log().splitlines():
            if text in line:
                # logging's default asctime, "2026-05-09 08:40:01,123" (local time, this machine's clock)
                at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if at >= after - 0.01:  # the log's milliseconds are truncated
                    return at
        return None

    return h.wait(find, f"{operator.identity} never logged {text!r}", timeout)


def test_default_priorities_rank_by_start_time_and_never_tie():
    """kopf pauses every operator that sees a live peer of its own priority: the replicas of one Deployment share
    their arguments, so the default priority must differ between them, and rank the one that started first highest
    (a replacement pod must not take over from a healthy active one). Explicit priorities >= 0 outrank them all."""
    from stagerun.operator.main import seniority_priority

    started = 1_780_000_000.123  # 2026
    older, younger = seniority_priority(started, 999), seniority_priority(started + 0.01, 0)
    assert older > younger
    assert seniority_priority(started, 1) > seniority_priority(started, 2)  # same millisecond: the tie-break decides
    assert len({seniority_priority(started, t) for t in range(1000)}) == 1000
    assert -(2**53) < younger < older < 0  # exact in JSON, and below kopf's default 0 and its --dev 666
    with pytest.raises(ValueError, match="tiebreak"):
        seniority_priority(started, 1000)


def test_peering_and_standalone_exclude_each_other(capsys):
    import argparse

    from stagerun.operator.main import add_arguments

    parser = argparse.ArgumentParser(prog="stagerun operator")
    add_arguments(parser)
    args = parser.parse_args(["-A", "--peering", "stagerun"])
    assert (args.peering, args.standalone, args.priority) == ("stagerun", False, None)
    assert parser.parse_args(["--peering=x", "--priority", "5"]).priority == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["--standalone", "--peering", "stagerun"])
    assert "not allowed with argument --standalone" in capsys.readouterr().err


def test_standby_takes_over_from_a_killed_operator_without_duplicates(plane, namespace, monkeypatch, tmp_path):
    """kill -9 of the active operator: the standby takes over within the keep-alive lifetime, a pod failure during
    the gap still leads to exactly one new attempt, and the run's status (restarts, attempt, start time) carries on;
    a replacement joins as the standby, and a graceful stop (SIGTERM) hands over at once."""
    with (
        operator_harness(plane, namespace, monkeypatch, start=False) as h,
        service_account_kubeconfigs(plane, namespace, ["operator-a", "operator-b", "operator-c"], tmp_path) as creds,
    ):
        plane.request("POST", f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings", PEERING_OBJECT)
        peers = Peers(plane, h, creds, tmp_path)
        try:
            # -- two replicas: the first one started acts, the second waits ------------------------------------
            a = peers.start("pod-a", "operator-a")
            logged_at(h, a, RESUMED, 0, 60)  # mandatory peering starts paused until the peering object is read
            b = peers.start("pod-b", "operator-b")  # starts paused too, and stays so: pod-a outranks it
            h.wait(lambda: "pod-b" in peers.records(), "the second operator never wrote its keep-alive")
            records = peers.records()
            assert set(records) == {"pod-a", "pod-b"}, records
            assert records["pod-a"]["priority"] > records["pod-b"]["priority"], records  # the older one outranks
            assert records["pod-a"]["lifetime"] == LIFETIME_S

            h.create(h.manifest())
            pod = h.pods.wait_for_pods(1, job="quickstart-a1")[0]
            h.wait(lambda: h.status().get("state") == "Running", "the run never ran")
            before = h.status()
            assert before["attempt"] == 1 and before.get("restarts", 0) == 0
            assert peers.job_creations() == [("operator-a", "quickstart-a1", 201)]
            assert peers.requests("operator-b"), "the standby made no request at all: not the evidence it should be"
            assert not peers.acting_requests("operator-b"), "the standby acted while the active one was alive"
            assert RESUMED not in b.log()

            # -- kill -9 the active one; a pod fails while no operator acts ------------------------------------
            killed_at = time.time()
            a.kill()
            h.pods.fail(pod, exit_code=1)
            takeover_s = logged_at(h, b, RESUMED, killed_at, LIFETIME_S + TAKEOVER_SLACK_S + 30) - killed_at
            assert takeover_s <= LIFETIME_S + TAKEOVER_SLACK_S, f"takeover {takeover_s:.1f} s after kill -9"
            h.wait(lambda: h.status().get("attempt") == 2 and h.status().get("state") == "Running", "no attempt 2")
            after = h.status()
            assert after["restarts"] == 1 and after["lastFailure"]["reason"] == "PodFailed", after
            assert after["startTime"] == before["startTime"]  # the status carried on, not started over
            assert h.jobs() == ["quickstart-a2"]
            assert peers.job_creations() == [
                ("operator-a", "quickstart-a1", 201),
                ("operator-b", "quickstart-a2", 201),
            ]
            h.wait(lambda: "pod-a" not in peers.records(), "the dead operator's record was never cleaned up")

            # -- a replacement joins as the standby; a graceful stop hands over at once ------------------------
            c = peers.start("pod-c", "operator-c")
            h.wait(lambda: "pod-c" in peers.records(), "the replacement never wrote its keep-alive")
            records = peers.records()
            assert records["pod-b"]["priority"] > records["pod-c"]["priority"]  # younger: it does not take over
            pod = h.pods.wait_for_pods(1, job="quickstart-a2")[0]
            assert not peers.acting_requests("operator-c"), "the replacement acted beside the active operator"
            stopped_at = time.time()
            assert b.stop() == 0
            assert "pod-b" not in peers.records()  # its goodbye removed its record
            graceful_s = logged_at(h, c, RESUMED, stopped_at, 30) - stopped_at
            assert graceful_s <= GRACEFUL_TAKEOVER_S, f"takeover {graceful_s:.1f} s after SIGTERM"
            h.pods.fail(pod, exit_code=1)
            h.wait(lambda: h.status().get("attempt") == 3 and h.status().get("state") == "Running", "no attempt 3")
            final = h.status()
            assert final["restarts"] == 2 and final["startTime"] == before["startTime"], final
            assert peers.job_creations() == [
                ("operator-a", "quickstart-a1", 201),
                ("operator-b", "quickstart-a2", 201),
                ("operator-c", "quickstart-a3", 201),
            ]
            print(
                f"takeover: {takeover_s:.1f} s after kill -9 (lifetime {LIFETIME_S} s), {graceful_s:.1f} s after TERM"
            )
        finally:
            peers.stop_all()
