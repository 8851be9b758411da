"""Checkpoints (stagerun.trainer.checkpoint): DCP via fsspec, atomic commit, resharding, retention.

Multi-process tests launch tests/_ckpt_worker.py under torchrun (gloo, CPU, FSDP2). One reference run (module
fixture) trains 6 steps on 2 ranks, saves at step 3 and records its losses and the state it saved; the other
tests resume from copies of that checkpoint with other world sizes, or crash in the middle of a save.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
import torch.nn as nn
from faults import CRASH_ENV

from stagerun.core import storage
from stagerun.trainer.checkpoint import (
    MARKER,
    META,
    CheckpointInfo,
    CheckpointManager,
    ModelOptimizerState,
)

WORKER = Path(__file__).with_name("_ckpt_worker.py")


def torchrun(nproc: int, *args, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--monitor-interval=0.1",
        str(WORKER),
        *map(str, args),
    ]
    inherited = {k: v for k, v in os.environ.items() if k != CRASH_ENV}  # fault injection only where asked for
    full_env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        pytest.fail(f"torchrun {' '.join(cmd[3:])} exited {proc.returncode}\n{tail}")
    return proc


def assert_same_state(loaded: dict, saved: dict) -> None:
    """Bitwise equality of full parameters and every optimizer-state tensor (exp_avg, exp_avg_sq, step)."""
    assert loaded["params"].keys() == saved["params"].keys()
    for name, t in saved["params"].items():
        assert torch.equal(loaded["params"][name], t), name
    assert loaded["optim"].keys() == saved["optim"].keys()
    for name, st in saved["optim"].items():
        assert st.keys() == loaded["optim"][name].keys() and {"exp_avg", "exp_avg_sq", "step"} <= st.keys()
        for k, t in st.items():
            assert torch.equal(loaded["optim"][name][k], t), (name, k)


def losses(path: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """2 ranks, 6 uninterrupted steps, checkpoint at step 3 (state dumped right after saving it)."""
    root = tmp_path_factory.mktemp("reference")
    (root / "dump").mkdir()
    torchrun(2, root / "ck", "--steps", 6, "--save-at", 3, "--dump", root / "dump", "--losses", root / "losses.json")
    return {
        "ck": root / "ck",
        "saved3": torch.load(root / "dump" / "saved-3-w2.pt"),
        "losses": losses(root / "losses.json"),
    }


def copy_ck(reference, dest: Path) -> Path:
    shutil.copytree(reference["ck"], dest / "ck")
    (dest / "dump").mkdir()
    return dest / "ck"


# ------------------------------------------------------------------------------------------- multi-process


def test_resume_same_world_is_bitwise_and_continues_identically(reference, tmp_path):
    (tmp_path / "dump").mkdir()
    torchrun(2, reference["ck"], "--steps", 6, "--resume", "--dump", tmp_path / "dump", "--losses", tmp_path / "l.json")
    loaded = torch.load(tmp_path / "dump" / "loaded-w2.pt")
    assert loaded["step"] == 3
    assert loaded["meta"] == {"step": 3, "tokens": 24, "phase_index": 0, "loader": {"next_step": 4}}
    assert_same_state(loaded, reference["saved3"])
    resumed, full = losses(tmp_path / "l.json"), reference["losses"]
    assert resumed == {s: full[s] for s in (4, 5, 6)}  # exact float equality: same math, same order


def test_reshard_2_to_1_and_1_to_2(reference, tmp_path):
    ck = copy_ck(reference, tmp_path)
    # 2 -> 1: load the 2-rank checkpoint on one rank, then train a step and save it from that single rank.
    torchrun(1, ck, "--steps", 4, "--save-at", 4, "--resume", "--dump", tmp_path / "dump")
    assert_same_state(torch.load(tmp_path / "dump" / "loaded-w1.pt"), reference["saved3"])
    saved4 = torch.load(tmp_path / "dump" / "saved-4-w1.pt")
    # 1 -> 2: the single-rank checkpoint loads into two FSDP shards.
    (tmp_path / "dump2").mkdir()
    torchrun(2, ck, "--steps", 4, "--resume", "--dump", tmp_path / "dump2")
    loaded = torch.load(tmp_path / "dump2" / "loaded-w2.pt")
    assert loaded["step"] == 4
    assert_same_state(loaded, saved4)
    assert [i.world_size for i in CheckpointManager(ck, keep=5).committed()] == [2, 1]


def test_reshard_2_to_4(reference, tmp_path):
    (tmp_path / "dump").mkdir()  # D_OUT=5 over 4 ranks: shards of 2, 2, 1 and 0 rows
    torchrun(4, reference["ck"], "--steps", 3, "--resume", "--dump", tmp_path / "dump")
    assert_same_state(torch.load(tmp_path / "dump" / "loaded-w4.pt"), reference["saved3"])


def test_crash_before_commit_is_invisible_and_resume_uses_previous(reference, tmp_path):
    ck = copy_ck(reference, tmp_path)
    proc = torchrun(2, ck, "--steps", 5, "--save-at", 5, "--resume", env={CRASH_ENV: "all"}, check=False)
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    leftover = ck / "step-00000005"
    assert (leftover / ".metadata").exists() and (leftover / META).exists()  # everything but the marker
    assert not (leftover / MARKER).exists()

    mgr = CheckpointManager(ck, keep=3)
    assert [i.step for i in mgr.committed()] == [3]
    assert mgr.latest().step == 3
    fake = CheckpointInfo(5, 40, 0, False, str(leftover), "")
    with pytest.raises(FileNotFoundError, match=r"step-00000005.*no COMMITTED"):
        mgr.load(fake, {})

    (leftover / "junk-from-crash").write_text("x")
    torchrun(2, ck, "--steps", 5, "--save-at", 5, "--resume", "--losses", tmp_path / "l.json")
    assert losses(tmp_path / "l.json") == {s: reference["losses"][s] for s in (4, 5)}
    assert mgr.latest().step == 5
    assert not (leftover / "junk-from-crash").exists()  # the leftover was removed before saving again


# ------------------------------------------------------------------------------------------- single process


def tiny_model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(params=["memory", "local"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ck")
        return
    name = f"memory://ck-{uuid.uuid4().hex}"
    yield name
    fs, path = storage.resolve(name)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_single_process_round_trip(url):
    assert not torch.distributed.is_initialized()
    model, opt = tiny_model(0)
    train(model, opt, 3)
    mgr = CheckpointManager(url, keep=2)
    assert mgr.latest() is None
    meta = {"tokens": 96, "phase_index": 1, "loader": {"cursor": [1, 2]}, "rng": {"seed": 7}}
    info = mgr.save(3, {"app": ModelOptimizerState(model, opt)}, meta, phase_boundary=True)
    assert (info.step, info.tokens, info.phase_index, info.phase_boundary, info.world_size) == (3, 96, 1, True, 1)
    assert info.path.endswith("/step-00000003") and info.path.startswith("memory://" if "memory" in url else "/")
    assert mgr.last_save_seconds > 0 and mgr.last_save_bytes > 1000
    assert mgr.committed() == [info] == [mgr.latest()]

    model2, opt2 = tiny_model(1)
    got = mgr.load(info, {"app": ModelOptimizerState(model2, opt2)})
    assert got == {**meta, "step": 3} and mgr.last_load_seconds > 0
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for idx, st in s1["state"].items():
        for k, t in st.items():
            assert torch.equal(s2["state"][idx][k], t), (idx, k)
    assert s1["param_groups"] == s2["param_groups"]

    with pytest.raises(FileExistsError, match=r"step-00000003 is already committed"):
        mgr.save(3, {"app": ModelOptimizerState(model, opt)}, meta, phase_boundary=False)


def test_save_replaces_uncommitted_leftover(url):
    mgr = CheckpointManager(url, keep=2)
    leftover = storage.join(mgr.root, "step-00000002")
    mgr.fs.makedirs(leftover, exist_ok=True)
    mgr.fs.pipe_file(storage.join(leftover, "__0_0.distcp"), b"half-written")
    mgr.fs.pipe_file(storage.join(leftover, "__7_0.distcp"), b"from a rank that no longer exists")
    assert mgr.latest() is None
    mgr.save(2, {"w": torch.arange(3.0)}, {"tokens": 2, "phase_index": 0}, phase_boundary=False)
    assert not mgr.fs.exists(storage.join(leftover, "__7_0.distcp"))
    target = {"w": torch.zeros(3)}
    mgr.load(mgr.latest(), target)
    assert torch.equal(target["w"], torch.arange(3.0))


def test_save_rejects_bad_meta(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    with pytest.raises(ValueError, match="lacks 'tokens'"):
        mgr.save(1, {"w": torch.ones(1)}, {"phase_index": 0}, phase_boundary=False)
    with pytest.raises(TypeError, match="step 1 is not JSON-serialisable"):
        mgr.save(1, {"w": torch.ones(1)}, {"tokens": 1, "phase_index": 0, "x": object()}, phase_boundary=False)
    assert not list(tmp_path.iterdir())  # nothing written before the meta was validated
    with pytest.raises(ValueError, match="keep=0"):
        CheckpointManager(tmp_path, keep=0)


def test_meta_disagreeing_with_marker_is_refused(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    info = mgr.save(4, {"w": torch.ones(2)}, {"tokens": 40, "phase_index": 0}, phase_boundary=False)
    meta_path = tmp_path / "step-00000004" / META
    meta_path.write_text(json.dumps({"step": 4, "tokens": 999, "phase_index": 0}))
    with pytest.raises(ValueError, match=r"step-00000004: meta.json says .*'tokens': 999.* COMMITTED says"):
        mgr.load(info, {"w": torch.zeros(2)})
    (tmp_path / "step-00000004" / MARKER).write_text("{not json")
    with pytest.raises(ValueError, match=r"step-00000004/COMMITTED is not valid JSON"):
        mgr.committed()


# ------------------------------------------------------------------------------------------- retention


def save_tiny(mgr: CheckpointManager, step: int, boundary: bool = False) -> None:
    meta = {"tokens": step * 10, "phase_index": 0}
    mgr.save(step, {"w": torch.full((2,), float(step))}, meta, phase_boundary=boundary)


def test_retention_keeps_newest_and_phase_boundaries(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    deleted = []
    for step in (1, 2, 3):
        save_tiny(mgr, step, boundary=step == 2)
        deleted += mgr.apply_retention()
    assert deleted == [str(tmp_path / "step-00000001")]
    (tmp_path / "step-00000004").mkdir()  # crash leftover, older than the next committed checkpoint
    (tmp_path / "step-00000004" / "__0_0.distcp").write_bytes(b"x")
    save_tiny(mgr, 5)
    assert mgr.apply_retention() == [str(tmp_path / "step-00000004")]  # 3 and 5 are the newest two; 2 a boundary
    (tmp_path / "step-00000007").mkdir()  # newer than every committed one: maybe a save in flight, keep it
    save_tiny(mgr, 6)
    assert mgr.apply_retention() == [str(tmp_path / "step-00000003")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000002",
        "step-00000005",
        "step-00000006",
        "step-00000007",
    ]
    assert [i.step for i in mgr.committed()] == [2, 5, 6]

    one = CheckpointManager(tmp_path, keep=1)
    one.apply_retention()
    assert [i.step for i in one.committed()] == [2, 6]  # newest always survives, boundaries too


class Recorder:
    """Wraps an fsspec filesystem and records deleting calls; can fail the folder removal."""

    def __init__(self, fs, fail_rm: bool = False):
        self.fs, self.calls, self.fail_rm = fs, [], fail_rm

    def rm_file(self, path):
        self.calls.append(("rm_file", path))
        return self.fs.rm_file(path)

    def rm(self, path, recursive=False):
        self.calls.append(("rm", path))
        if self.fail_rm:
            raise OSError("pod killed mid-delete")
        return self.fs.rm(path, recursive=recursive)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_delete_removes_marker_before_folder(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    save_tiny(mgr, 1)
    save_tiny(mgr, 2)
    folder = str(tmp_path / "step-00000001")
    rec = Recorder(fsspec.filesystem("file"))
    storage.delete_folder_marker_first(rec, folder, MARKER)
    assert rec.calls == [("rm_file", f"{folder}/{MARKER}"), ("rm", folder)]
    assert not os.path.exists(folder)

    # Interrupted between the two deletions: what is left must not look committed.
    mgr.fs = Recorder(mgr.fs, fail_rm=True)
    with pytest.raises(OSError, match="mid-delete"):
        storage.delete_folder_marker_first(mgr.fs, str(tmp_path / "step-00000002"), MARKER)
    assert (tmp_path / "step-00000002" / ".metadata").exists()
    assert mgr.committed() == []
