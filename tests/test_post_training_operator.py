"""Post-training through the operator on the real control plane (issue 18): a TrainingRun that pretrains, fine-tunes
(sft) and aligns (dpo) reaches Succeeded, and a second TrainingRun chained to it by spec.model.init (a dpo run from the
first run's checkpoints, with the tokenizer the first run published next to them) does too.

As in test_operator_e2e.py, everything between the operator and the trainer is the real thing: apiserver, Job
controller, scheduler, and the process kubelet running each pod's `stagerun launch` (torchrun, gloo) as a local
process with a loopback address. The pods prepare their own data: the tokenizer is trained with the chatml tokens
by pod 0 and published at `<checkpoint.path>/tokenizer.json`, the built-in chat and preference corpora tokenized
through the template.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from cluster.control_plane import ControlPlane
from cluster.operator import fresh_operator, running_operator
from cluster.process_kubelet import ProcessKubelet
from conftest import SAMPLE_BYTES
from test_operator_e2e import RUNS, wait_for
from test_post_training_runs import DPO, PRETRAIN, SFT, STEPS, post_training_run

from stagerun.core.chat_template import CHATML
from stagerun.core.plan import tokens_at_step, total_steps
from stagerun.core.spec import resolve_run
from stagerun.trainer.checkpoint import CheckpointManager
from stagerun.trainer.telemetry import read_metrics


def cluster_run(name: str, checkpoint_url: str, placement: dict, manifest: dict) -> dict:
    doc = copy.deepcopy(manifest)
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    spec["resources"] = {"nodes": 1, "processesPerNode": 2}
    spec["checkpoint"] = {"path": checkpoint_url, "everyTokens": "4Ki", "keep": 2}
    spec["image"] = "stagerun:local"
    spec["hangTimeout"] = "5m"
    spec["scheduling"] = placement  # onto the process kubelet's nodes, never a kwok node of another test
    return doc


def chained_dpo_run(base_checkpoint_url: str) -> dict:
    """The dpo phase alone, from the first run's final weights and its published tokenizer."""
    dpo = copy.deepcopy(DPO)
    dpo["seqLen"] = SFT["seqLen"]  # a first phase states its seqLen
    dpo.pop("optimizer")  # a run from spec.model.init starts with a fresh optimizer anyway
    manifest = post_training_run(
        dpo,
        tokenizer={"path": f"{base_checkpoint_url}/tokenizer.json", "chatTemplate": {"format": "chatml"}},
    )
    manifest["spec"]["model"] = {"preset": "tiny", "init": {"from": "checkpoint", "path": base_checkpoint_url}}
    return manifest


def pod_metrics(kubelet: ProcessKubelet, namespace: str, run: str) -> list[dict]:
    """metrics.jsonl of the run's one pod (its run dir is in the pod's `work` emptyDir, kept by the kubelet)."""
    (path,) = kubelet.workdir.glob(f"pods/{namespace}.{run}-a1-*/**/metrics.jsonl")
    return read_metrics(path)


