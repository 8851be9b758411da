"""torchrun worker for tests/test_checkpoint.py: a small FSDP2 MLP trained on CPU with gloo.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/_ckpt_worker.py DIR --steps T \
        [--save-at 3,5] [--resume] [--dump DUMPDIR] [--losses FILE] [--async [--slow-write S] [--kill-during-write R]]

--resume  loads CheckpointManager(DIR).latest() first; with --dump the loaded state is written to
          DUMPDIR/loaded-w{N}.pt (rank 0) so the test can compare it with what was saved.
--resume-intact  as --resume, but as the trainer resumes: rank 0's listing for every rank, the newest intact
          checkpoint, damaged ones de-committed (checkpoint_resume.load_newest_intact).
--save-at saves at those steps; with --dump, DUMPDIR/saved-{step}-w{N}.pt holds the state just saved.
--losses  rank 0 writes {step: global mean loss} as JSON.
--async   saves with CheckpointManager.save_async: training goes on while the files are written; --slow-write makes
          each rank's write take S seconds longer (so later steps really run meanwhile); --kill-during-write R
          SIGKILLs rank R right after it wrote its shard file, before DCP's metadata (a pod lost mid-write).
Dumps hold full (unsharded) tensors: parameters and every optimizer-state tensor, gathered with full_tensor().
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import time

import faults  # this folder is the script's, so it is on sys.path
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import stagerun.trainer.checkpoint as checkpoint_module
from stagerun.trainer.checkpoint import CheckpointManager, ModelOptimizerState
from stagerun.trainer.checkpoint_resume import agreed_candidates, load_newest_intact

GLOBAL_BATCH, D_IN, D_HID, D_OUT = 8, 16, 32, 5  # D_OUT=5: uneven shards over 2 and 4 ranks, on purpose


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # identical init on every rank (and in every run) before sharding
    model = nn.Sequential(
        nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT)
    )
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Data depends on the step only, so a resumed run sees exactly the batches the uninterrupted one saw.
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randn(GLOBAL_BATCH, D_OUT, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Collective (full_tensor all-gathers): every rank must call it."""
    params = dict(model.named_parameters())
    return {
        "params": {n: full(p) for n, p in params.items()},
        "optim": {n: {k: full(v) for k, v in sorted(opt.state[p].items())} for n, p in params.items()},
    }


def patch_writes(slow: float, kill_rank: int | None) -> None:
    """Make every shard write slower and/or kill one rank right after its shard is on disk."""
    base = checkpoint_module.ChecksumWriter  # the writer CheckpointManager uses (it hashes what it writes)

    class FaultyWriter(base):  # type: ignore[misc,valid-type]
        def write_data(self, plan, planner):
            time.sleep(slow)
            written = super().write_data(plan, planner)
            written.wait()  # this rank's shard is on disk; .metadata comes only after every rank's write
            if dist.get_rank() == kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            return written

    checkpoint_module.ChecksumWriter = FaultyWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-at", default="")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--resume-intact", action="store_true")
    ap.add_argument("--dump")
    ap.add_argument("--losses")
    ap.add_argument("--async", dest="async_save", action="store_true")
    ap.add_argument("--slow-write", type=float, default=0.0)
    ap.add_argument("--kill-during-write", type=int)
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build(world)
    app_state = {"app": ModelOptimizerState(model, opt)}
    mgr = CheckpointManager(args.dir, keep=100)
    mgr.before_commit.extend(faults.checkpoint_hooks())  # STAGERUN_TEST_CRASH_BEFORE_COMMIT, where a test sets it
    save_at = {int(s) for s in args.save_at.split(",") if s}
    if args.slow_write or args.kill_during_write is not None:
        patch_writes(args.slow_write, args.kill_during_write)

    start = 0
    if args.resume or args.resume_intact:
        if args.resume_intact:
            info, meta = load_newest_intact(mgr, app_state, agreed_candidates(mgr))
        else:
            info = mgr.latest()
            assert info is not None, f"no committed checkpoint under {args.dir}"
            meta = mgr.load(info, app_state)
        start = meta["step"]
        if args.dump:
            state = full_state(model, opt)
            if rank == 0:
                torch.save({"step": start, "meta": meta, **state}, os.path.join(args.dump, f"loaded-w{world}.pt"))

    losses = {}
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, rank, world)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses[step] = (global_loss / world).item()
        if step in save_at:
            meta = {"tokens": step * GLOBAL_BATCH, "phase_index": 0, "loader": {"next_step": step + 1}}
            if args.async_save:
                mgr.save_async(step, app_state, meta, phase_boundary=False, pinned=False)
            else:
                mgr.save(step, app_state, meta, phase_boundary=False)
            if rank == 0:
                print(f"save step {step}: stalled {mgr.last_stall_seconds:.3f} s", flush=True)
            if args.dump:
                state = full_state(model, opt)
                if rank == 0:
                    torch.save({"step": step, **state}, os.path.join(args.dump, f"saved-{step}-w{world}.pt"))
    info = mgr.wait()  # the async save still in flight commits before the gang ends
    if info is not None and rank == 0:
        print(f"async step {info.step} committed after {mgr.last_save_seconds:.3f} s", flush=True)
    if (args.resume or args.resume_intact) and rank == 0:
        print(f"load: {mgr.last_load_seconds:.3f} s from step {start}", flush=True)
    if args.losses and rank == 0:
        with open(args.losses, "w") as f:
            json.dump(losses, f)
    dist.barrier()
    # Free the FSDP modules (reference cycles through hooks) while the interpreter is fully alive: left to the
    # final GC at exit, gloo objects they hold were seen to die in teardown with "terminate called without an
    # active exception" (SIGABRT) in ~1 of 10 runs after a DCP save on torch 2.13.
    del model, opt, app_state, mgr
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
