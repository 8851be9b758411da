"""The operator under the real Kueue controller (tests/cluster/kueue/: sigs.k8s.io/kueue v0.17.0 built from its Go
module, its CRDs and admission webhooks) on the real control plane: a TrainingRun with `spec.queueName` is Queued
while Kueue holds its Job suspended, runs once Kueue admits it, and a Kueue preemption sends it back to Queued
without spending its restart budget; the same Job (attempt) is admitted again, keeping its place in the queue.

Each test has a ResourceFlavor, a ClusterQueue with a nominal quota of GPUS nvidia.com/gpu and a LocalQueue in its
namespace, and two kwok nodes of one GPU each; a run's gang is two pods of one GPU, so the quota holds one run at a
time. Skips, naming tests/cluster/kueue/build.sh, when Kueue is not built.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from cluster.control_plane import ApiError, ControlPlane
from cluster.kueue import controller
from cluster.kueue.controller import API, NAMESPACE_LABEL, PRIORITY_LABEL, QUEUE_LABEL, Kueue
from cluster.kwok_pods import MERGE
from cluster.operator import Harness, operator_harness

GPUS = 2
GANG = {"nodes": 2, "gpusPerNode": 1}  # two pods of one GPU: a run takes the whole quota
LOCAL_QUEUE = "team"
WAIT_S = 90.0  # Kueue's scheduler, the Job controller, kwok and the operator in turn on a loaded 2-core machine


@pytest.fixture(scope="module")
def kueue(control_plane: ControlPlane, trainingrun_crd: str, tmp_path_factory) -> Iterator[Kueue]:
    if controller.missing():
        pytest.skip(controller.skip_reason())
    running = Kueue(control_plane, tmp_path_factory.mktemp("kueue"))
    running.start()
    yield running
    running.stop()


class Queues:
    """A ResourceFlavor, ClusterQueue and LocalQueue of the test's own, and the Workloads Kueue made for its Jobs."""

    def __init__(self, plane: ControlPlane, namespace: str):
        self.plane, self.namespace = plane, namespace
        key = uuid.uuid4().hex[:6]
        self.flavor, self.cluster_queue, self.priority_class = f"flavor-{key}", f"cq-{key}", f"high-{key}"
        self.made: list[str] = []

    def create(self) -> None:
        label, value = NAMESPACE_LABEL
        self.plane.request(
            "PATCH", f"/api/v1/namespaces/{self.namespace}", {"metadata": {"labels": {label: value}}}, MERGE
        )
        self._post("resourceflavors", {"metadata": {"name": self.flavor}})
        quotas = {"cpu": "1000", "memory": "10Ti", "nvidia.com/gpu": str(GPUS)}
        self._post(
            "clusterqueues",
            {
                "metadata": {"name": self.cluster_queue},
                "spec": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                    "resourceGroups": [
                        {
                            "coveredResources": list(quotas),
                            "flavors": [
                                {
                                    "name": self.flavor,
                                    "resources": [{"name": k, "nominalQuota": v} for k, v in quotas.items()],
                                }
                            ],
                        }
                    ],
                },
            },
        )
        self._post("workloadpriorityclasses", {"metadata": {"name": self.priority_class}, "value": 1000})
        self._post(
            f"namespaces/{self.namespace}/localqueues",
            {"metadata": {"name": LOCAL_QUEUE}, "spec": {"clusterQueue": self.cluster_queue}},
        )
        self.plane.wait_until(
            "the ClusterQueue Active",
            lambda: _condition(self.plane.request("GET", f"{API}/clusterqueues/{self.cluster_queue}"), "Active"),
            timeout_s=WAIT_S,
        )

    def delete(self) -> None:
        for path in reversed(self.made):
            try:
                self.plane.request("DELETE", f"{API}/{path}")
            except ApiError as exc:
                if exc.code != 404:
                    raise

    def _post(self, collection: str, body: dict) -> None:
        kind = {
            "resourceflavors": "ResourceFlavor",
            "clusterqueues": "ClusterQueue",
            "workloadpriorityclasses": "WorkloadPriorityClass",
        }.get(collection, "LocalQueue")
        self.plane.request(
            "POST", f"{API}/{collection}", {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": kind, **body}
        )
        self.made.append(f"{collection}/{body['metadata']['name']}")

    def workload_of(self, job: str) -> dict | None:
        """The Workload Kueue made for the Job ``job`` (found by its owner reference)."""
        items = self.plane.request("GET", f"{API}/namespaces/{self.namespace}/workloads")["items"]
        return next(
            (
                w
                for w in items
                if any(r["kind"] == "Job" and r["name"] == job for r in w["metadata"]["ownerReferences"])
            ),
            None,
        )

    def admitted(self, job: str) -> bool:
        return _condition(self.workload_of(job) or {}, "Admitted")

    def pending_message(self, job: str) -> str:
        """Why Kueue does not admit the Job's Workload (its QuotaReserved=False message), '' while there is none."""
        workload = self.workload_of(job) or {}
        reserved = next(
            (c for c in workload.get("status", {}).get("conditions") or () if c["type"] == "QuotaReserved"), {}
        )
        return reserved.get("message", "") if reserved.get("status") == "False" else ""


def _condition(obj: dict, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions") or ())


@pytest.fixture
def queues(kueue: Kueue, namespace: str) -> Iterator[Queues]:
    made = Queues(kueue.plane, namespace)
    try:
        made.create()
        yield made
    finally:
        made.delete()


@pytest.fixture
def harness(kueue: Kueue, queues: Queues, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    with operator_harness(kueue.plane, namespace, monkeypatch, nodes=2, gpus=1) as h:
        yield h
        for run in h.plane.request("GET", f"/apis/stagerun.io/v1alpha1/namespaces/{namespace}/trainingruns")["items"]:
            h.delete_run(run["metadata"]["name"])  # while the operator and Kueue run: Workloads go with their Jobs
        jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs?labelSelector={QUEUE_LABEL}"
        h.plane.request("DELETE", jobs, {"propagationPolicy": "Background"})  # a test's own queued Jobs
        h.wait(lambda: not queues.plane.request("GET", f"{API}/namespaces/{namespace}/workloads")["items"], "left")


def queued_run(h: Harness, name: str, **spec) -> dict:
    doc = h.manifest(queueName=LOCAL_QUEUE, resources=GANG, **spec)
    doc["metadata"]["name"] = name
    return doc


def job_suspended(h: Harness, job: str) -> bool:
    return bool((h.get("jobs", job) or {}).get("spec", {}).get("suspend"))


def gang_running(h: Harness, run: str) -> bool:
    status = h.status(run)
    pods = h.pods.pods(run=run)
    return (
        status.get("state") == "Running" and len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)
    )


def test_the_harness_finds_what_build_sh_builds_and_names_it_when_missing(monkeypatch, tmp_path):
    """The cache folder is the one build.sh writes (same key), and without it the tests skip naming the script."""
    import subprocess

    from conftest import ROOT

    printed = subprocess.run(
        [str(ROOT / controller.BUILD_COMMAND), "--print-root"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == str(controller.cache_root())
    monkeypatch.setenv("STAGERUN_CLUSTER_CACHE", str(tmp_path))
    assert controller.missing() == ["bin/kueue", "config/webhook-manifests.yaml", "config/crds"]
    assert controller.BUILD_COMMAND in controller.skip_reason() and str(tmp_path) in controller.skip_reason()


def test_kueue_listens_on_loopback_only(kueue: Kueue):
    assert kueue.listening(), "Kueue listens nowhere: the checks below would be vacuous"
    assert kueue.listening() <= {"127.0.0.1"}, kueue.listening()


def test_a_run_waits_queued_until_quota_frees_then_runs(harness: Harness, queues: Queues):
    h = harness
    h.create(queued_run(h, "first"))
    h.wait(lambda: gang_running(h, "first"), "the first run never ran", WAIT_S)
    assert queues.admitted("first-a1")

    h.create(queued_run(h, "second"))  # the quota is taken: Kueue keeps its Job suspended
    h.wait(lambda: queues.pending_message("second-a1"), "Kueue never said why the second run waits", WAIT_S)
    assert "insufficient unused quota" in queues.pending_message("second-a1"), queues.pending_message("second-a1")
    h.wait_state("Queued", WAIT_S, name="second")
    assert not h.holds_within(lambda: h.status("second").get("state") != "Queued", 5), h.status("second")
    status = h.status("second")
    assert status.get("restarts", 0) == 0 and status["attempt"] == 1
    assert job_suspended(h, "second-a1") and not h.pods.pods(run="second")
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["reason"] == "Queued"

    # The first run finishes: its Job completes, Kueue releases its quota and admits the second run's Job.
    done = json.dumps({"state": "complete", "step": 59, "tokens": 802816, "checkpoint": "s3://b/step-59"})
    h.pods.succeed_job("first-a1", message=done)
    h.wait_state("Succeeded", WAIT_S, name="first")
    h.wait(lambda: gang_running(h, "second"), "the second run never ran after the quota freed", WAIT_S)
    status = h.status("second")
    assert status.get("restarts", 0) == 0 and status["attempt"] == 1  # the same Job, admitted: no new attempt
    assert queues.admitted("second-a1") and not job_suspended(h, "second-a1")
    reasons = [e["reason"] for e in h.events() if e["involvedObject"]["name"] == "second"]
    assert "Queued" in reasons and "Admitted" in reasons, reasons


def high_priority_job(h: Harness, queues: Queues) -> dict:
    """A plain batch/v1 Job of a higher WorkloadPriorityClass that needs the whole GPU quota, created unsuspended
    (Kueue's Job webhook suspends it at admission)."""
    container = {
        "name": "main",
        "image": "registry.example.com/urgent:1",
        "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "urgent", "labels": {QUEUE_LABEL: LOCAL_QUEUE, PRIORITY_LABEL: queues.priority_class}},
        "spec": {
            "completions": 2,
            "parallelism": 2,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 0,
                    "nodeSelector": dict(h.node_selector),
                    "containers": [container],
                }
            },
        },
    }
    return h.plane.request("POST", f"/apis/batch/v1/namespaces/{h.namespace}/jobs", job)


def test_a_kueue_preemption_is_not_charged_to_max_restarts(harness: Harness, queues: Queues):
    h = harness
    h.create(queued_run(h, "low", maxRestarts=0))  # a restart charged for the preemption would fail it at once
    h.wait(lambda: gang_running(h, "low"), "the run never ran", WAIT_S)

    urgent = high_priority_job(h, queues)
    assert urgent["spec"]["suspend"] is True, "Kueue's Job webhook did not suspend the Job at creation"
    # Kueue preempts the run's Workload: it suspends the run's Job and the Job controller stops its pods, whose
    # trainers checkpoint on SIGTERM and exit.
    h.wait(lambda: job_suspended(h, "low-a1"), "Kueue never preempted the run", WAIT_S)
    terminating = h.wait(
        lambda: [p for p in h.pods.pods(run="low") if p["metadata"].get("deletionTimestamp")] or None,
        "the preempted pods were never stopped",
    )
    for pod in terminating:
        h.pods.exit_on_sigterm(pod)
    h.wait_state("Queued", WAIT_S, name="low")
    h.wait(lambda: queues.admitted("urgent"), "the urgent Job was never admitted", WAIT_S)
    status = h.status("low")
    assert status.get("restarts", 0) == 0 and status["attempt"] == 1, status
    assert not h.holds_within(lambda: h.status("low").get("state") not in ("Queued",), 5), h.status("low")

    # The urgent Job goes: Kueue admits the preempted Workload again, and the same Job runs on.
    h.plane.request(
        "DELETE", f"/apis/batch/v1/namespaces/{h.namespace}/jobs/urgent", {"propagationPolicy": "Foreground"}
    )
    h.wait(lambda: gang_running(h, "low"), "the preempted run never ran again", WAIT_S)
    status = h.status("low")
    assert status.get("restarts", 0) == 0 and status["attempt"] == 1, status  # no restart spent, no new attempt
    assert status["state"] == "Running" and queues.admitted("low-a1")
    assert h.jobs("low") == ["low-a1"]
    reasons = [e["reason"] for e in h.events() if e["involvedObject"]["name"] == "low"]
    assert reasons.count("Queued") >= 1 and reasons.count("Admitted") >= 1, reasons
    assert not {"PodFailed", "PodLost", "Preempted", "Restarting", "RestartBudgetExhausted"} & set(reasons), reasons
