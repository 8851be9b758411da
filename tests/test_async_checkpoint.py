"""Async checkpoints (CheckpointManager.save_async, spec.checkpoint.asyncSave) on CPU with gloo.

The state is copied to host memory, training goes on, and a background thread writes it and then the commit
marker. These tests show that the checkpoint holds the state of its own step although later steps changed the
live tensors while it was written, that a rank lost mid-write leaves a folder that is never loaded, and that a run
with async saves resumes to the same losses as one never interrupted.
"""

from __future__ import annotations

import re
import threading

import faults
import pytest
import torch
from conftest import run_tiny, tiny_run, write_manifest
from test_checkpoint import assert_same_state, copy_ck, losses, torchrun

from stagerun.trainer.checkpoint import MARKER, CheckpointManager
from stagerun.trainer.telemetry import read_metrics

SLOW_WRITE = 1.0  # seconds each rank's write takes longer: steps 4-6 run while step 3 is being written


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker's 6 steps on 2 ranks, checkpoint at 3: synchronous, and async with slow writes."""
    out = {}
    for name, extra in (("sync", ()), ("async", ("--async", "--slow-write", SLOW_WRITE))):
        root = tmp_path_factory.mktemp(name)
        (root / "dump").mkdir()
        proc = torchrun(
            2, root / "ck", "--steps", 6, "--save-at", 3, "--dump", root / "dump", "--losses", root / "l.json", *extra
        )
        out[name] = {
            "ck": root / "ck",
            "saved3": torch.load(root / "dump" / "saved-3-w2.pt"),
            "losses": losses(root / "l.json"),
            "stdout": proc.stdout,
        }
    return out


def test_async_save_holds_its_steps_state_while_training_goes_on(runs, tmp_path):
    sync, asynchronous = runs["sync"], runs["async"]
    assert asynchronous["losses"] == sync["losses"]  # the save changed nothing in the training
    stall = float(re.search(r"save step 3: stalled ([\d.]+) s", asynchronous["stdout"]).group(1))
    total = float(re.search(r"async step 3 committed after ([\d.]+) s", asynchronous["stdout"]).group(1))
    assert total >= SLOW_WRITE and stall < SLOW_WRITE / 4, (stall, total)  # training waited for the copy only
    (tmp_path / "dump").mkdir()
    torchrun(
        2, asynchronous["ck"], "--steps", 6, "--resume", "--dump", tmp_path / "dump", "--losses", tmp_path / "l.json"
    )
    loaded = torch.load(tmp_path / "dump" / "loaded-w2.pt")
    assert loaded["step"] == 3
    assert_same_state(loaded, sync["saved3"])  # bitwise the step-3 state, not what steps 4-6 made of it
    assert losses(tmp_path / "l.json") == {s: sync["losses"][s] for s in (4, 5, 6)}


def test_a_rank_killed_during_an_async_write_leaves_nothing_loadable(runs, tmp_path):
    ck = copy_ck(runs["async"], tmp_path)
    args = ("--steps", 6, "--save-at", 5, "--resume", "--async")
    proc = torchrun(2, ck, *args, "--kill-during-write", 1, check=False)
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    half = ck / "step-00000005"
    assert (half / "__1_0.distcp").exists()  # rank 1's shard was written...
    assert not (half / ".metadata").exists() and not (half / MARKER).exists()  # ...but nothing completes it
    assert [i.step for i in CheckpointManager(ck, keep=3).committed()] == [3]
    torchrun(2, ck, *args, "--losses", tmp_path / "l.json")  # resumes from 3, saves 5 again (leftover replaced)
    assert losses(tmp_path / "l.json") == {s: runs["sync"]["losses"][s] for s in (4, 5, 6)}
    assert [i.step for i in CheckpointManager(ck, keep=3).committed()] == [3, 5]


def async_manifest(path):
    manifest = tiny_run()
    manifest["spec"]["checkpoint"]["asyncSave"] = True
    return write_manifest(path, manifest)


def test_a_run_with_async_saves_resumes_to_the_same_losses(run_dir, tmp_path):
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    for link in ("tokenizer.json", "data"):
        (straight_dir / link).symlink_to((run_dir / link).resolve())
    manifest = async_manifest(tmp_path / "tiny.yaml")
    straight = run_tiny(manifest, straight_dir)
    assert straight.returncode == 0, straight.stdout[-4000:]
    steps = [c.step for c in CheckpointManager(str(straight_dir / "checkpoints"), keep=2).committed()]
    assert steps == [16, 20, 22]  # retention as with synchronous saves: the newest two plus every phase's last
    # Step 12's save dies in its background thread after the data and meta.json, before the marker.
    crashed = run_tiny(manifest, run_dir, env=faults.env(crash_before_commit=12))
    assert crashed.returncode != 0
    assert (run_dir / "checkpoints" / "step-00000012").is_dir()
    assert CheckpointManager(str(run_dir / "checkpoints"), keep=2).latest().step == 10
    resumed = run_tiny(manifest, run_dir)
    assert resumed.returncode == 0 and "(step 10)" in resumed.stdout, resumed.stdout[-4000:]
    ours, theirs = read_metrics(run_dir / "metrics.jsonl"), read_metrics(straight_dir / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, 23))
    for key in ("loss", "gradNorm", "batchChecksum", "tokensPerSource"):
        assert [m[key] for m in ours] == [m[key] for m in theirs], key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_async_save_of_cuda_state_stages_into_pinned_memory(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    weights = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    expected = weights.cpu()
    for step in (1, 2):  # the second save reuses the first's pinned buffers where torch allows (compat.py)
        manager.save_async(step, {"w": weights}, {"tokens": step, "phase_index": 0}, phase_boundary=False, pinned=True)
        weights.mul_(-1)  # the next "step" changes the live tensor while the save is written
        info = manager.wait()
        loaded = {"w": torch.zeros_like(weights)}
        manager.load(info, loaded)
        assert torch.equal(loaded["w"].cpu(), expected), step
        expected = weights.cpu()
        assert manager.last_stall_seconds < manager.last_save_seconds


def test_a_failed_background_save_surfaces_once_in_the_training_thread(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.before_commit.append(lambda step: (_ for _ in ()).throw(OSError(f"disk full while saving {step}")))
    meta = {"tokens": 1, "phase_index": 0}
    assert manager.save_async(1, {"w": torch.ones(2)}, meta, phase_boundary=False, pinned=False) is None
    with pytest.raises(OSError, match="disk full while saving 1"):
        manager.wait()
    assert manager.wait() is None and manager.committed() == []
    assert not (tmp_path / "step-00000001" / MARKER).exists()


def test_an_abandoned_save_never_writes_its_marker(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    release, reached = threading.Event(), threading.Event()
    manager.before_commit.append(lambda step: reached.set() or release.wait(10))  # a write that takes long
    manager.save_async(1, {"w": torch.ones(2)}, {"tokens": 1, "phase_index": 0}, phase_boundary=False, pinned=False)
    assert reached.wait(10) and manager.poll() is None  # still in flight: poll never blocks
    with pytest.raises(TimeoutError):
        manager.wait(timeout=0.1)  # the run is failing and gives up on it
    release.set()
    thread = next(t for t in threading.enumerate() if t.name == "checkpoint-1")
    thread.join(10)
    assert (tmp_path / "step-00000001" / ".metadata").exists() and manager.committed() == []
