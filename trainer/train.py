"""The training loop: resume, then step through the plan until the run ends, a relaunch is needed, or a stop is asked.

Schedule arithmetic lives in plan.py, data in data/, checkpoints in checkpoint.py, the step in step.py; this file
only decides *when* each happens.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch

from . import distributed as D
from .checkpoint import CheckpointManager, ModelOptimizerState
from .data.loader import PackedMixLoader
from .data.shards import TokenShards
from .model import Transformer, init_weights
from .plan import checkpoint_due, next_phase_needs_relaunch, phase_at, step_plan
from .spec import ResolvedRun, to_manifest
from .step import build_optimizer, train_step
from .telemetry import (
    STATE_COMPLETE, STATE_RELAUNCH, STATE_STOPPED, MetricsLog, Progress, RunStatus, write_status,
)

log = logging.getLogger("stagerun.trainer")


class StopRequest:
    """SIGTERM (Kubernetes eviction, torchrun shutdown) or SIGINT (Ctrl-C): finish the step, checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def checkpoint_url(run: ResolvedRun, run_dir: Path) -> str:
    return run.checkpoint.path or str(Path(run_dir) / "checkpoints")


def build_model(run: ResolvedRun, topo: D.Topology) -> torch.nn.Module:
    """Meta-device build, parallelise, then materialise and initialise shard by shard."""
    with torch.device("meta"):
        model = Transformer(run.model)
    if topo.tp_size > 1:
        D.apply_tensor_parallel(model, topo)
    if run.training.activation_checkpointing:
        D.apply_activation_checkpointing(model)
    if run.training.compile:
        D.apply_compile(model)
    bf16 = run.training.precision == "bf16" or (run.training.precision == "auto" and topo.device.type == "cuda")
    D.apply_fsdp(model, topo, torch.bfloat16 if bf16 else None)
    model.to_empty(device=topo.device)
    init_weights(model, run.training.seed)
    return model


def open_loader(run: ResolvedRun, run_dir: Path) -> PackedMixLoader:
    prepared = json.loads((Path(run_dir) / "prepared.json").read_text())
    shards = {name: TokenShards.open(prepared["shardDirs"][name]) for name in run.sources}
    return PackedMixLoader(shards, seed=run.data_seed)


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _restore_rng(encoded: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8))


# Test-only fault injection: the last rank SIGKILLs itself right after this step (a worker lost mid-run).
KILL_AFTER_STEP_ENV = "STAGERUN_TEST_KILL_AFTER_STEP"


def _inject_test_fault(step: int, topo: D.Topology) -> None:
    value = os.environ.get(KILL_AFTER_STEP_ENV)
    if value and int(value) == step and topo.rank == topo.world_size - 1:
        os.kill(os.getpid(), signal.SIGKILL)


