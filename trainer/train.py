"""The training loop: resume, then step through the plan until the run ends, a relaunch is needed, or a stop is asked.

Schedule arithmetic lives in plan.py, data in data/, checkpoints in checkpoint.py, the step in step.py; this file
only decides *when* each happens.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from stagerun.core.plan import checkpoint_due, next_phase_needs_relaunch, phase_at, segments, step_plan
from stagerun.core.spec import ResolvedRun, SpecError, load_run, to_manifest
from stagerun.core.spec.changes import immutable_changes

from . import distributed as D
from .checkpoint import CheckpointManager, ModelOptimizerState
from .data.loader import PackedMixLoader
from .data.shards import TokenShards
from .distill import Teachers
from .exporter import start_exporter
from .model import Transformer, init_weights
from .step import build_optimizer, train_step
from .telemetry import STATE_COMPLETE, STATE_RELAUNCH, STATE_STOPPED, MetricsLog, Progress, RunStatus, write_status

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


def build_model(spec, training, topo: D.Topology, *, for_training: bool = True, load_init: bool = True):
    """Meta-device build of ``spec`` (a resolved ModelSpec), parallelise, then materialise and initialise shard by
    shard. ``for_training=False`` (a distillation teacher) skips activation checkpointing: it never backpropagates."""
    with torch.device("meta"):
        model = Transformer(spec)
    if topo.tp_size > 1:
        D.apply_tensor_parallel(model, topo)
    if training.activation_checkpointing and for_training:
        D.apply_activation_checkpointing(model)
    if training.compile:
        D.apply_compile(model)
    bf16 = training.precision == "bf16" or (training.precision == "auto" and topo.device.type == "cuda")
    D.apply_fsdp(model, topo, torch.bfloat16 if bf16 else None)
    model.to_empty(device=topo.device)
    init_weights(model, training.seed)
    if spec.init is not None and for_training and load_init:  # continued pretraining: released weights
        from .hf.load import load_hf_weights

        load_hf_weights(model, spec, spec.init.path)
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


def _same_model(expected: dict, checkpoint_path: str):
    def check(meta: dict) -> None:
        saved = meta.get("model", {})
        if saved != expected:
            changed = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
            raise RuntimeError(
                f"checkpoint {checkpoint_path} was written by a different model (spec.model fields differ: "
                f"{', '.join(changed)}); restore those fields, or point spec.checkpoint.path elsewhere to start anew"
            )

    return check


def _step_record(step: int, plan, result, loader, seconds: float, data_seconds: float) -> dict:
    return {
        "step": step,
        "tokens": plan.tokens_after,
        "phase": plan.phase.name,
        "phaseIndex": plan.phase.index,
        "loss": result.loss,
        "zLoss": result.z_loss,
        "maxZLoss": result.max_z_loss,
        "distillLoss": result.distill_loss,
        "gradNorm": result.grad_norm,
        "lr": plan.lr,
        "batchTokens": plan.batch_tokens,
        "seqLen": plan.seq_len,
        "stepSeconds": seconds,
        "dataSeconds": data_seconds,
        "tokensPerSecond": plan.batch_tokens / seconds,
        "tokensPerSource": dict(loader.tokens_per_source),
        "batchChecksum": result.batch_checksum,
    }


def _status_after(run: ResolvedRun, plan, step: int, stopping: bool, checkpoint: str | None) -> RunStatus | None:
    """Why the gang stops after this step, or None to keep going."""
    phase, tokens = plan.phase, plan.tokens_after
    if plan.ends_phase and phase.index == len(run.phases) - 1:
        return RunStatus(STATE_COMPLETE, step, tokens, phase.index, phase.name, checkpoint, "all phases done")
    if plan.ends_phase and next_phase_needs_relaunch(run, phase):
        nxt = run.phases[phase.index + 1]
        return RunStatus(
            STATE_RELAUNCH,
            step,
            tokens,
            nxt.index,
            nxt.name,
            checkpoint,
            f"phase {nxt.name} needs another topology (world size {nxt.world_size})",
        )
    if stopping:
        return RunStatus(
            STATE_STOPPED, step, tokens, phase.index, phase.name, checkpoint, "stopped on request after a checkpoint"
        )
    return None


def _early_exit(run_dir: Path, status: RunStatus) -> RunStatus:
    """Stop before the process group exists (every rank decides the same; rank 0 records it)."""
    if D.global_rank() == 0:
        write_status(run_dir, status)
    return status


def reload_manifest(run: ResolvedRun, manifest: Path | None, world_size: int | None, phase_index: int) -> ResolvedRun:
    """The manifest as it is now on disk, when it only changed phases after ``phase_index`` (an accepted edit of a
    live run, written by the operator into the pod's ConfigMap); otherwise the run unchanged."""
    if manifest is None:
        return run
    try:
        new = load_run(manifest, world_size=world_size)
    except (SpecError, OSError) as exc:
        log.warning("manifest %s no longer reads (%s): continuing with the one loaded at start", manifest, exc)
        return run
    if new.phases == run.phases:
        return run
    refused = immutable_changes(run, new, phase_index)
    if refused:
        log.warning("manifest %s changed %s, which a live run cannot take: ignored", manifest, ", ".join(refused))
        return run
    log.warning("manifest %s changed later phases: they take effect as reached", manifest)
    return new


def train(run: ResolvedRun, run_dir: Path, manifest: Path | None = None, world_size: int | None = None) -> RunStatus:
    run_dir = Path(run_dir)
    manager = CheckpointManager(checkpoint_url(run, run_dir), run.checkpoint.keep)
    latest = manager.latest()
    tokens, step = (latest.tokens, latest.step) if latest else (0, 0)
    phase = phase_at(run, tokens)
    if phase is None:
        return _early_exit(
            run_dir,
            RunStatus(
                STATE_COMPLETE,
                step,
                tokens,
                len(run.phases) - 1,
                run.phases[-1].name,
                latest.path,
                "the run had already finished",
            ),
        )
    launched = os.environ.get("STAGERUN_PHASE_INDEX")  # set in operator pods: the phase the Job was shaped for
    if launched is not None and run.phases[int(launched)].topology != phase.topology:
        return _early_exit(
            run_dir,
            RunStatus(
                STATE_RELAUNCH,
                step,
                tokens,
                phase.index,
                phase.name,
                latest.path if latest else None,
                f"the newest checkpoint is in phase {phase.name}, which needs another topology than this gang's",
            ),
        )
    topo = D.init_topology(phase)
    model = build_model(run.model, run.training, topo, load_init=latest is None)  # a checkpoint supersedes them
    teachers = Teachers(run.model, lambda spec: build_model(spec, run.training, topo, for_training=False))
    optimizer = build_optimizer(model, run.training, topo.device)
    app_state = {"train": ModelOptimizerState(model, optimizer)}
    loader = open_loader(run, run_dir)
    model_fields = {k: v for k, v in to_manifest(run.model).items() if k != "init"}  # init: where weights began
    exporter = start_exporter(run, topo.rank, topo.local_rank, topo.world_size, topo.device.type)
    restarts = 0
    if latest:
        meta = manager.load(latest, app_state, check_meta=_same_model(model_fields, latest.path))
        loader.load_state_dict(meta["loader"])
        _restore_rng(meta["rng"])
        restarts = meta.get("restarts", 0) + 1
        exporter.resumed(restarts=restarts, load_seconds=manager.last_load_seconds, load_bytes=latest.size_bytes)
        if topo.is_main:
            log.warning("resumed from %s (step %d, %d tokens, phase %s)", latest.path, step, tokens, phase.name)
    elif topo.is_main:
        log.warning("no committed checkpoint under %s: starting from step 0", manager.url)

    stop = StopRequest()
    metrics = MetricsLog(run_dir / "metrics.jsonl") if topo.is_main else None
    progress = Progress(segments(run)[-1].end_tokens, tokens, enabled=topo.is_main)  # incl. the last step's overshoot
    status, checkpoint, running_phase = None, latest.path if latest else None, None
    try:
        while status is None:
            plan = step_plan(run, tokens, step)
            if plan.phase.index != running_phase:
                running_phase = plan.phase.index
                progress.write(
                    f"phase {plan.phase.name}: seqLen {plan.seq_len}, batch {plan.batch_tokens:,} tokens, "
                    f"mix {plan.phase.weights}"
                )
            started = time.perf_counter()
            micro_batches = loader.next_step(
                phase_index=plan.phase.index,
                weights=plan.phase.weights,
                seq_len=plan.seq_len,
                global_sequences=plan.batch_sequences,
                dp_rank=topo.dp_rank,
                dp_size=topo.dp_size,
                micro_batch_size=plan.phase.micro_batch_size,
            )
            data_seconds = time.perf_counter() - started
            teacher, distill_weight = teachers.for_phase(plan.phase)
            result = train_step(
                model,
                optimizer,
                micro_batches,
                lr=plan.lr,
                topo=topo,
                training=run.training,
                teacher=teacher,
                distill_weight=distill_weight,
                vocab_size=run.model.vocab_size,
            )
            if not math.isfinite(result.loss):
                newest = manager.latest()
                raise FloatingPointError(
                    f"loss is {result.loss} at step {step + 1} (phase {plan.phase.name}); stopping without a "
                    f"checkpoint so the newest good one ({newest.path if newest else 'none'}) stays the newest. "
                    "Lower lr.peak, lengthen the warmup, or enable spec.training.zLoss / maxZLoss"
                )
            step, tokens = step + 1, plan.tokens_after
            seconds = time.perf_counter() - started
            if metrics and step % run.training.log_every_steps == 0:
                metrics.write(_step_record(step, plan, result, loader, seconds, data_seconds))
            progress.update(
                plan.batch_tokens,
                phase=plan.phase.name,
                step=step,
                loss=result.loss,
                tokens_per_second=plan.batch_tokens / seconds,
            )
            exporter.step(
                plan=plan,
                step=step,
                tokens=tokens,
                result=result,
                seconds=seconds,
                data_seconds=data_seconds,
                tokens_per_source=dict(loader.tokens_per_source),
            )

            stopping = D.any_rank(stop.requested, topo)
            if plan.ends_phase or stopping or checkpoint_due(run.checkpoint.every_tokens, plan.tokens, tokens):
                meta = {
                    "step": step,
                    "tokens": tokens,
                    "phase_index": plan.phase.index,
                    "phase": plan.phase.name,
                    "loader": loader.state_dict(),
                    "rng": _rng_state(),
                    "model": model_fields,
                    "run": run.name,
                    "worldSize": topo.world_size,
                    "restarts": restarts,
                }
                checkpoint = manager.save(step, app_state, meta, phase_boundary=plan.ends_phase).path
                if topo.is_main:
                    manager.apply_retention()
                exporter.checkpoint_saved(
                    path=checkpoint,
                    step=step,
                    tokens=tokens,
                    seconds=manager.last_save_seconds,
                    size=manager.last_save_bytes,
                )
                progress.write(f"checkpoint step {step} ({tokens:,} tokens) committed at {checkpoint}")
            if plan.ends_phase:
                progress.write(f"phase {plan.phase.name} finished at step {step} ({tokens:,} tokens)")
                run = reload_manifest(run, manifest, world_size, plan.phase.index)
            status = _status_after(run, plan, step, stopping, checkpoint)
            _inject_test_fault(step, topo)
    finally:
        progress.close()
        if metrics:
            metrics.close()
        exporter.close()
    if topo.is_main:
        write_status(run_dir, status)
    del model, optimizer, app_state, teachers
    D.shutdown()
    return status
