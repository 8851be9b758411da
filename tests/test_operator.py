"""The real kopf operator against the real control plane (tests/cluster/): kube-apiserver v1.36, the Job controller
and garbage collector, the scheduler, and kwok nodes whose pods run nothing.

Each test gets a fresh namespace, two fresh kwok nodes of its own (the manifests select them), and the operator
(kopf.testing.KopfRunner, the code `stagerun operator` runs) watching only that namespace. The test plays what kwok
does not: how a pod's container ends, a node that stops answering, an image that cannot be pulled (KwokPods,
through the pods' and nodes' /status as a kubelet writes it), and what rank 0's /progress answers (kwok pods run
nothing, so the operator's poll is answered from the test's ``progress`` table).

The scenarios only a real cluster shows (a Job suspended by a queue, pods that cannot be scheduled or created, Pod
Security `restricted`, the Job controller deleting survivors with their full grace) first check with plain waits
that the cluster did what the scenario needs, then what the user sees of it.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import time

import pytest
import yaml
from cluster.control_plane import ControlPlane
from cluster.kwok_pods import JOB_INDEX, MERGE, KwokPods, pod_index, wait_for
from cluster.operator import FAST_SETTINGS, Harness, operator_harness

INDEXED_RESOURCES = {"nodes": 2, "gpusPerNode": 1}  # one GPU per node and per pod: the gang spreads one per node


@pytest.fixture
def plane(control_plane: ControlPlane, trainingrun_crd: str) -> ControlPlane:
    """The control plane with the TrainingRun CRD installed (what the operator watches)."""
    return control_plane


@pytest.fixture
def harness(plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch):
    with operator_harness(plane, namespace, monkeypatch) as h:
        yield h


def relaunch_message(phase_index: int, step: int) -> str:
    return json.dumps(
        {
            "state": "relaunch",
            "phaseIndex": phase_index,
            "step": step,
            "tokens": step * 8192,
            "checkpoint": f"s3://bucket/runs/quickstart/step-{step:08d}",
        }
    )


def rank_zero(pods: list[dict]) -> dict:
    return next(p for p in pods if pod_index(p) == 0)


# -- a run's objects and status --------------------------------------------------------------------------------
def test_create_makes_configmap_service_and_indexed_job_and_reports_status(harness: Harness):
    h = harness
    h.create(h.manifest(resources={"nodes": 2, "processesPerNode": 1}))
    h.wait(lambda: h.status().get("state") == "Running" and h.status().get("attempt") == 1, "not running")
    job = h.wait(lambda: h.get("jobs", "quickstart-a1"), "no Job")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TrainingRun" and owner["uid"] == h.run()["metadata"]["uid"]
    assert h.get("services", "quickstart-a1")["spec"]["clusterIP"] == "None"
    assert "trainingrun.yaml" in h.get("configmaps", "quickstart-a1")["data"]
    pods = h.pods.wait_for_pods(2, job="quickstart-a1")
    h.rank_zero_reports(
        rank_zero(pods),
        step=12,
        tokens=98304,
        loss=6.54321,
        tokensPerSecond=4999.7,
        phaseIndex=0,
        lastStepAt=time.time(),
        lastCheckpoint={"path": "s3://b/step-8", "step": 8, "tokens": 65536, "time": time.time()},
    )
    h.wait(lambda: h.status().get("step") == 12, "progress never reached the status")
    status = h.status()
    assert (status["tokensSeen"], status["loss"], status["tokensPerSecond"]) == (98304, 6.5432, 5000)
    assert status["lastCheckpoint"]["step"] == 8 and status["eta"]
    assert status["observedGeneration"] == h.run()["metadata"]["generation"]
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "True" and ready["Progressing"] == "True" and ready["SpecAccepted"] == "True"
    h.wait(lambda: {"Launched", "CheckpointCommitted"} <= set(h.reasons()), "events missing")
    assert h.reasons().count("Launched") == 1
    assert h.jobs() == ["quickstart-a1"]


def test_indexed_job_pods_have_the_names_the_rendezvous_relies_on(harness: Harness):
    """The real Job controller names pods <job>-<index>-<suffix> with hostname <job>-<index>; with the subdomain
    the operator sets to its headless Service, rank 0 is <job>-0.<service>, the endpoint every rank dials."""
    h = harness
    h.create(h.manifest(resources=INDEXED_RESOURCES))
    pods = h.pods.wait_for_pods(2, job="quickstart-a1")
    service = h.get("services", "quickstart-a1")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    for index, pod in enumerate(sorted(pods, key=pod_index)):
        assert pod["metadata"]["annotations"][JOB_INDEX] == str(index)
        name = pod["metadata"]["name"]
        assert name.startswith(f"quickstart-a1-{index}-") and len(name) == len(f"quickstart-a1-{index}-") + 5
        assert pod["spec"]["hostname"] == f"quickstart-a1-{index}"
        assert pod["spec"]["subdomain"] == service["metadata"]["name"]
        # The Service selects exactly the gang's pods (its endpoints are the rendezvous peers).
        labels = pod["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["STAGERUN_RDZV_ENDPOINT"]["value"] == "quickstart-a1-0.quickstart-a1:29400"
        # Each rank learns its index from the Job controller's env, a reference to the pod's own index annotation.
        assert JOB_INDEX in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    # One GPU asked per pod, one per node: the scheduler puts the gang on both of the test's nodes.
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(h.nodes)
    # The addresses the operator dials for progress: kwok's pod network, on loopback.
    assert all(ipaddress.ip_address(p["status"]["podIP"]) in ipaddress.ip_network("127.1.0.0/16") for p in pods)


# -- failures and restarts -------------------------------------------------------------------------------------
def test_lost_pod_relaunches_the_gang_from_the_checkpoint_with_backoff(harness: Harness):
    """One pod vanishes (force-deleted, as when its node is lost). A one-pod gang: with two, whether the surviving
    rank goes within 1 s or within 600 s depends on whether the operator or the Job controller deletes it first
    (issue 13 item 2, the next test, which makes the Job controller come first)."""
    h = harness
    h.create(h.manifest())
    pods = h.pods.wait_for_pods(1, job="quickstart-a1")
    h.wait(lambda: len(h.status().get("pods", {})) == 1, "pods not recorded")
    h.pods.lose_pod(pods[0])
    h.wait(lambda: h.status().get("restarts") == 1, "no restart after the lost pod")
    h.wait(lambda: h.jobs() == ["quickstart-a2"], "the gang was not relaunched (and the old one removed)")
    h.pods.wait_for_pods(1, job="quickstart-a2")
    status = h.status()
    assert status["attempt"] == 2 and status["lastFailure"]["reason"] == "PodLost"
    h.wait(lambda: "Restarted" in h.reasons(), "no Restarted event")
    reasons = h.reasons()
    assert reasons.index("PodLost") < reasons.index("RestartScheduled") < reasons.index("Restarted")


def test_surviving_ranks_are_stopped_within_the_failure_grace(plane, namespace, monkeypatch):
    """Rank 1 fails; rank 0 is blocked in a collective (it ignores SIGTERM). The real Job controller reacts first
    (here deterministically: the operator is away for the moment, as during a restart or under load) and deletes
    rank 0 with the pod's 600 s grace. The operator must still stop it within its failure grace (1 s here) and
    relaunch the gang within seconds, not minutes."""
    with operator_harness(plane, namespace, monkeypatch, start=False) as h:
        h.create(h.manifest(resources=INDEXED_RESOURCES))
        with h.operator():
            pods = h.pods.wait_for_pods(2, job="quickstart-a1")
            h.wait(lambda: len(h.status().get("pods", {})) == 2, "pods not recorded")
        zero, one = sorted(pods, key=pod_index)
        h.pods.ignore_sigterm(zero)
        h.pods.fail(one, exit_code=1)
        h.wait(lambda: (h.pods.pod(zero) or {}).get("metadata", {}).get("deletionTimestamp"), "no Job teardown")
        assert h.pods.pod(zero)["metadata"]["deletionGracePeriodSeconds"] == 600  # the Job controller's deletion
        with h.operator():
            h.wait(lambda: h.status().get("restarts") == 1, "the failure was not seen")
            assert h.holds_within(lambda: len(h.pods.pods(job="quickstart-a2")) == 2, 30), (
                f"no new attempt 30 s after the failure: {h.pods.describe_pods()}"
            )


def test_a_failed_pod_reconciles_its_run_at_once_not_at_the_next_timer_tick(plane, namespace, monkeypatch):
    """The operator watches its own Jobs (label selector on the server), whose status the Job controller updates
    when a pod fails: the teardown starts within seconds even when the run's timer would not fire for an hour."""
    slow_timer = {**FAST_SETTINGS, "STAGERUN_RECONCILE_SECONDS": "3600"}
    with operator_harness(plane, namespace, monkeypatch, settings=slow_timer) as h:
        h.create(h.manifest())
        pod = h.pods.wait_for_pods(1, job="quickstart-a1")[0]
        h.wait(lambda: h.status().get("attempt") == 1, "not launched")
        h.pods.fail(pod, exit_code=1)
        h.wait(lambda: h.status().get("restarts") == 1, "the failure was not acted on", timeout=30)
        assert h.status()["lastFailure"]["reason"] == "PodFailed"


