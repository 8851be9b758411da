"""The real kopf operator against a Kubernetes API over HTTP (tests/kube), the test playing job controller and kubelet.

Each test starts an API emulator, a simulated cluster (FakeCluster: pods run nothing, the test decides how they end)
and the operator (kopf.testing.KopfRunner, the same code `stagerun operator` runs), then drives a scenario.

With ``STAGERUN_TEST_KUBECONFIG=path`` the same tests run against that cluster's API server instead (in a fresh
namespace, CRD installed beforehand): the scenarios that need the simulated kubelet skip, the rest run for real.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time

import pytest
import yaml
from conftest import ROOT
from kopf.testing import KopfRunner
from kube.emulator import running_api
from kube.kubelet import FakeCluster
from kube.operator import fresh_operator
from kube.real import RealApi, real_kubeconfig

NS = "default"  # the emulator's; a real cluster gets a fresh namespace per test
FAST = {
    "STAGERUN_RECONCILE_SECONDS": "0.2",
    "STAGERUN_BACKOFF_BASE_SECONDS": "0.5",
    "STAGERUN_BACKOFF_MAX_SECONDS": "2",
    "STAGERUN_FAILURE_GRACE_SECONDS": "1",
    "STAGERUN_SUSPEND_GRACE_SECONDS": "5",
    "STAGERUN_FORCE_DELETE_AFTER_SECONDS": "1",
}


def manifest(**spec_changes) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["namespace"] = NS
    doc["spec"].update(image="ghcr.io/example/stagerun:0.1", checkpoint={"path": "s3://bucket/runs/quickstart"})
    doc["spec"].update(copy.deepcopy(spec_changes))
    return doc


class Harness:
    """The API, the simulated cluster, the running operator, and helpers to look at them."""

    def __init__(self, api, cluster, runner, progress: dict, ns: str):
        self.api, self.cluster, self.runner, self.progress, self.ns = api, cluster, runner, progress, ns

    def require_kubelet(self) -> None:
        if self.cluster is None:
            pytest.skip("needs the simulated kubelet: runs against the API emulator only")

    def create(self, doc: dict) -> None:
        doc = copy.deepcopy(doc)
        doc["metadata"]["namespace"] = self.ns
        self.api.custom().create_namespaced_custom_object("stagerun.io", "v1alpha1", self.ns, "trainingruns", doc)

    def run(self, name="quickstart") -> dict:
        return self.api.get("trainingruns", self.ns, name)

    def status(self, name="quickstart") -> dict:
        return (self.run(name) or {}).get("status") or {}

    def patch_spec(self, spec: dict, name="quickstart") -> None:
        self.api.patch("trainingruns", self.ns, name, {"spec": spec})

    def wait(self, predicate, message, timeout=20):
        return self.api.wait_for(predicate, timeout=timeout, message=lambda: f"{message}; status: {self.status()}")

    def wait_state(self, state, timeout=20, name="quickstart"):
        return self.wait(lambda: self.status(name).get("state") == state, f"run never reached {state}", timeout)

    def jobs(self, run="quickstart") -> list[str]:
        jobs = self.api.list("jobs", self.ns, label_selector={"stagerun.io/run": run})
        return sorted(j["metadata"]["name"] for j in jobs)

    def reasons(self) -> list[str]:
        events = sorted(self.api.events(self.ns), key=lambda e: e["metadata"].get("creationTimestamp") or "")
        return [e["reason"] for e in events]

    def running_pods(self, count=1, job="quickstart-a1"):
        self.require_kubelet()
        return self.cluster.wait_for_pods(count, job=job)


@contextlib.contextmanager
def operator_harness(monkeypatch, nodes=("node-1", "node-2")):
    progress: dict = {}
    registry, handlers = fresh_operator(monkeypatch, FAST)
    monkeypatch.setattr(handlers, "fetch_progress", lambda ip, port: progress.get(ip))
    kubeconfig = real_kubeconfig()
    if kubeconfig:
        api = RealApi(kubeconfig)
        with api.use_kubeconfig(), KopfRunner(["run", "--standalone", "-n", api.namespace], registry=registry) as r:
            yield Harness(api, None, r, progress, api.namespace)
    else:
        with (
            running_api() as api,
            api.use_kubeconfig(),
            FakeCluster(api, nodes=nodes, pod_ip_prefix="127.10") as cluster,
            KopfRunner(["run", "--standalone", "-A"], registry=registry) as r,
        ):
            yield Harness(api, cluster, r, progress, NS)
    assert r.exception is None, r.output[-5000:]


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


def test_create_makes_configmap_service_and_indexed_job_and_reports_status(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.create(manifest(resources={"nodes": 2, "processesPerNode": 1}))
        h.wait(lambda: h.status().get("state") == "Running" and h.status().get("attempt") == 1, "not running")
        job = h.wait(lambda: h.api.get("jobs", h.ns, "quickstart-a1"), "no Job")
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
        owner = job["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "TrainingRun" and owner["uid"] == h.run()["metadata"]["uid"]
        assert h.api.get("services", h.ns, "quickstart-a1")["spec"]["clusterIP"] == "None"
        assert "trainingrun.yaml" in h.api.get("configmaps", h.ns, "quickstart-a1")["data"]
        pods = h.running_pods(2)
        zero = next(p for p in pods if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
        h.progress[zero["status"]["podIP"]] = {
            "step": 12,
            "tokens": 98304,
            "loss": 6.54321,
            "tokensPerSecond": 4999.7,
            "phaseIndex": 0,
            "lastStepAt": time.time(),
            "lastCheckpoint": {"path": "s3://b/step-8", "step": 8, "tokens": 65536, "time": time.time()},
        }
        h.wait(lambda: h.status().get("step") == 12, "progress never reached the status")
        status = h.status()
        assert (status["tokensSeen"], status["loss"], status["tokensPerSecond"]) == (98304, 6.5432, 5000)
        assert status["lastCheckpoint"]["step"] == 8 and status["eta"]
        ready = {c["type"]: c["status"] for c in status["conditions"]}
        assert ready["Ready"] == "True" and ready["Progressing"] == "True" and ready["SpecAccepted"] == "True"
        h.wait(lambda: {"Launched", "CheckpointCommitted"} <= set(h.reasons()), "events missing")
        assert h.reasons().count("Launched") == 1
        assert h.jobs() == ["quickstart-a1"]


def test_lost_pod_relaunches_the_gang_from_the_checkpoint_with_backoff(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.create(manifest(resources={"nodes": 2, "processesPerNode": 1}))
        pods = h.running_pods(2)
        h.wait(lambda: len(h.status().get("pods", {})) == 2, "pods not recorded")
        h.cluster.lose_pod(pods[1])
        h.wait(lambda: h.status().get("restarts") == 1, "no restart after the lost pod")
        h.wait(lambda: h.jobs() == ["quickstart-a2"], "the gang was not relaunched (and the old one removed)")
        h.running_pods(2, job="quickstart-a2")
        status = h.status()
        assert status["attempt"] == 2 and status["lastFailure"]["reason"] == "PodLost"
        reasons = h.reasons()
        assert reasons.index("PodLost") < reasons.index("RestartScheduled") < reasons.index("Restarted")


def test_restart_budget_exhausted_fails_the_run(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.create(manifest(maxRestarts=1))
        h.cluster.fail(h.running_pods(1)[0], exit_code=1)
        h.wait(lambda: h.status().get("attempt") == 2, "no second attempt")
        h.cluster.fail(h.running_pods(1, job="quickstart-a2")[0], exit_code=1)
        h.wait_state("Failed")
        failed = next(c for c in h.status()["conditions"] if c["type"] == "Failed")
        assert failed["status"] == "True" and failed["reason"] == "RestartBudgetExhausted"
        assert "spec.maxRestarts 1" in failed["message"] and "exited with code 1" in failed["message"]


def test_no_heartbeat_for_hang_timeout_restarts(monkeypatch):
    with operator_harness(monkeypatch) as h:
        doc = manifest(hangTimeout=60)
        h.create(doc)
        zero = h.running_pods(1)[0]
        # The gang reports steps until one, 61 s "ago", then nothing: a hung collective.
        h.progress[zero["status"]["podIP"]] = {"step": 30, "tokens": 1, "phaseIndex": 0, "lastStepAt": time.time()}
        h.wait(lambda: h.status().get("step") == 30, "no progress")
        from stagerun.operator import handlers

        monkeypatch.setattr(handlers, "clock", lambda: time.time() + 61)  # a minute passes for the operator
        h.wait(lambda: (h.status().get("lastFailure") or {}).get("reason") == "Hang", "hang not detected")
        assert "no training step completed for" in h.status()["lastFailure"]["message"]
        h.wait(lambda: "quickstart-a2" in h.jobs(), "no relaunch after the hang")


def test_pod_stuck_terminating_on_a_not_ready_node_is_force_deleted(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.create(manifest(resources={"nodes": 2, "processesPerNode": 1}))
        pods = h.running_pods(2)
        h.wait(lambda: len(h.status().get("pods", {})) == 2, "pods not recorded")
        node = pods[1]["spec"]["nodeName"]
        h.cluster.node_not_ready(node)
        h.wait(lambda: (h.status().get("lastFailure") or {}).get("reason") == "NodeNotReady", "NotReady not seen")
        h.wait(lambda: "ForceDeletedPod" in h.reasons(), "stuck pod never force-deleted")
        h.cluster.node_ready(node)
        h.wait(lambda: "quickstart-a2" in h.jobs(), "relaunch blocked by the stuck pod")


def test_phase_boundary_with_a_new_topology_launches_a_new_job(monkeypatch):
    with operator_harness(monkeypatch) as h:
        doc = manifest()
        doc["spec"]["phases"][1]["parallelism"] = {"tensorParallel": 2}
        doc["spec"]["phases"][1]["microBatchSize"] = 16
        h.create(doc)
        h.running_pods(1)
        h.cluster.succeed_job("quickstart-a1", message=relaunch_message(1, 42))
        h.wait(lambda: h.jobs() == ["quickstart-a2"], "no new Job for the next phase")
        job = h.api.get("jobs", h.ns, "quickstart-a2")
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["STAGERUN_PHASE_INDEX"] == "1"
        # The Job is created inside the handler and the status patch lands when the handler returns.
        h.wait(lambda: h.status().get("phase") == "long-context", "status never moved to the next phase")
        status = h.status()
        assert status["restarts"] == 0 and status["step"] == 42
        assert {"PhaseFinished", "PhaseStarted"} <= set(h.reasons())
        h.running_pods(1, job="quickstart-a2")
        done = json.dumps({"state": "complete", "step": 59, "tokens": 802816, "checkpoint": "s3://b/step-59"})
        h.cluster.succeed_job("quickstart-a2", message=done)
        h.wait_state("Succeeded")
        assert h.status()["completionTime"] and h.status()["step"] == 59


def test_suspend_frees_the_pods_and_resume_relaunches(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.create(manifest())
        h.running_pods(1)
        h.patch_spec({"suspend": True})
        h.wait_state("Suspended")
        assert h.cluster.pods(run="quickstart") == [] and h.jobs() == []
        assert {"Suspending", "Suspended"} <= set(h.reasons())
        h.patch_spec({"suspend": False})
        h.wait(lambda: h.jobs() == ["quickstart-a2"], "not resumed")
        h.wait(lambda: "Resumed" in h.reasons(), "no Resumed event")
        assert h.status()["restarts"] == 0


def test_delete_removes_everything_it_created(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.create(manifest(resources={"nodes": 2, "processesPerNode": 1}))
        h.wait(lambda: len(h.api.list("pods", h.ns, label_selector={"stagerun.io/run": "quickstart"})) == 2, "no pods")
        h.api.delete("trainingruns", h.ns, "quickstart")
        h.wait(lambda: h.run() is None, "the TrainingRun was not deleted (finalizer stuck?)", timeout=60)
        selector = {"stagerun.io/run": "quickstart"}
        for kind in ("jobs", "services", "configmaps", "pods"):
            h.wait(
                lambda kind=kind: h.api.list(kind, h.ns, label_selector=selector) == [],
                f"{kind} left behind",
                timeout=60,
            )


def test_operator_restart_mid_run_creates_no_duplicate_job(monkeypatch):
    if real_kubeconfig():
        pytest.skip("needs the simulated kubelet: runs against the API emulator only")
    registry, _ = fresh_operator(monkeypatch, FAST)
    with running_api() as api, api.use_kubeconfig(), FakeCluster(api, pod_ip_prefix="127.10") as cluster:
        api.custom().create_namespaced_custom_object("stagerun.io", "v1alpha1", NS, "trainingruns", manifest())
        with KopfRunner(["run", "--standalone", "-A"], registry=registry) as first:
            cluster.wait_for_pods(1, job="quickstart-a1")
            api.wait_for(lambda: (api.get("trainingruns", NS, "quickstart").get("status") or {}).get("attempt") == 1)
        assert first.exception is None, first.output[-3000:]
        with KopfRunner(["run", "--standalone", "-A"], registry=registry) as second:  # the operator restarts
            time.sleep(2)  # ten reconcile periods
        assert second.exception is None, second.output[-3000:]
        jobs = [j["metadata"]["name"] for j in api.list("jobs", NS)]
        assert jobs == ["quickstart-a1"]
        status = api.get("trainingruns", NS, "quickstart")["status"]
        assert status["attempt"] == 1 and status["state"] == "Running" and status["restarts"] == 0


def test_status_write_conflict_is_retried_without_duplicates(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.require_kubelet()
        # The first status write finds the run changed since it was read (409): the decision is taken again.
        h.api.inject_error(
            "patch", "trainingruns", namespace=NS, name="quickstart", subresource="status", code=409, reason="Conflict"
        )
        h.create(manifest())
        h.running_pods(1)
        h.wait(lambda: h.status().get("attempt") == 1 and h.status().get("state") == "Running", "never recovered")
        assert h.jobs() == ["quickstart-a1"]
        runner = h.runner
    assert "changed while it was reconciled" in runner.output  # the conflict happened and was retried


def test_image_that_cannot_be_pulled_fails_with_an_actionable_condition(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.create(manifest())  # the image does not exist: a real kubelet fails to pull it, the simulated one is told
        if h.cluster is not None:
            h.cluster.image_pull_backoff(
                h.cluster.wait_for_pods(1, job="quickstart-a1", phase=None)[0], reason="ErrImagePull"
            )
        h.wait_state("Failed", timeout=180)
        failed = next(c for c in h.status()["conditions"] if c["type"] == "Failed")
        assert failed["reason"] in ("ErrImagePull", "ImagePullBackOff") and "spec.image" in failed["message"]


def test_invalid_spec_is_reported_and_a_fix_starts_the_run(monkeypatch):
    with operator_harness(monkeypatch) as h:
        bad = manifest()
        bad["spec"]["phases"][1]["seqLen"] = 100
        h.create(bad)
        h.wait_state("Failed")
        failed = next(c for c in h.status()["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidSpec" and "spec.phases[1].seqLen" in failed["message"]
        assert h.jobs() == []
        h.patch_spec({"phases": manifest()["spec"]["phases"]})
        h.wait(lambda: h.jobs() == ["quickstart-a1"], "the fixed manifest did not start")


def test_editing_the_running_phase_is_refused_and_a_later_phase_accepted(monkeypatch):
    with operator_harness(monkeypatch) as h:
        h.create(manifest())
        h.running_pods(1)
        h.wait(lambda: h.status().get("attempt") == 1, "not running")
        phases = manifest()["spec"]["phases"]
        phases[0]["tokens"] = "1M"
        h.patch_spec({"phases": phases})
        h.wait(
            lambda: any(c["type"] == "SpecAccepted" and c["status"] == "False" for c in h.status()["conditions"]),
            "immutable edit not refused",
        )
        refused = next(c for c in h.status()["conditions"] if c["type"] == "SpecAccepted")
        assert refused["reason"] == "ImmutableFieldChanged" and "spec.phases[0]" in refused["message"]
        assert h.jobs() == ["quickstart-a1"] and h.status()["state"] == "Running"
        phases = manifest()["spec"]["phases"]
        phases[2]["tokens"] = "128K"
        h.patch_spec({"phases": phases})
        h.wait(
            lambda: any(c["type"] == "SpecAccepted" and c["status"] == "True" for c in h.status()["conditions"]),
            "later-phase edit not accepted",
        )
        data = h.api.get("configmaps", h.ns, "quickstart-a1")["data"]["trainingrun.yaml"]
        assert yaml.safe_load(data)["spec"]["phases"][2]["tokens"] == 128_000  # the running gang sees the edit


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