def train(run: ResolvedRun, run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    manager = CheckpointManager(checkpoint_url(run, run_dir), run.checkpoint.keep)
    latest = manager.latest()
    tokens, step = (latest.tokens, latest.step) if latest else (0, 0)
    phase = phase_at(run, tokens)
    if phase is None:
        status = RunStatus(STATE_COMPLETE, step, tokens, len(run.phases) - 1, run.phases[-1].name, latest.path,
                           "the run had already finished")
        if D.global_rank() == 0:
            write_status(run_dir, status)
        return status
    topo = D.init_topology(phase)
    model = build_model(run, topo)
    optimizer = build_optimizer(model, run.training, topo.device)
    app_state = {"train": ModelOptimizerState(model, optimizer)}
    loader = open_loader(run, run_dir)
    model_fields = to_manifest(run.model)
    if latest:
        meta = manager.load(latest, app_state)
        if meta["model"] != model_fields:
            changed = sorted(k for k in set(meta["model"]) | set(model_fields) if meta["model"].get(k) != model_fields.get(k))
            raise RuntimeError(
                f"checkpoint {latest.path} was written by a different model (spec.model fields differ: "
                f"{', '.join(changed)}); restore those fields, or point spec.checkpoint.path elsewhere to start anew"
            )
        loader.load_state_dict(meta["loader"])
        _restore_rng(meta["rng"])
        if topo.is_main:
            log.warning("resumed from %s (step %d, %d tokens, phase %s)", latest.path, step, tokens, phase.name)
    elif topo.is_main:
        log.warning("no committed checkpoint under %s: starting from step 0", manager.url)

    stop = StopRequest()
    metrics = MetricsLog(run_dir / "metrics.jsonl") if topo.is_main else None
    progress = Progress(run.total_tokens, tokens, enabled=topo.is_main)
    status, ckpt_path = None, latest.path if latest else None
    try:
        while status is None:
            plan = step_plan(run, tokens, step)
            phase = plan.phase
            started = time.perf_counter()
            micro_batches = loader.next_step(
                phase_index=phase.index, weights=phase.weights, seq_len=phase.seq_len,
                global_sequences=plan.batch_sequences, dp_rank=topo.dp_rank, dp_size=topo.dp_size,
                micro_batch_size=phase.micro_batch_size,
            )
            data_seconds = time.perf_counter() - started
            result = train_step(model, optimizer, micro_batches, lr=plan.lr, topo=topo, training=run.training)
            if not torch.isfinite(torch.tensor(result.loss)):
                raise FloatingPointError(
                    f"loss is {result.loss} at step {step} (phase {phase.name}); stopping without a checkpoint so the "
                    f"newest good one ({manager.latest().path if manager.latest() else 'none'}) stays the newest. "
                    "Lower lr.peak, lengthen the warmup, or enable spec.training.zLoss / maxZLoss")
            step, tokens = step + 1, plan.tokens_after
            seconds = time.perf_counter() - started
            if metrics and step % run.training.log_every_steps == 0:
                metrics.write({
                    "step": step, "tokens": tokens, "phase": phase.name, "phaseIndex": phase.index,
                    "loss": result.loss, "zLoss": result.z_loss, "maxZLoss": result.max_z_loss,
                    "gradNorm": result.grad_norm, "lr": plan.lr, "batchTokens": plan.batch_tokens,
                    "seqLen": phase.seq_len, "stepSeconds": seconds, "dataSeconds": data_seconds,
                    "tokensPerSecond": plan.batch_tokens / seconds, "tokensPerSource": dict(loader.tokens_per_source),
                    "batchChecksum": result.batch_checksum,
                })
            progress.update(plan.batch_tokens, phase=phase.name, step=step, loss=result.loss,
                            tokens_per_second=plan.batch_tokens / seconds)

            stopping = D.any_rank(stop.requested, topo)
            final = plan.ends_phase and phase.index == len(run.phases) - 1
            relaunch = plan.ends_phase and next_phase_needs_relaunch(run, phase)
            if plan.ends_phase or stopping or checkpoint_due(run.checkpoint.every_tokens, plan.tokens, tokens):
                meta = {
                    "step": step, "tokens": tokens, "phase_index": phase.index, "phase": phase.name,
                    "loader": loader.state_dict(), "rng": _rng_state(), "model": model_fields, "run": run.name,
                    "worldSize": topo.world_size,
                }
                info = manager.save(step, app_state, meta, phase_boundary=plan.ends_phase)
                if topo.is_main:
                    manager.apply_retention()
                    progress.write(f"checkpoint step {step} ({tokens:,} tokens) committed at {info.path}")
                ckpt_path = info.path
            if plan.ends_phase and topo.is_main:
                progress.write(f"phase {phase.name} finished at step {step} ({tokens:,} tokens)")
            if final:
                status = RunStatus(STATE_COMPLETE, step, tokens, phase.index, phase.name, ckpt_path, "all phases done")
            elif relaunch:
                nxt = run.phases[phase.index + 1]
                status = RunStatus(STATE_RELAUNCH, step, tokens, nxt.index, nxt.name, ckpt_path,
                                   f"phase {nxt.name} needs another topology (world size {nxt.world_size})")
            elif stopping:
                status = RunStatus(STATE_STOPPED, step, tokens, phase.index, phase.name, ckpt_path,
                                   "stopped on request after a checkpoint")
            _inject_test_fault(step, topo)
    finally:
        progress.close()
        if metrics:
            metrics.close()
    if topo.is_main:
        write_status(run_dir, status)
    del model, optimizer, app_state
    D.shutdown()
    return status