def test_restart_budget_exhausted_fails_the_run(harness: Harness):
    h = harness
    h.create(h.manifest(maxRestarts=1))
    h.pods.fail(h.pods.wait_for_pods(1, job="quickstart-a1")[0], exit_code=1)
    h.wait(lambda: h.status().get("attempt") == 2, "no second attempt")
    h.pods.fail(h.pods.wait_for_pods(1, job="quickstart-a2")[0], exit_code=1)
    h.wait_state("Failed")
    failed = h.condition("Failed")
    assert failed["status"] == "True" and failed["reason"] == "RestartBudgetExhausted"
    assert "spec.maxRestarts 1" in failed["message"] and "exited with code 1" in failed["message"]


def test_oom_before_the_first_step_fails_with_advice(harness: Harness):
    h = harness
    h.create(h.manifest())
    h.pods.oom_kill(h.pods.wait_for_pods(1, job="quickstart-a1")[0])
    h.wait_state("Failed")
    failed = h.condition("Failed")
    assert failed["reason"] == "OOMKilledAtStart" and "microBatchSize" in failed["message"]
    assert h.status()["restarts"] == 0  # retrying cannot help: no restart was spent


def test_no_heartbeat_for_hang_timeout_restarts(harness: Harness):
    h = harness
    h.create(h.manifest(hangTimeout=60))
    zero = h.pods.wait_for_pods(1, job="quickstart-a1")[0]
    # The gang reports steps until one, 61 s "ago", then nothing: a hung collective.
    h.rank_zero_reports(zero, step=30, tokens=1, phaseIndex=0, lastStepAt=time.time())
    h.wait(lambda: h.status().get("step") == 30, "no progress")
    h.monkeypatch.setattr(h.handlers, "clock", lambda: time.time() + 61)  # a minute passes for the operator
    h.wait(lambda: (h.status().get("lastFailure") or {}).get("reason") == "Hang", "hang not detected")
    assert "no training step completed for" in h.status()["lastFailure"]["message"]
    h.wait(lambda: "quickstart-a2" in h.jobs(), "no relaunch after the hang")