def test_a_training_run_pretrains_fine_tunes_and_aligns_then_a_chained_run_aligns_from_it(
    control_plane: ControlPlane, namespace: str, trainingrun_crd, monkeypatch, tmp_path
):
    registry, _ = fresh_operator(
        monkeypatch,
        control_plane.kubeconfig,
        {"STAGERUN_RECONCILE_SECONDS": "0.5", "STAGERUN_BACKOFF_BASE_SECONDS": "1"},
    )
    base_url, chained_url = f"file://{tmp_path / 'base'}", f"file://{tmp_path / 'chained'}"
    pod_env = {"STAGERUN_MAX_SOURCE_BYTES": str(SAMPLE_BYTES), "OMP_NUM_THREADS": "1"}
    runs = RUNS.format(namespace=namespace)
    kubelet = ProcessKubelet(control_plane, tmp_path / "kubelet", nodes=1, extra_env=pod_env, max_grace_s=30)
    with kubelet, running_operator(registry, namespace):

        def status(name: str) -> dict:
            return control_plane.request("GET", f"{runs}/{name}").get("status") or {}

        def diagnostics(name: str):
            return lambda: f"status: {status(name)}\nlogs:\n{kubelet.all_logs(max_chars=6000)}"

        base = cluster_run("post", base_url, kubelet.placement(), post_training_run(PRETRAIN, SFT, DPO))
        control_plane.request("POST", runs, base)
        wait_for("post Succeeded", lambda: status("post").get("state") == "Succeeded", diagnostics("post"), 420)
        base_status, base_metrics = status("post"), pod_metrics(kubelet, namespace, "post")

        chained = cluster_run("post-dpo", chained_url, kubelet.placement(), chained_dpo_run(base_url))
        control_plane.request("POST", runs, chained)
        wait_for(
            "post-dpo Succeeded", lambda: status("post-dpo").get("state") == "Succeeded", diagnostics("post-dpo"), 300
        )
        chained_status, chained_metrics = status("post-dpo"), pod_metrics(kubelet, namespace, "post-dpo")
        chained_logs = kubelet.all_logs(max_chars=400_000)
        phase_events = [
            e["message"]
            for e in control_plane.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
            if e["reason"] == "PhaseStarted" and e["involvedObject"]["name"] == "post"
        ]

    # The first run: every step of every phase, in one attempt (same shape throughout: no relaunch).
    run = resolve_run(base)
    assert base_status["step"] == total_steps(run) == sum(STEPS.values()), base_status
    assert (
        base_status["tokensSeen"] == tokens_at_step(run, total_steps(run)) == 32 * 1024 and base_status["attempt"] == 1
    ), base_status
    assert [m["phase"] for m in base_metrics] == [p for p, n in STEPS.items() for _ in range(n)]
    started = {f"phase {name} started in the same gang" for name in ("sft", "dpo")}
    assert started <= set(phase_events), phase_events
    sft = [m for m in base_metrics if m["phase"] == "sft"]
    dpo = [m for m in base_metrics if m["phase"] == "dpo"]
    assert "dpoLoss" not in sft[0] and sft[-1]["loss"] < sft[0]["loss"]
    # dpo's first step compares the policy with itself (its reference: the weights the phase starts from).
    assert dpo[0]["dpoLoss"] == pytest.approx(math.log(2), rel=1e-4) and dpo[0]["rewardsMargin"] == pytest.approx(0)
    assert sum(m["rewardsMargin"] for m in dpo[1:]) > 0 and all(m["pairs"] > 0 for m in dpo), dpo
    # The checkpoints record the chat format the run trained with; the tokenizer was published next to them.
    latest = CheckpointManager(base_url, keep=100).latest()
    assert latest.step == base_status["step"]
    meta = json.loads((Path(latest.path.removeprefix("file://")) / "meta.json").read_text())
    assert meta["chatTemplate"] == CHATML.to_json()
    assert (tmp_path / "base" / "tokenizer.json").is_file()

    # The chained run: its dpo starts from the first run's final weights, so its first step is again log 2 with
    # zero rewards (the reference is spec.model.init's weights), and it trains on pairs only.
    chained_run = resolve_run(chained)
    assert chained_status["step"] == total_steps(chained_run) == STEPS["dpo"], chained_status
    assert chained_status["tokensSeen"] == tokens_at_step(chained_run, STEPS["dpo"]) == 16 * 1024, chained_status
    assert chained_metrics[0]["dpoLoss"] == pytest.approx(math.log(2), rel=1e-4)
    assert chained_metrics[0]["rewardsMargin"] == pytest.approx(0)
    # Then the policy moves away from its reference (which way a margin goes in 4 steps of a second DPO round on a
    # 2-layer model is noise; the direction is the first run's and tests/test_dpo.py's).
    assert all(m["rewardsChosen"] != 0 and m["rewardsRejected"] != 0 for m in chained_metrics[1:]), chained_metrics
    assert {n for n, count in chained_metrics[-1]["tokensPerSource"].items() if count} == {"prefs"}
    # It began from the first run's last checkpoint (not random weights: those give a chosen-response NLL of about
    # log 512 = 6.24), which pod 0 says as it loads it.
    assert f"initial weights loaded from {latest.path}" in chained_logs, chained_logs[-4000:]
    assert chained_metrics[0]["dpoNll"] < math.log(512) - 0.25, chained_metrics[0]
