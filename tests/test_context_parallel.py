"""Context parallelism (trainer/context_parallel.py) is the same maths as one process, and checkpoints move between
CP degrees.

- The sharding arithmetic: load-balanced chunks, the gather order, positions computed before the split, the
  batch checksum counted once.
- tests/_cp_worker.py under torchrun (gloo, CPU): the real train_step for 5 steps on CP=2 (2 processes),
  CP=2 x FSDP=2 and (slow) CP=2 x TP=2 (4 processes) against a single-process reference: causal, document-causal
  with per-document RoPE positions and query/key norms, ALiBi with document masking, selective activation
  checkpointing; the tiny preset is grouped-query. FlexAttention (CUDA's kernel) is checked forward-only on CPU.
- The real `stagerun run` CLI: a CP=2 gang follows the CP=1 gang's losses, and a checkpoint written at CP=1
  resumes at CP=2 and back, on exactly the next tokens (batch checksums and per-source token counts equal).
- Validation: seqLen divisible by 2 x contextParallel, HSDP refused, both naming the field and the fix.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import faults
import numpy as np
import pytest
from conftest import run_tiny, tiny_run, write_manifest

from stagerun.core.spec import validate_manifest
from stagerun.trainer.batch import batch_checksum, document_positions
from stagerun.trainer.context_parallel import ContextShard, chunk_indices, sequence_order
from stagerun.trainer.data.loader import MicroBatch
from stagerun.trainer.telemetry import read_metrics

WORKER = Path(__file__).with_name("_cp_worker.py")
# float32 throughout; CP changes only the order of the reductions. Measured over 5 steps (CP=2, CP=2 x FSDP=2,
# CP=2 x TP=2): loss <= 2.9e-7, gradient norm <= 6.2e-7 and first-step gradients <= 8.5e-7 relative, so 1e-5 catches
# any real difference (FSDP over dp_shard alone, i.e. no gradient reduction over cp: loss off by 1e-3 after one
# update, gradients by ~95 %). Parameters after 5 AdamW steps
# differ by up to 3.3e-4 (relative to the tensor's largest value): Adam divides tiny gradients by their own
# root-mean-square, which amplifies the last bits; a real error moves them by the learning rate's order (~1e-2).
RTOL = 1e-5
PARAM_RTOL = 2e-3


def run_worker(tmp_path: Path, cp: int, dp: int, tp: int = 1) -> dict:
    out = tmp_path / f"cp{cp}-dp{dp}-tp{tp}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp * dp * tp}",
        "--monitor-interval=0.1", str(WORKER), str(out), "--cp", str(cp), "--dp", str(dp), "--tp", str(tp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun {' '.join(cmd[3:])} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(out.read_text())


def check_matches_single_process(results: dict) -> None:
    assert set(results) == {"causal", "docmask-perdocument", "alibi-docmask", "docmask-selective-ac"}
    for case, r in results.items():
        assert len(r["steps"]) == 5, case
        for index, step in enumerate(r["steps"]):
            assert step["loss_rel"] < RTOL, (case, index, step)
            assert step["grad_norm_rel"] < RTOL, (case, index, step)
            assert step["tokens"][0] == step["tokens"][1], (case, index)  # every token counted once
            assert step["checksum"][0] == step["checksum"][1], (case, index)
        assert r["same_params"], case
        worst_grad = max(r["grad_rel"].items(), key=lambda item: item[1])
        assert worst_grad[1] < 10 * RTOL, (case, worst_grad)
        worst_param = max(r["param_rel"].items(), key=lambda item: item[1])
        assert worst_param[1] < PARAM_RTOL, (case, worst_param)
        assert r["flex_rel"] < RTOL, (case, r["flex_rel"])  # CUDA's kernel choice, forward only on CPU


# --- sharding arithmetic ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_chunks_cover_the_sequence_once_and_balance_causal_work(cp):
    seq_len = 32
    parts = [chunk_indices(seq_len, cp, rank) for rank in range(cp)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(seq_len))
    # Causal work: query at position p sees p + 1 keys; every rank gets the same total.
    work = {int((part + 1).sum()) for part in parts}
    assert len(work) == 1, work
    gathered = np.concatenate(parts)
    assert gathered[sequence_order(seq_len, cp)].tolist() == list(range(seq_len))


def test_rank_holds_chunk_r_and_its_mirror():
    assert chunk_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match=r"seqLen: 18 is not a multiple of 2 x contextParallel \(4\)"):
        chunk_indices(18, 2, 0)


def test_shard_keeps_whole_sequence_positions_and_counts_the_checksum_once():
    doc_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]], dtype=np.int32)
    inputs = np.arange(16, dtype=np.int64)[None] + 100
    mb = MicroBatch(inputs, inputs + 1, doc_ids, ["a"])
    positions = [document_positions(doc_ids)]
    checksum = batch_checksum([mb])
    kept, kept_positions, shares = [], [], []
    for rank in range(2):
        part, pos, share = ContextShard(rank, 2).shard([mb], positions, checksum)
        kept.append(part[0])
        kept_positions.append(pos[0])
        shares.append(share)
    assert kept[1].inputs.tolist() == [[104, 105, 106, 107, 108, 109, 110, 111]]
    assert kept[1].targets.tolist() == [[105, 106, 107, 108, 109, 110, 111, 112]]
    # Rank 1's first token (position 4) is the second token of document 1: its position is 1, not 0 as it would
    # be if positions were computed after the split.
    assert kept_positions[1].tolist() == [[1, 2, 3, 4, 0, 1, 2, 3]]
    assert kept_positions[0].tolist() == [[0, 1, 2, 0, 4, 5, 6, 7]]
    assert kept[0].doc_ids.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2]]
    assert shares == [checksum, 0.0]


# --- the step against one process (real torchrun gangs) ---------------------------------------------------------


def test_cp2_follows_a_single_process(tmp_path):
    check_matches_single_process(run_worker(tmp_path, cp=2, dp=1))


def test_cp2_x_fsdp2_follows_a_single_process(tmp_path):
    check_matches_single_process(run_worker(tmp_path, cp=2, dp=2))


@pytest.mark.slow
def test_cp2_x_tp2_follows_a_single_process(tmp_path):
    """Heads split over tp first, then each rank's sequence part over tp (sequence parallel): 90 s on 2 cores."""
    check_matches_single_process(run_worker(tmp_path, cp=2, dp=1, tp=2))