def test_pod_stuck_terminating_on_a_not_ready_node_is_force_deleted(harness: Harness):
    h = harness
    h.create(h.manifest(resources=INDEXED_RESOURCES))
    pods = h.pods.wait_for_pods(2, job="quickstart-a1")
    h.wait(lambda: len(h.status().get("pods", {})) == 2, "pods not recorded")
    stuck = next(p for p in pods if pod_index(p) == 1)
    node = stuck["spec"]["nodeName"]
    h.pods.node_not_ready(node)
    h.wait(lambda: (h.status().get("lastFailure") or {}).get("reason") == "NodeNotReady", "NotReady not seen")
    h.wait(lambda: "ForceDeletedPod" in h.reasons(), "stuck pod never force-deleted")
    assert any(stuck["metadata"]["name"] in e["message"] for e in h.events() if e["reason"] == "ForceDeletedPod")
    h.wait(lambda: h.pods.pod(stuck) is None, "the force-deleted pod is still there")
    h.pods.node_ready(node)
    h.wait(lambda: "quickstart-a2" in h.jobs(), "relaunch blocked by the stuck pod")
    h.pods.wait_for_pods(2, job="quickstart-a2")


def test_kwok_leaves_a_pod_deleted_on_a_not_ready_node_terminating_until_forced(control_plane, namespace):
    """What the force-delete test relies on: kwok stops finalising the pods of a node taken out of its hands, as a
    kubelet that stopped answering does; on a Ready node a deleted pod goes within its grace period."""
    pods = KwokPods(control_plane, namespace)
    selector, nodes = pods.add_pool(2)
    try:
        container = {"name": "c", "image": "stagerun.invalid/x:0", "resources": {"limits": {"nvidia.com/gpu": 1}}}
        template = {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "nodeSelector": selector,
            "containers": [container],
        }
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "probe"},
            "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "template": {"spec": template}},
        }
        control_plane.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job)
        healthy, stuck = sorted(pods.wait_for_pods(2, job="probe"), key=pod_index)
        pods.node_not_ready(stuck["spec"]["nodeName"])
        control_plane.request(
            "DELETE", f"/apis/batch/v1/namespaces/{namespace}/jobs/probe?propagationPolicy=Foreground"
        )
        wait_for(lambda: _terminating(pods, healthy) and _terminating(pods, stuck), 30, "the Job's pods not deleted")
        wait_for(lambda: pods.pod(healthy) is None, 30, "a pod deleted on a Ready kwok node outlived its grace")
        time.sleep(5)  # 2.5 times the stuck pod's grace period
        left = pods.pod(stuck)
        assert left is not None and left["status"]["phase"] == "Running"
        pods.lose_pod(stuck)  # a force delete frees it
        wait_for(lambda: pods.pod(stuck) is None, 30, "the force-deleted pod is still there")
    finally:
        pods.delete_nodes(nodes)


