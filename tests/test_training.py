"""End to end: the real `stagerun run` CLI starting real torchrun gangs (gloo, CPU) on real files.

Each test prepares nothing itself: the tiny run's tokenizer and shards are made once per session (conftest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from conftest import SAMPLE_BYTES, run_tiny, stagerun, tiny_run, write_manifest

from stagerun.trainer.checkpoint import CheckpointManager
from stagerun.trainer.telemetry import read_metrics, read_status

# The tiny run: 8 steps of 1Ki and 8 of 2Ki tokens (core), 4 of 2Ki (long), 2 of 2Ki (anneal). With a checkpoint
# every 4Ki tokens, saves happen after steps 4, 8, 10, 12, 14, 16, 18, 20 and 22; phases end at 16, 20 and 22.
TOTAL_STEPS = 22


def completed(result) -> None:
    assert result.returncode == 0, result.stdout[-4000:]


def final_weights(checkpoint_dir: Path, tmp_path: Path) -> dict:
    """The full (unsharded) model and optimizer tensors of the newest committed checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = CheckpointManager(str(checkpoint_dir), keep=100).latest()
    out = tmp_path / f"weights-{latest.step}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(latest.path, out)
    return torch.load(out, weights_only=False)


def flat_tensors(tree, prefix="") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


@pytest.fixture(scope="module")
def straight(shared_data, tmp_path_factory):
    """The tiny run, two processes, uninterrupted: the reference the resume tests compare against."""
    folder = tmp_path_factory.mktemp("straight")
    run_dir = folder / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").symlink_to(shared_data / "tokenizer.json")
    (run_dir / "data").symlink_to(shared_data / "data")
    return uninterrupted_run(write_manifest(folder / "tiny.yaml", tiny_run()), run_dir, folder)


def uninterrupted_run(manifest: Path, run_dir: Path, folder: Path) -> dict:
    """Run ``manifest`` in ``run_dir`` to completion; what the resume tests compare with (dir, manifest, metrics,
    output, final weights)."""
    result = run_tiny(manifest, run_dir)
    completed(result)
    return {
        "dir": run_dir,
        "manifest": manifest,
        "metrics": read_metrics(run_dir / "metrics.jsonl"),
        "output": result.stdout,
        "weights": final_weights(run_dir / "checkpoints", folder),
    }


def test_two_processes_train_through_all_phases_and_loss_falls(straight):
    metrics = straight["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, TOTAL_STEPS + 1))
    assert [m["phase"] for m in metrics] == ["core"] * 16 + ["long"] * 4 + ["anneal"] * 2
    assert [m["batchTokens"] for m in metrics[:9]] == [1024] * 8 + [2048]  # the ramp switches at 8Ki tokens
    assert {m["seqLen"] for m in metrics if m["phase"] == "long"} == {128}
    assert metrics[-1]["lr"] < metrics[-2]["lr"] < metrics[-3]["lr"]  # the anneal decays toward 0
    first, last = metrics[0]["loss"], min(m["loss"] for m in metrics[-6:])
    assert first == pytest.approx(torch.log(torch.tensor(512.0)).item(), abs=0.3)  # uniform over the vocab at init
    assert last < first - 0.7, (first, last)
    status = read_status(straight["dir"])
    assert status.state == "complete" and status.step == TOTAL_STEPS
    # Retention: the newest two plus every phase's last checkpoint.
    steps = [c.step for c in CheckpointManager(str(straight["dir"] / "checkpoints"), keep=2).committed()]
    assert steps == [16, 20, 22], steps
    assert "phase core finished" in straight["output"] and "complete at step 22" in straight["output"]


def test_anneal_changes_the_data_mix(straight):
    metrics = straight["metrics"]
    before, after = metrics[-3]["tokensPerSource"], metrics[-1]["tokensPerSource"]
    delta = {k: after[k] - before[k] for k in after}
    assert delta["code"] > 3 * delta["docs"]  # anneal weights: docs 0.2, code 0.8


def test_fsdp_two_ranks_match_a_single_process(straight, run_dir, tmp_path):
    manifest = write_manifest(tmp_path / "tiny.yaml", tiny_run())
    completed(run_tiny(manifest, run_dir, "--nproc", "1"))
    single = read_metrics(run_dir / "metrics.jsonl")
    assert [m["batchChecksum"] for m in single] == [m["batchChecksum"] for m in straight["metrics"]]
    for one, two in zip(single, straight["metrics"]):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-4, abs=1e-4), one["step"]
        assert one["gradNorm"] == pytest.approx(two["gradNorm"], rel=1e-3), one["step"]
    ours, theirs = flat_tensors(final_weights(run_dir / "checkpoints", tmp_path)), flat_tensors(straight["weights"])
    assert ours.keys() == theirs.keys()
    for key in ours:
        if ours[key].is_floating_point():
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-4, msg=key)