# --- the real CLI: losses and checkpoints across CP degrees -----------------------------------------------------

# One phase, 6 steps of 1Ki tokens (16 sequences of 64), a checkpoint every 2 steps, document masking on.
STEPS = 6


def cp_run(cp: int) -> dict:
    manifest = tiny_run()
    spec = manifest["spec"]
    spec["phases"] = [copy.deepcopy(spec["phases"][0])]
    spec["phases"][0].update(tokens="6Ki", batch={"ramp": [{"tokens": 0, "size": "1Ki"}]})
    spec["checkpoint"] = {"everyTokens": "2Ki", "keep": 10}
    spec["parallelism"] = {"contextParallel": cp}
    return manifest


def completed(result) -> None:
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.fixture(scope="module")
def cp1_reference(shared_data, tmp_path_factory):
    """The 6-step run on 2 processes without context parallelism (dp 2)."""
    folder = tmp_path_factory.mktemp("cp1")
    run_dir = folder / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").symlink_to(shared_data / "tokenizer.json")
    (run_dir / "data").symlink_to(shared_data / "data")
    completed(run_tiny(write_manifest(folder / "cp1.yaml", cp_run(1)), run_dir))
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    return metrics


def assert_same_training(metrics: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in metrics] == [m["step"] for m in reference]
    # The same sequences in every step (the loader's position survives every resume), every token counted once.
    for key in ("batchChecksum", "tokensPerSource", "batchTokens"):
        assert [m[key] for m in metrics] == [m[key] for m in reference], key
    for ours, theirs in zip(metrics, reference):
        # As tests/test_training.py's FSDP comparison: 2 vs 1 data-parallel ranks, only reduction orders differ.
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-4), ours["step"]
        assert ours["gradNorm"] == pytest.approx(theirs["gradNorm"], rel=1e-3), ours["step"]


def test_cp2_gang_follows_the_cp1_losses(cp1_reference, run_dir, tmp_path):
    completed(run_tiny(write_manifest(tmp_path / "cp2.yaml", cp_run(2)), run_dir))
    assert_same_training(read_metrics(run_dir / "metrics.jsonl"), cp1_reference)


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_checkpoint_resumes_at_another_cp_degree(cp1_reference, run_dir, tmp_path, first, then):
    killed = run_tiny(
        write_manifest(tmp_path / "first.yaml", cp_run(first)), run_dir, env=faults.env(kill_after_step=3)
    )
    assert killed.returncode != 0 and "resume from step 2" in killed.stdout, killed.stdout[-3000:]
    resumed = run_tiny(write_manifest(tmp_path / "then.yaml", cp_run(then)), run_dir)
    completed(resumed)
    assert "resuming from" in resumed.stdout and "step 2" in resumed.stdout
    assert_same_training(read_metrics(run_dir / "metrics.jsonl"), cp1_reference)


# --- validation -------------------------------------------------------------------------------------------------


def problems(**parallelism) -> list:
    manifest = cp_run(1)
    manifest["spec"]["parallelism"] = parallelism
    manifest["spec"]["resources"] = {"processesPerNode": 4}
    return validate_manifest(manifest)


def test_cp_validates_and_seq_len_must_split_into_2cp_chunks():
    assert problems(contextParallel=2) == []
    assert problems(contextParallel=4) == []
    assert problems(contextParallel=2, tensorParallel=2) == []  # 64 = 2 x 2 x 2 x 8: chunks split over tp too
    manifest = cp_run(3)  # seqLen 64 does not cut into 6 chunks
    manifest["spec"]["resources"] = {"processesPerNode": 3}
    found = {p.path: p for p in validate_manifest(manifest)}
    assert list(found) == ["spec.phases[0].seqLen"], found
    assert "multiple of 2 x contextParallel x tensorParallel (6)" in found["spec.phases[0].seqLen"].message
    assert "multiple of 6" in found["spec.phases[0].seqLen"].fix


def test_hsdp_with_cp_is_refused_naming_the_field():
    found = {p.path: p for p in problems(contextParallel=2, dataParallelReplicate=2)}
    assert "spec.parallelism.dataParallelReplicate" in found, found
    assert "dataParallelReplicate: 1" in found["spec.parallelism.dataParallelReplicate"].fix
