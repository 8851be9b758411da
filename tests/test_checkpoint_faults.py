"""Checkpoint faults end to end (docs/checkpoints.md): the real `stagerun run` CLI, real torchrun gangs (2 ranks,
gloo, CPU), real files; the faults come from tests/faults.py through ``STAGERUN_CALLBACKS``.

- A poisoned checkpoint (committed, checksums intact, NaN inside) gives a non-finite loss right after the resume:
  the gang falls back once, in the same process, to the previous checkpoint and de-commits the poisoned one; when
  the state it falls back to diverges too, the run stops instead of falling back again.
- A second Ctrl-C waits (bounded) for a stuck save, then kills the gang: the prompt never returns while a worker
  still runs.
- A save that fails for lack of space names the space needed and the fix, not "run the same command again".

The tiny run (tests/conftest.py) checkpoints after steps 4, 8, 10, 12, ... and ends at step 22.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
from conftest import SAMPLE_BYTES, run_tiny, tiny_run, write_manifest

from stagerun.trainer.checkpoint import MARKER, CheckpointManager
from stagerun.trainer.checkpoint_resume import DAMAGED, RESUMED
from stagerun.trainer.telemetry import read_metrics, read_status

FALLBACK = "NON-FINITE LOSS RIGHT AFTER A RESUME: falling back once to"


def raw_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def resumes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def poisoned(shared_data, tmp_path_factory):
    """A run whose checkpoint at step 8 is committed and intact but holds NaN parameters, killed right after it.

    NaN goes into AdamW's first moment after step 7: step 8's loss is finite (so it is saved), its update is not."""
    folder = tmp_path_factory.mktemp("poisoned")
    run_dir = folder / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").symlink_to(shared_data / "tokenizer.json")
    (run_dir / "data").symlink_to(shared_data / "data")
    manifest = write_manifest(folder / "tiny.yaml", tiny_run())
    killed = run_tiny(manifest, run_dir, env=faults.env(poison_after_step=7, kill_after_step=8))
    assert killed.returncode != 0 and "resume from step 8" in killed.stdout, killed.stdout[-3000:]
    committed = [c.step for c in CheckpointManager(str(run_dir / "checkpoints"), keep=2).committed()]
    assert committed == [4, 8], committed
    return {"dir": run_dir, "manifest": manifest, "metrics": raw_metrics(run_dir)}


def copy_of(poisoned, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(poisoned["dir"], run_dir, symlinks=True)
    return run_dir


def test_a_poisoned_checkpoint_falls_back_once_and_the_run_finishes(poisoned, tmp_path):
    run_dir = copy_of(poisoned, tmp_path)
    observed = tmp_path / "resumes.jsonl"
    result = run_tiny(poisoned["manifest"], run_dir, env=faults.env(resumes_file=observed))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "complete at step 22" in result.stdout
    fallbacks = [line for line in result.stdout.splitlines() if FALLBACK in line]
    assert len(fallbacks) == 1 and "step-00000004" in fallbacks[0], fallbacks
    assert "loss is nan at step 9" in fallbacks[0]
    # What the gang loaded: the poisoned step 8, then (same process) step 4, with step 8 de-committed by then.
    first, second = resumes(observed)
    assert first["step"] == 8 and first["committed"] == ["step-00000004", "step-00000008"]
    assert second["step"] == 4 and second["committed"] == ["step-00000004"]
    reason = second["damaged"]["step-00000008"]
    assert "loss is nan at step 9" in reason and "fell back to" in reason and "step-00000004" in reason
    # Training went on from step 4 exactly as the first run had trained from it, and every loss is finite.
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 23))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    before = {m["step"]: m["loss"] for m in poisoned["metrics"]}
    assert [m["loss"] for m in metrics[4:8]] == [before[s] for s in (5, 6, 7, 8)]
    # Step 4 resumed and stepped with a finite loss: RESUMED.json names it and retention keeps it.
    assert json.loads((run_dir / "checkpoints" / RESUMED).read_text())["step"] == 4
    steps = [c.step for c in CheckpointManager(str(run_dir / "checkpoints"), keep=2).committed()]
    assert steps == [4, 16, 20, 22], steps
    assert read_status(run_dir).state == "complete"


def test_a_second_non_finite_loss_after_the_fallback_stops_the_run(poisoned, tmp_path):
    """Every resume is poisoned here (also the fallback's): one fallback, then the usual divergence error."""
    run_dir = copy_of(poisoned, tmp_path)
    observed = tmp_path / "resumes.jsonl"
    result = run_tiny(
        poisoned["manifest"], run_dir, env=faults.env(poison_on_resume=True, resumes_file=observed), timeout=240
    )
    assert result.returncode != 0, result.stdout[-4000:]
    assert result.stdout.count(FALLBACK) == 1, result.stdout[-4000:]
    assert "loss is nan at step 5" in result.stdout and "Lower lr.peak" in result.stdout
    assert [r["step"] for r in resumes(observed)] == [8, 4]  # no third load: it does not loop
    ck = run_dir / "checkpoints"
    assert [c.step for c in CheckpointManager(str(ck), keep=2).committed()] == [4]  # the target stays committed
    assert (ck / "step-00000008" / DAMAGED).exists() and not (ck / "step-00000008" / MARKER).exists()
    assert "run the same command again to resume from step 4" in result.stdout
    assert not (ck / RESUMED).exists()  # no resume ever stepped with a finite loss


# ------------------------------------------------------------------------------------------- double Ctrl-C

ABORT_WAIT = 6.0  # runner.ABORT_WAIT_SECONDS (30 s) for this test, so it stays short


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"  # a zombie has ended
    except (OSError, IndexError):
        return False


def test_a_second_ctrl_c_waits_for_a_stuck_save_then_kills_every_worker(run_dir, tmp_path):
    manifest = write_manifest(tmp_path / "tiny.yaml", tiny_run())
    hang_dir = tmp_path / "hang"
    hang_dir.mkdir()
    code = (
        "import sys, stagerun.trainer.runner as runner; runner.ABORT_WAIT_SECONDS = float(sys.argv[1]); "
        "from stagerun.trainer.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    args = ["run", str(manifest), "--run-dir", str(run_dir), "--max-source-bytes", str(SAMPLE_BYTES)]
    env = dict(os.environ, **faults.env(hang_before_commit=4, hang_dir=hang_dir))
    log_path = tmp_path / "out.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(ABORT_WAIT), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal: Ctrl-C signals the whole foreground process group
        )
    try:
        deadline = time.monotonic() + 180
        while len(list(hang_dir.glob("hung-rank*.pid"))) < 2 and process.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        assert process.poll() is None, log_path.read_text()[-3000:]
        workers = [int(p.read_text()) for p in sorted(hang_dir.glob("hung-rank*.pid"))]
        torchrun = [int(c) for c in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        gang = workers + torchrun
        assert len(torchrun) == 1 and all(alive(p) for p in gang)

        os.killpg(process.pid, signal.SIGINT)  # first Ctrl-C: stop after the checkpoint, which never commits
        time.sleep(1.5)
        assert process.poll() is None and all(alive(p) for p in workers)
        second = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        while process.poll() is None and time.monotonic() < second + ABORT_WAIT - 1.0:
            assert all(alive(p) for p in workers)  # still stuck in the save: the prompt must not come back
            time.sleep(0.05)
        assert process.poll() is None, "the prompt came back while workers were still running"
        process.wait(timeout=ABORT_WAIT + 30)  # bounded: the gang is killed once the wait is over
        returned = time.monotonic()
        survivors = [p for p in gang if alive(p)]  # looked at the moment the prompt came back
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log_path.read_text()
    assert not survivors, (survivors, output[-3000:])
    assert ABORT_WAIT - 1.0 <= returned - second <= ABORT_WAIT + 30, returned - second
    assert f"aborting: waiting up to {ABORT_WAIT:.0f} s" in output and "did not stop" not in output
    assert CheckpointManager(str(run_dir / "checkpoints"), keep=2).latest() is None  # step 4 never committed
    assert "run the same command again to resume from the start" in output


# ------------------------------------------------------------------------------------------- disk full


def test_a_full_disk_names_the_space_needed_and_the_fix(run_dir, tmp_path):
    manifest = write_manifest(tmp_path / "tiny.yaml", tiny_run())  # keep: 2
    result = run_tiny(manifest, run_dir, env=faults.env(disk_full_at=8))  # rank 1's write of step 8: ENOSPC
    output = result.stdout
    assert result.returncode != 0, output[-3000:]
    ck = run_dir / "checkpoints"
    marker = json.loads((ck / "step-00000004" / MARKER).read_text())
    need = f"{3 * marker['bytes'] / 1e9:.2f}"  # keep + 1 checkpoints at the last one's size
    final = [line for line in output.splitlines() if line.startswith("tiny: workers failed: ")]
    assert len(final) == 1, output[-3000:]
    message = final[0]
    assert f"checkpoint step 8 could not be written under {ck}: no space left on device" in message
    assert f"room for keep + 1 = 3 checkpoints (about {need} GB at the last checkpoint's size)" in message
    assert "plus the resumed-from one retention protects" in message
    assert re.search(
        r"Free space there, lower spec\.checkpoint\.keep, or point spec\.checkpoint\.path at a larger", message
    )
    assert "run the same command again" not in output
    assert [c.step for c in CheckpointManager(str(ck), keep=2).committed()] == [4]
    status = read_status(run_dir)
    assert status.state == "failed" and "no space left on device" in status.message