def test_resume_after_a_killed_worker_is_bitwise_identical(straight, run_dir, tmp_path):
    manifest = write_manifest(tmp_path / "tiny.yaml", tiny_run())
    killed = run_tiny(manifest, run_dir, env=faults.env(kill_after_step=13))
    assert killed.returncode != 0 and "run the same command again to resume from step 12" in killed.stdout
    resumed = run_tiny(manifest, run_dir)
    completed(resumed)
    assert "resuming from" in resumed.stdout and "step 12" in resumed.stdout
    metrics = read_metrics(run_dir / "metrics.jsonl")
    for key in ("loss", "gradNorm", "lr", "batchChecksum", "tokensPerSource"):
        assert [m[key] for m in metrics] == [m[key] for m in straight["metrics"]], key
    ours, theirs = flat_tensors(final_weights(run_dir / "checkpoints", tmp_path)), flat_tensors(straight["weights"])
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_resume_on_a_different_world_size_continues_on_the_same_tokens(straight, run_dir, tmp_path):
    manifest = write_manifest(tmp_path / "tiny.yaml", tiny_run())
    killed = run_tiny(manifest, run_dir, env=faults.env(kill_after_step=9))
    assert killed.returncode != 0
    completed(run_tiny(manifest, run_dir, "--nproc", "1"))  # 2 -> 1: DCP reshards model and optimizer
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["batchChecksum"] for m in metrics] == [m["batchChecksum"] for m in straight["metrics"]]
    assert [m["tokensPerSource"] for m in metrics] == [m["tokensPerSource"] for m in straight["metrics"]]
    for one, two in zip(metrics, straight["metrics"]):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-4, abs=1e-4), one["step"]


def test_crash_during_save_resumes_from_the_previous_checkpoint(straight, run_dir, tmp_path):
    manifest = write_manifest(tmp_path / "tiny.yaml", tiny_run())
    crashed = run_tiny(
        manifest, run_dir, env=faults.env(crash_before_commit=12)
    )  # dies after writing step 12's data, before its marker
    assert crashed.returncode != 0
    manager = CheckpointManager(str(run_dir / "checkpoints"), keep=2)
    assert (run_dir / "checkpoints" / "step-00000012").is_dir()  # the half-written checkpoint is there...
    assert manager.latest().step == 10  # ...but never taken for a good one
    resumed = run_tiny(manifest, run_dir)
    completed(resumed)
    assert "resuming from" in resumed.stdout and "(step 10)" in resumed.stdout
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["loss"] for m in metrics] == [m["loss"] for m in straight["metrics"]]


def test_ctrl_c_checkpoints_then_the_same_command_resumes(run_dir, tmp_path):
    long_run = tiny_run()
    long_run["spec"]["phases"][0]["tokens"] = "160Ki"  # long enough to interrupt early
    manifest = write_manifest(tmp_path / "tiny.yaml", long_run)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stagerun.trainer.cli",
            "run",
            str(manifest),
            "--run-dir",
            str(run_dir),
            "--max-source-bytes",
            str(SAMPLE_BYTES),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 5):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: signal the whole process group
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    status = read_status(run_dir)
    assert status.state == "stopped" and "run the same command again to resume" in output
    latest = CheckpointManager(str(run_dir / "checkpoints"), keep=2).latest()
    assert latest.step == status.step >= 5 and latest.step < 40  # stopped within a few steps, not at the end
    assert read_metrics(metrics_file)[-1]["step"] == status.step
    resumed = run_tiny(manifest, run_dir)
    completed(resumed)
    assert f"(step {status.step})" in resumed.stdout
    metrics = read_metrics(metrics_file)
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    tokens = [0] + [m["tokens"] for m in metrics]
    assert all(tokens[i + 1] - tokens[i] == metrics[i]["batchTokens"] for i in range(len(metrics)))
    assert read_status(run_dir).state == "complete"


