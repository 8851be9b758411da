"""End to end: the real operator runs a real TrainingRun whose pods are real local processes (`stagerun launch`,
torchrun, gloo), across a killed pod and a phase that needs another topology.
"""

from __future__ import annotations

import copy
import signal

from conftest import SAMPLE_BYTES, TINY_RUN
from kopf.testing import KopfRunner
from kube.emulator import running_api
from kube.operator import fresh_operator
from kube.processes import ProcessCluster

from stagerun.trainer.checkpoint import CheckpointManager

NS = "default"


def e2e_manifest(checkpoint_url: str) -> dict:
    doc = copy.deepcopy(TINY_RUN)
    doc["metadata"] = {"name": "e2e", "namespace": NS}
    spec = doc["spec"]
    spec["phases"][0]["tokens"] = "128Ki"  # long enough to lose a pod in the middle of it
    spec["phases"][1]["resources"] = {"nodes": 1, "processesPerNode": 2}  # same world size, another shape: relaunch
    spec["resources"] = {"nodes": 2, "processesPerNode": 1}
    spec["checkpoint"] = {"path": checkpoint_url, "everyTokens": "8Ki", "keep": 2}
    spec["image"] = "stagerun:local"
    spec["hangTimeout"] = "5m"
    return doc


def total_steps() -> tuple[int, int]:
    from stagerun.core.plan import total_steps as steps
    from stagerun.core.spec import resolve_run

    run = resolve_run(e2e_manifest("file:///unused"))
    return steps(run), run.phases[-1].end_tokens


def test_training_run_survives_a_killed_pod_and_relaunches_for_a_new_topology(monkeypatch, tmp_path):
    registry, _ = fresh_operator(
        monkeypatch,
        {
            "STAGERUN_RECONCILE_SECONDS": "0.5",
            "STAGERUN_BACKOFF_BASE_SECONDS": "1",
            "STAGERUN_FAILURE_GRACE_SECONDS": "5",
        },
    )
    checkpoints = tmp_path / "checkpoints"
    url = f"file://{checkpoints}"
    pod_env = {"STAGERUN_MAX_SOURCE_BYTES": str(SAMPLE_BYTES), "OMP_NUM_THREADS": "1"}
    with (
        running_api() as api,
        api.use_kubeconfig(),
        ProcessCluster(api, tmp_path / "pods", extra_env=pod_env) as cluster,
        KopfRunner(["run", "--standalone", "-A"], registry=registry) as runner,
    ):

        def status() -> dict:
            return (api.get("trainingruns", NS, "e2e") or {}).get("status") or {}

        def diagnostics() -> str:
            return f"status: {status()}\nlogs:\n{cluster.all_logs(max_chars=6000)}"

        api.custom().create_namespaced_custom_object("stagerun.io", "v1alpha1", NS, "trainingruns", e2e_manifest(url))
        # Wait for the first committed checkpoint of the first gang, then kill pod 1's process.
        manager = CheckpointManager(url, keep=100)
        api.wait_for(lambda: manager.latest() is not None, timeout=180, message=diagnostics)
        first = manager.latest()
        victim = next(
            p
            for p in cluster.pods(job="e2e-a1")
            if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
        )
        cluster.kill_pod_process(victim, sig=signal.SIGKILL)

        api.wait_for(lambda: status().get("attempt", 0) >= 2, timeout=120, message=diagnostics)
        api.wait_for(lambda: status().get("state") == "Succeeded", timeout=300, message=diagnostics)
        final = status()
        events = {e["reason"]: e["message"] for e in api.events(NS)}
        logs = cluster.all_logs(max_chars=200_000)
    assert runner.exception is None, runner.output[-5000:]

    steps, tokens = total_steps()
    assert final["step"] == steps and final["tokensSeen"] == tokens, final
    # Usually PodFailed (the killed process); PodLost when the Job controller's teardown of the peer is seen first.
    assert final["restarts"] == 1 and final["lastFailure"]["reason"] in ("PodFailed", "JobFailed", "PodLost"), final
    assert final["attempt"] == 3, final  # 1: killed; 2: resumed, ran core to its end; 3: the new topology
    assert "Restarted" in events and "PhaseStarted" in events, events
    assert manager.latest().step == steps
    # The second gang resumed from a checkpoint, never from scratch.
    resumed = [line for line in logs.splitlines() if "resumed from" in line]
    assert resumed, logs[-4000:]
    assert all("step 0," not in line for line in resumed)
    assert first.step >= 1