def test_kwok_leaves_a_terminal_pod_as_its_kubelet_reported_it(control_plane, namespace):
    """What every failure test relies on: a status the driver writes for an ended container stays (kwok's stages
    select only Pending pods and pods being deleted)."""
    pods = KwokPods(control_plane, namespace)
    selector, nodes = pods.add_pool(1)
    try:
        container = {"name": "c", "image": "stagerun.invalid/x:0"}
        pod = {"metadata": {"name": "p"}, "spec": {"nodeSelector": selector, "containers": [container]}}
        control_plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
        pods.wait_for_pods(1)
        pods.fail("p", exit_code=3, message='{"state": "failed"}')
        time.sleep(3)  # kwok had time to act on the update
        status = pods.pod("p")["status"]
        terminated = status["containerStatuses"][0]["state"]["terminated"]
        assert status["phase"] == "Failed" and set(status["containerStatuses"][0]["state"]) == {"terminated"}
        assert (terminated["exitCode"], terminated["message"]) == (3, '{"state": "failed"}')
    finally:
        pods.delete_nodes(nodes)


def _terminating(pods: KwokPods, pod: dict) -> bool:
    current = pods.pod(pod)
    return current is None or bool(current["metadata"].get("deletionTimestamp"))


# -- phases, suspend, deletion ---------------------------------------------------------------------------------
def test_phase_boundary_with_a_new_topology_launches_a_new_job(harness: Harness):
    h = harness
    doc = h.manifest()
    doc["spec"]["phases"][1]["parallelism"] = {"tensorParallel": 2}
    doc["spec"]["phases"][1]["microBatchSize"] = 16
    h.create(doc)
    h.pods.wait_for_pods(1, job="quickstart-a1")
    h.pods.succeed_job("quickstart-a1", message=relaunch_message(1, 42))
    h.wait(lambda: h.jobs() == ["quickstart-a2"], "no new Job for the next phase")
    job = h.get("jobs", "quickstart-a2")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STAGERUN_PHASE_INDEX"] == "1"
    # The Job is created inside the handler and the status patch lands when the handler returns.
    h.wait(lambda: h.status().get("phase") == "long-context", "status never moved to the next phase")
    status = h.status()
    assert status["restarts"] == 0 and status["step"] == 42
    assert {"PhaseFinished", "PhaseStarted"} <= set(h.reasons())
    h.pods.wait_for_pods(1, job="quickstart-a2")
    done = json.dumps({"state": "complete", "step": 59, "tokens": 802816, "checkpoint": "s3://b/step-59"})
    h.pods.succeed_job("quickstart-a2", message=done)
    h.wait_state("Succeeded")
    assert h.status()["completionTime"] and h.status()["step"] == 59