def test_next_phase_with_another_topology_relaunches_the_gang(straight, run_dir, tmp_path):
    manifest_dict = tiny_run()
    manifest_dict["spec"]["phases"][1]["parallelism"] = {"tensorParallel": 2}  # TP over both ranks: dp 1
    manifest_dict["spec"]["phases"][1]["microBatchSize"] = 4
    manifest = write_manifest(tmp_path / "tiny.yaml", manifest_dict)
    result = run_tiny(manifest, run_dir)
    completed(result)
    assert "needs another topology" in result.stdout and "starting the next gang" in result.stdout
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, TOTAL_STEPS + 1))
    # Tensor parallelism is the same maths split differently: after the relaunch (DCP resharded FSDP-only
    # weights into TP x FSDP) the losses and gradient norms follow the FSDP-only run's.
    for ours, reference in zip(metrics, straight["metrics"]):
        assert ours["batchChecksum"] == reference["batchChecksum"]
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-4), ours["step"]
        assert ours["gradNorm"] == pytest.approx(reference["gradNorm"], rel=1e-3), ours["step"]


def test_invalid_manifest_is_rejected_before_any_process_starts(tmp_path):
    bad = tiny_run()
    bad["spec"]["phases"][1]["seqLen"] = 100
    bad["spec"]["phases"][2]["data"]["weights"] = {"docs": 0.5, "web": 0.5}
    manifest = write_manifest(tmp_path / "bad.yaml", bad)
    result = stagerun("run", str(manifest), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "spec.phases[1].seqLen: must be a positive multiple of 8, got 100" in result.stdout
    assert "spec.phases[2].data.weights.web: names no source" in result.stdout
    assert not (tmp_path / "run").exists()


def test_validate_and_plan_commands(tmp_path):
    root = Path(__file__).resolve().parents[1]
    ok = stagerun("validate", str(root / "examples" / "quickstart.yaml"))
    assert ok.returncode == 0 and "valid TrainingRun 'quickstart'" in ok.stdout
    plot = tmp_path / "schedule.png"
    plan = stagerun("plan", str(root / "examples" / "quickstart.yaml"), "--plot", str(plot), "--throughput", "3000")
    assert plan.returncode == 0, plan.stdout
    assert "micro x accum" in plan.stdout and "long-context" in plan.stdout and "ETA" in plan.stdout
    assert plot.stat().st_size > 10_000
    bad = tiny_run()
    bad["spec"]["phases"][0]["lr"]["schedule"] = "cosin"
    invalid = stagerun("validate", str(write_manifest(tmp_path / "bad.yaml", bad)))
    assert invalid.returncode == 1 and "did you mean 'cosine'" in invalid.stdout


def test_distillation_phase_learns_from_a_teacher_checkpoint(straight, run_dir, tmp_path):
    """AFM-style: the core phase distils from the straight run's final checkpoint (same architecture), sharded the
    same way; later phases do not distil."""
    manifest = tiny_run()
    manifest["spec"]["phases"][0]["distill"] = {
        "teacher": {"checkpoint": str(straight["dir"] / "checkpoints")},
        "weight": 0.9,
    }
    result = run_tiny(write_manifest(tmp_path / "tiny.yaml", manifest), run_dir)
    completed(result)
    assert "teacher loaded from" in result.stdout and "step-00000022" in result.stdout
    metrics = read_metrics(run_dir / "metrics.jsonl")
    core = [m for m in metrics if m["phase"] == "core"]
    later = [m for m in metrics if m["phase"] != "core"]
    assert all(m["distillLoss"] > 0 for m in core) and all(m["distillLoss"] == 0 for m in later)
    # The teacher is a trained model: its top-1 predictions are easier to fit than the raw labels, and fitting them
    # gets easier as the student learns.
    assert core[-1]["distillLoss"] < core[0]["distillLoss"] - 0.5
    assert core[-1]["distillLoss"] < core[-1]["loss"]


def test_distilling_from_a_missing_checkpoint_fails_with_a_clear_message(run_dir, tmp_path):
    manifest = tiny_run()
    manifest["spec"]["phases"][0]["distill"] = {"teacher": {"checkpoint": str(tmp_path / "nowhere")}}
    result = run_tiny(write_manifest(tmp_path / "tiny.yaml", manifest), run_dir)
    assert result.returncode != 0
    # Found by the pre-flight checks, before any worker starts (it used to surface only when the phase began).
    assert "found before starting any worker" in result.stdout
    assert "spec.phases[0].distill.teacher.checkpoint: phase core: no committed checkpoint at" in result.stdout
    assert "Traceback" not in result.stdout
