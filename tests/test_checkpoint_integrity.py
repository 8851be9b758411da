"""Checkpoint integrity (issue 19 item 1): per-file sha256 in the commit marker, verified on load, fallback to the
previous committed checkpoint with the damaged file named, never to scratch, and retention that keeps the last
checkpoint a gang resumed and stepped from.

Multi-process tests run tests/_ckpt_worker.py under torchrun (2 ranks, gloo, FSDP2) on real files: a reference run
saves at steps 3 and 5; the damaged copies resume with ``--resume-intact`` (the trainer's resume path).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_checkpoint import losses, torchrun

from stagerun.trainer.checkpoint import MARKER, CheckpointManager
from stagerun.trainer.checkpoint_checksums import ChecksumError
from stagerun.trainer.checkpoint_resume import (
    DAMAGED,
    NoIntactCheckpoint,
    agreed_candidates,
    load_newest_intact,
    record_good_resume,
    refuse_scratch_after_damage,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    torchrun(2, root / "ck", "--steps", 6, "--save-at", "3,5", "--losses", root / "losses.json")
    return {"ck": root / "ck", "losses": losses(root / "losses.json")}


def damaged_copy(reference, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(reference["ck"], ck)
    return ck


def flip_bit(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def assert_fell_back_from_5(proc, ck, reference, tmp_path, file_name: str, why: str) -> None:
    assert "load: " in proc.stdout and "from step 3" in proc.stdout, proc.stdout[-2000:]
    assert "CHECKPOINT DAMAGED" in proc.stderr and file_name in proc.stderr, proc.stderr[-3000:]
    record = json.loads((ck / "step-00000005" / DAMAGED).read_text())
    assert file_name in record["reason"] and why in record["reason"]
    assert record["marker"]["step"] == 5  # the original marker is kept in the record
    assert not (ck / "step-00000005" / MARKER).exists()  # de-committed: no later listing sees it
    # The fallback trains on exactly as a clean resume from step 3 does.
    assert losses(tmp_path / "l.json") == {s: reference["losses"][s] for s in (4, 5, 6)}


def test_marker_records_a_digest_per_file_of_every_rank(reference):
    marker = json.loads((reference["ck"] / "step-00000005" / MARKER).read_text())
    assert marker["checksum"] == "sha256"
    assert set(marker["files"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.json"}
    for name, entry in marker["files"].items():
        assert (reference["ck"] / "step-00000005" / name).stat().st_size == entry["bytes"], name
        assert len(entry["sha256"]) == 64


def test_a_flipped_bit_is_detected_and_the_previous_checkpoint_resumes(reference, tmp_path):
    ck = damaged_copy(reference, tmp_path)
    shard = ck / "step-00000005" / "__1_0.distcp"
    flip_bit(shard, shard.stat().st_size // 2)
    proc = torchrun(2, ck, "--steps", 6, "--resume-intact", "--losses", tmp_path / "l.json")
    assert_fell_back_from_5(proc, ck, reference, tmp_path, "__1_0.distcp", "does not match its sha256")


def test_a_truncated_file_is_detected_and_the_previous_checkpoint_resumes(reference, tmp_path):
    ck = damaged_copy(reference, tmp_path)
    shard = ck / "step-00000005" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = torchrun(2, ck, "--steps", 6, "--resume-intact", "--losses", tmp_path / "l.json")
    assert_fell_back_from_5(proc, ck, reference, tmp_path, "__0_0.distcp", "truncated")


def test_no_intact_checkpoint_stops_with_the_path_and_never_starts_from_scratch(reference, tmp_path):
    ck = damaged_copy(reference, tmp_path)
    for step in (3, 5):
        flip_bit(ck / f"step-{step:08d}" / ".metadata", 40)
    proc = torchrun(2, ck, "--steps", 6, "--resume-intact", check=False)
    assert proc.returncode != 0
    assert "NoIntactCheckpoint: no intact checkpoint under" in proc.stderr and str(ck) in proc.stderr
    assert "Restore the damaged files" in proc.stderr
    mgr = CheckpointManager(ck, keep=2)
    assert mgr.committed() == []
    with pytest.raises(NoIntactCheckpoint, match=r"were de-committed as damaged"):
        refuse_scratch_after_damage(mgr)  # the next gang does not take "nothing committed" for a new run


# ------------------------------------------------------------------------------------------- single process


def save(mgr: CheckpointManager, step: int, value: float = 1.0) -> None:
    mgr.save(step, {"w": torch.full((1000,), value + step)}, {"tokens": step, "phase_index": 0}, phase_boundary=False)


@pytest.mark.parametrize("where", ["memory", "local"])
def test_load_names_the_damaged_file(tmp_path, where):
    import uuid

    url = f"memory://integrity-{uuid.uuid4().hex}" if where == "memory" else str(tmp_path / "ck")
    mgr = CheckpointManager(url, keep=3)
    save(mgr, 1)
    info = mgr.latest()
    shard = f"{mgr.root}/step-00000001/__0_0.distcp"
    data = bytearray(mgr.fs.cat_file(shard))
    data[-8] ^= 1
    mgr.fs.pipe_file(shard, bytes(data))
    with pytest.raises(ChecksumError, match=r"step-00000001 is damaged: __0_0.distcp does not match its sha256"):
        mgr.load(info, {"w": torch.zeros(1000)})


def test_a_checkpoint_without_digests_still_loads_with_a_note(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep=3)
    save(mgr, 1)
    marker_path = tmp_path / "step-00000001" / MARKER
    marker = json.loads(marker_path.read_text())
    del marker["files"], marker["checksum"]  # as written before checksums existed
    marker_path.write_text(json.dumps(marker))
    target = {"w": torch.zeros(1000)}
    with caplog.at_level("WARNING"):
        mgr.load(mgr.latest(), target)
    assert torch.equal(target["w"], torch.full((1000,), 2.0))
    assert "predates checksums" in caplog.text


def test_fallback_without_a_process_group_and_a_model_mismatch_is_not_damage(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    save(mgr, 1)
    save(mgr, 2)
    (tmp_path / "step-00000002" / "meta.json").write_text("{}")  # committed, but its meta.json is damaged
    target = {"w": torch.zeros(1000)}
    info, meta = load_newest_intact(mgr, target, agreed_candidates(mgr))
    assert info.step == 1 and meta["step"] == 1 and torch.equal(target["w"], torch.full((1000,), 2.0))
    assert [i.step for i in mgr.committed()] == [1] and (tmp_path / "step-00000002" / DAMAGED).exists()

    def refuse(info):
        def check(meta):
            raise RuntimeError("written by a different model")

        return check

    with pytest.raises(RuntimeError, match="different model"):  # the user's error: raised, nothing de-committed
        load_newest_intact(mgr, target, agreed_candidates(mgr), refuse)
    assert [i.step for i in mgr.committed()] == [1]


def test_retention_keeps_the_checkpoint_last_resumed_and_stepped_from(tmp_path):
    """keep: 2 after poisoned commits: the resumed-from checkpoint survives until a newer one is resumed from."""
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2):
        save(mgr, step)
    record_good_resume(mgr, mgr.latest())  # a gang resumed from 2 and took a finite step
    deleted = []
    for step in (3, 4, 5):  # what that gang committed (poisoned, as it later turns out)
        save(mgr, step)
        deleted += mgr.apply_retention()
    assert [i.step for i in mgr.committed()] == [2, 4, 5]  # without the rule, 2 (the last good state) would be gone
    assert deleted == [str(tmp_path / "step-00000001"), str(tmp_path / "step-00000003")]
    # A fresh manager (the next gang) knows the rule from RESUMED.json once it resumes.
    again = CheckpointManager(tmp_path, keep=2)
    record_good_resume(again, again.committed()[-1])  # resumed from 5 and stepped: 2 is no longer needed
    save(again, 6)
    assert again.apply_retention() == [str(tmp_path / "step-00000002"), str(tmp_path / "step-00000004")]