def test_suspend_frees_the_pods_and_resume_relaunches(harness: Harness):
    h = harness
    h.create(h.manifest())
    h.pods.wait_for_pods(1, job="quickstart-a1")
    h.patch_spec({"suspend": True})
    h.wait_state("Suspended")
    assert h.pods.pods(run="quickstart") == [] and h.jobs() == []
    assert {"Suspending", "Suspended"} <= set(h.reasons())
    h.patch_spec({"suspend": False})
    h.wait(lambda: h.jobs() == ["quickstart-a2"], "not resumed")
    h.wait(lambda: "Resumed" in h.reasons(), "no Resumed event")
    assert h.status()["restarts"] == 0


def test_delete_removes_everything_it_created(harness: Harness):
    h = harness
    h.create(h.manifest(resources={"nodes": 2, "processesPerNode": 1}))
    pods = h.pods.wait_for_pods(2, job="quickstart-a1")
    h.delete_run()
    h.wait(lambda: h.run() is None, "the TrainingRun was not deleted (finalizer stuck?)")
    for kind in ("jobs", "services", "configmaps"):
        h.wait(lambda kind=kind: h.list(kind) == [], f"{kind} left behind")
    # Pods go with their grace period (600 s): what the operator owes is that their deletion was asked for. Then
    # their trainers exit on SIGTERM, the kubelet reports it, and nothing of the run is left.
    h.wait(lambda: all(_terminating(h.pods, p) for p in pods), "pods not being deleted")
    for pod in pods:
        if h.pods.pod(pod) is not None:
            h.pods.exit_on_sigterm(pod)
    h.wait(lambda: h.list("pods") == [], "pods left behind")


def test_children_are_garbage_collected_when_the_run_goes_without_the_operator(plane, namespace, monkeypatch):
    """No operator to clean up (uninstalled, or its finalizer removed by hand): the owner references alone make the
    real garbage collector delete the attempt's Job, Service, ConfigMap and, through the Job, its pods."""
    with operator_harness(plane, namespace, monkeypatch, start=False) as h:
        h.create(h.manifest(resources={"nodes": 2, "processesPerNode": 1}))
        with h.operator():
            pods = h.pods.wait_for_pods(2, job="quickstart-a1")
            h.wait(lambda: h.get("configmaps", "quickstart-a1") and h.get("services", "quickstart-a1"), "no children")
        path = f"/apis/stagerun.io/v1alpha1/namespaces/{h.namespace}/trainingruns/quickstart"
        h.plane.request("PATCH", path, {"metadata": {"finalizers": None}}, MERGE)
        h.delete_run()
        h.wait(lambda: h.run() is None, "the TrainingRun was not deleted")
        for kind in ("jobs", "services", "configmaps"):
            h.wait(lambda kind=kind: h.list(kind) == [], f"{kind} not collected")
        h.wait(lambda: all(_terminating(h.pods, p) for p in pods), "the Job's pods not collected")
        for pod in pods:
            if h.pods.pod(pod) is not None:
                h.pods.exit_on_sigterm(pod)
        h.wait(lambda: h.list("pods") == [], "pods left behind")


def test_operator_restart_mid_run_creates_no_duplicate_job(plane, namespace, monkeypatch):
    with operator_harness(plane, namespace, monkeypatch, start=False) as h:
        h.create(h.manifest())
        with h.operator():
            h.pods.wait_for_pods(1, job="quickstart-a1")
            h.wait(lambda: h.status().get("attempt") == 1, "not launched")
        with h.operator():  # the operator restarts
            time.sleep(2)  # ten reconcile periods
        assert h.jobs() == ["quickstart-a1"]
        status = h.status()
        assert status["attempt"] == 1 and status["state"] == "Running" and status["restarts"] == 0


def test_status_write_conflict_is_retried_without_duplicates(plane, namespace, monkeypatch):
    """The operator's first status write finds the run changed since it read it: the test writes the run's status
    in between, so the apiserver answers 409 for the resourceVersion the operator sends; the decision is taken
    again on a fresh read."""
    from stagerun.operator import kube

    with operator_harness(plane, namespace, monkeypatch, start=False) as h:
        original, conflicts = kube.patch_run_status, []

        def patch_after_a_concurrent_write(namespace: str, name: str, resource_version: str, changes: dict) -> None:
            if not conflicts:
                path = f"/apis/stagerun.io/v1alpha1/namespaces/{namespace}/trainingruns/{name}/status"
                written = h.plane.request("PATCH", path, {"status": {"observedBy": "another-writer"}}, MERGE)
                conflicts.append(written["metadata"]["resourceVersion"] != resource_version)
            original(namespace, name, resource_version, changes)

        monkeypatch.setattr(kube, "patch_run_status", patch_after_a_concurrent_write)
        h.create(h.manifest())
        with h.operator() as runner:
            h.pods.wait_for_pods(1, job="quickstart-a1")
            h.wait(lambda: h.status().get("attempt") == 1 and h.status().get("state") == "Running", "never recovered")
            assert h.jobs() == ["quickstart-a1"]
        assert conflicts == [True]
        assert h.status()["observedBy"] == "another-writer"  # the other writer's change was not overwritten
    assert "changed while it was reconciled" in runner.output  # the 409 happened and was retried


def test_image_that_cannot_be_pulled_fails_with_an_actionable_condition(plane, namespace, monkeypatch):
    with operator_harness(plane, namespace, monkeypatch, nodes=0) as h:
        held = f"held-{namespace}"
        h.pods.add_held_node(held, h.node_selector)
        h.nodes.append(held)
        h.create(h.manifest())  # the image does not exist: the kubelet of the held node fails to pull it
        pod = h.pods.wait_for_pods(1, job="quickstart-a1", phase=None)[0]
        h.pods.image_pull_backoff(pod, reason="ErrImagePull")
        h.wait_state("Failed")
        failed = h.condition("Failed")
        assert failed["reason"] == "ErrImagePull" and "spec.image" in failed["message"]


# -- the manifest ----------------------------------------------------------------------------------------------
def test_invalid_spec_is_reported_and_a_fix_starts_the_run(harness: Harness):
    h = harness
    bad = h.manifest()
    bad["spec"]["phases"][1]["seqLen"] = 100
    h.create(bad)
    h.wait_state("Failed")
    failed = h.condition("Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.phases[1].seqLen" in failed["message"]
    assert h.jobs() == []
    h.patch_spec({"phases": h.manifest()["spec"]["phases"]})
    h.wait(lambda: h.jobs() == ["quickstart-a1"], "the fixed manifest did not start")


def test_editing_the_running_phase_is_refused_and_a_later_phase_accepted(harness: Harness):
    h = harness
    h.create(h.manifest())
    h.pods.wait_for_pods(1, job="quickstart-a1")
    h.wait(lambda: h.status().get("attempt") == 1, "not running")
    phases = h.manifest()["spec"]["phases"]
    phases[0]["tokens"] = "1M"
    h.patch_spec({"phases": phases})
    h.wait(lambda: h.condition("SpecAccepted").get("status") == "False", "immutable edit not refused")
    refused = h.condition("SpecAccepted")
    assert refused["reason"] == "ImmutableFieldChanged" and "spec.phases[0]" in refused["message"]
    assert h.jobs() == ["quickstart-a1"] and h.status()["state"] == "Running"
    phases = h.manifest()["spec"]["phases"]
    phases[2]["tokens"] = "128K"
    h.patch_spec({"phases": phases})
    h.wait(lambda: h.condition("SpecAccepted").get("status") == "True", "later-phase edit not accepted")
    data = h.get("configmaps", "quickstart-a1")["data"]["trainingrun.yaml"]
    assert yaml.safe_load(data)["spec"]["phases"][2]["tokens"] == 128_000  # the running gang sees the edit


# -- what only a real cluster shows (issue 13) -----------------------------------------------------------------
def _job_suspended_by_someone_else(h: Harness) -> None:
    h.create(h.manifest())
    pod = h.pods.wait_for_pods(1, job="quickstart-a1")[0]
    # As Kueue does when it preempts a workload: spec.suspend on the Job, and the Job controller stops its pods.
    path = f"/apis/batch/v1/namespaces/{h.namespace}/jobs/quickstart-a1"
    assert h.plane.request("PATCH", path, {"spec": {"suspend": True}}, MERGE)["spec"]["suspend"] is True
    h.wait(lambda: (h.pods.pod(pod) or {}).get("metadata", {}).get("deletionTimestamp"), "pods not stopped")


def _queued_for_a_queue_no_kueue_admits(h: Harness) -> None:
    h.create(h.manifest(queueName="team-a"))  # the operator creates the Job suspended, for Kueue to admit

    def job_suspended() -> bool:
        job = h.get("jobs", "quickstart-a1") or {}
        conditions = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions") or ()}
        return conditions.get("Suspended") == "True"

    h.wait(job_suspended, "the Job controller never reported the Job suspended")


@pytest.mark.parametrize("suspend", [_queued_for_a_queue_no_kueue_admits, _job_suspended_by_someone_else])
def test_a_run_whose_job_is_suspended_does_not_claim_running(harness: Harness, suspend):
    h = harness
    suspend(h)
    # Queued, with nothing spent: a Kueue eviction is no failure of the run.
    assert h.holds_within(lambda: h.status().get("state") == "Queued", 15), f"status: {h.status()}"
    assert h.status()["restarts"] == 0


def test_a_gang_that_cannot_be_scheduled_says_why(harness: Harness):
    h = harness
    h.create(h.manifest(resources={"nodes": 2, "processesPerNode": 1, "cpu": "1000"}))  # nodes have 64 CPUs

    def unschedulable() -> bool:
        pods = h.pods.pods(job="quickstart-a1")
        scheduled = [
            next((c for c in p["status"].get("conditions") or () if c["type"] == "PodScheduled"), {}) for p in pods
        ]
        return len(pods) == 2 and all(
            c.get("reason") == "Unschedulable" and "Insufficient cpu" in c.get("message", "") for c in scheduled
        )

    h.wait(unschedulable, "the scheduler never called the pods Unschedulable for Insufficient cpu")
    assert h.holds_within(lambda: _says(h, "Unschedulable", "Insufficient cpu"), 15), f"status: {h.status()}"
    assert h.status()["state"] != "Running"


def _missing_service_account(h: Harness) -> str:
    h.create(h.manifest(scheduling={"nodeSelector": h.node_selector, "serviceAccountName": "trainer"}))
    return 'serviceaccount "trainer" not found'


def _quota_of_no_pods(h: Harness) -> str:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }
    h.plane.request("POST", f"/api/v1/namespaces/{h.namespace}/resourcequotas", quota)
    h.wait(lambda: (h.get("resourcequotas", "no-pods") or {}).get("status", {}).get("hard"), "quota never accounted")
    h.create(h.manifest())
    return "exceeded quota: no-pods"


@pytest.mark.parametrize("refusal", [_missing_service_account, _quota_of_no_pods])
def test_pods_refused_at_creation_are_reported(harness: Harness, refusal):
    h = harness
    words = refusal(h)

    def refused() -> bool:
        events = h.plane.request("GET", f"/api/v1/namespaces/{h.namespace}/events")["items"]
        return any(e["reason"] == "FailedCreate" and words in e["message"] for e in events)

    h.wait(refused, f"the Job controller never reported FailedCreate with {words!r}")
    assert h.pods.pods(job="quickstart-a1") == []
    assert h.holds_within(lambda: _says(h, "FailedCreate", words), 15), f"status: {h.status()}"
    assert h.status()["state"] != "Running"


def _says(h: Harness, reason: str, words: str) -> bool:
    """Some condition of the run has ``reason`` and quotes the cluster's ``words``."""
    return any(c.get("reason") == reason and words in c.get("message", "") for c in h.status().get("conditions") or ())


def test_trainer_pods_are_admitted_in_a_restricted_namespace(harness: Harness):
    h = harness
    label = {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    h.plane.request("PATCH", f"/api/v1/namespaces/{h.namespace}", label, MERGE)
    h.create(h.manifest())
    h.wait(lambda: h.get("jobs", "quickstart-a1"), "no Job")
    admitted = h.holds_within(lambda: len(h.pods.pods(job="quickstart-a1")) == 1, 15)
    events = h.plane.request("GET", f"/api/v1/namespaces/{h.namespace}/events")["items"]
    refusals = [e["message"] for e in events if e["reason"] == "FailedCreate"]
    assert admitted, f"no trainer pod admitted: {refusals[:1]}"


# -- no cluster needed -----------------------------------------------------------------------------------------
def test_fetch_progress_is_none_for_an_unreachable_or_malformed_endpoint(monkeypatch):
    from stagerun.operator import handlers

    answers = {"good": b'{"state": "running", "step": 3, "lastStepAt": 5}', "bad": b'{"step": "x"}', "html": b"<html>"}

    def urlopen(url, timeout):
        host = url.split("//")[1].split(":")[0]
        if host not in answers:
            raise ConnectionRefusedError(111, "Connection refused")
        assert url.endswith(":8090/progress")
        return contextlib.nullcontext(io.BytesIO(answers[host]))

    monkeypatch.setattr(handlers.urllib.request, "urlopen", urlopen)
    good = handlers.fetch_progress("good", 8090)
    assert good is not None and (good.step, good.last_step_at) == (3, 5)
    assert [handlers.fetch_progress(host, 8090) for host in ("bad", "html", "down")] == [None, None, None]


# -- spec.podTemplate ------------------------------------------------------------------------------------------
def test_a_pod_template_overlay_reaches_every_trainer_pod(harness: Harness):
    """The overlay on a real cluster: the Job controller's pods carry its label, env var, volume and mount, and
    request the extra resource, which the scheduler honours: with one `rdma/hca` published on one node only (as an
    RDMA device plugin would), the second pod waits for it; the scheduler is left to the cluster's default."""
    h = harness

    def publish_device(node: str) -> None:
        device = {"rdma/hca": "1"}
        status = {"status": {"capacity": device, "allocatable": device}}
        h.plane.request("PATCH", f"/api/v1/nodes/{node}/status", status, MERGE)

    publish_device(h.nodes[0])
    overlay = {
        "metadata": {"labels": {"network": "ib"}},
        "spec": {
            "volumes": [{"name": "nccl", "emptyDir": {}}],
            "containers": [
                {
                    "name": "trainer",
                    "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}],
                    "volumeMounts": [{"name": "nccl", "mountPath": "/etc/nccl"}],
                    "resources": {"limits": {"rdma/hca": 1}},
                }
            ],
        },
    }
    h.create(h.manifest(resources=INDEXED_RESOURCES, podTemplate=overlay))
    (first,) = h.pods.wait_for_pods(1, job="quickstart-a1")
    assert first["spec"]["nodeName"] == h.nodes[0]
    h.wait(lambda: _says(h, "Unschedulable", "Insufficient rdma/hca"), "the second pod did not wait for a device")
    publish_device(h.nodes[1])
    pods = h.pods.wait_for_pods(2, job="quickstart-a1")
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(h.nodes)
    for pod in pods:
        assert pod["metadata"]["labels"]["network"] == "ib"
        assert pod["metadata"]["labels"]["stagerun.io/run"] == "quickstart"  # the operator's labels are intact
        assert pod["spec"]["schedulerName"] == "default-scheduler"
        assert {"name": "nccl", "emptyDir": {}} in pod["spec"]["volumes"]
        (trainer,) = pod["spec"]["containers"]
        assert {"name": "NCCL_IB_HCA", "value": "mlx5"} in trainer["env"]
        assert any(m["name"] == "nccl" and m["mountPath"] == "/etc/nccl" for m in trainer["volumeMounts"])
        limits, requests = trainer["resources"]["limits"], trainer["resources"]["requests"]
        assert limits["rdma/hca"] == requests["rdma/hca"] == "1" and limits["nvidia.com/gpu"] == "1"
    h.wait(lambda: h.status().get("state") == "Running", "the gang never ran")


def test_a_job_the_apiserver_refuses_fails_the_run_with_its_words_and_a_fix_starts_it(harness: Harness):
    """What only the apiserver checks (here a volume with two sources in spec.podTemplate) is found by a dry run of
    the Job before the attempt is recorded: the run is Failed quoting the apiserver, not retried forever."""
    h = harness
    overlay = {"spec": {"volumes": [{"name": "scratch", "emptyDir": {}, "hostPath": {"path": "/scratch"}}]}}
    h.create(h.manifest(podTemplate=overlay))
    h.wait_state("Failed")
    failed = h.condition("Failed")
    assert failed["reason"] == "InvalidSpec", failed
    assert "the apiserver refuses the attempt's Job" in failed["message"] and "spec.podTemplate" in failed["message"]
    assert "volumes[" in failed["message"], failed  # the apiserver's own words name the field
    assert h.jobs() == [] and h.status().get("attempt", 0) == 0
    h.patch_spec({"podTemplate": {"spec": {"volumes": [{"name": "scratch", "emptyDir": {}}]}}})
    h.wait(lambda: h.jobs() == ["quickstart-a1"], "the fixed manifest did not start")
