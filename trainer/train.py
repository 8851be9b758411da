"""The worker's entry: resume or exit early, build the model and its state, then let the ``Trainer`` step.

Schedule arithmetic lives in core/plan.py, data in data/, checkpoints in checkpoint.py, the step in step.py, the
loop in trainer.py and what happens around each step in callbacks.py and exporter.py; this file wires them up.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch

from stagerun.core.plan import phase_at
from stagerun.core.protocol import GangState, PodEnv, PreparedData, RunStatus
from stagerun.core.spec import ModelSpec, ResolvedRun
from stagerun.core.spec.run import TrainingSpec
from stagerun.core.storage import is_url

from . import distributed as D
from .callbacks import reload_manifest, standard_callbacks
from .checkpoint import CheckpointInfo, CheckpointManager
from .checkpoint_resume import agreed_candidates, refuse_scratch_after_damage
from .data.loader import PackedMixLoader
from .data.shards import TokenShards
from .distill import Teachers
from .dpo import References
from .exporter import start_exporter
from .failure_advice import classify, failed_status
from .model import Transformer, init_weights
from .run_lock import HELD_ENV, LEASE_TTL_SECONDS, RunLock, acquire
from .step import build_optimizer
from .telemetry import write_status
from .trainer import Trainer, load_extensions

__all__ = ["build_model", "checkpoint_url", "open_loader", "reload_manifest", "train"]

log = logging.getLogger("stagerun.trainer")


def checkpoint_url(run: ResolvedRun, run_dir: Path) -> str:
    return run.checkpoint.path or str(Path(run_dir) / "checkpoints")


def build_model(
    spec: ModelSpec, training: TrainingSpec, topo: D.Topology, *, for_training: bool = True, load_init: bool = True
) -> Transformer:
    """Meta-device build of ``spec`` (a resolved ModelSpec), parallelise, then materialise and initialise shard by
    shard. ``for_training=False`` (a distillation teacher) skips activation checkpointing: it never backpropagates.
    ``load_init=False``: a checkpoint will overwrite every parameter, so neither the random init nor the Hugging Face
    weights of ``spec.init`` are computed (the parameters stay uninitialised memory until the checkpoint loads)."""
    gpu = topo.device.type == "cuda"
    with torch.device("meta"):
        model = Transformer(spec)
    if training.float8 and for_training:
        D.apply_float8(model, topo)  # refuses off Hopper or without torchao, naming spec.training.float8
    if topo.tp_size > 1:
        D.apply_tensor_parallel(model, topo)
    if topo.layout.cp > 1:
        D.apply_context_parallel(model, topo)  # the teacher too: it reads the same sequence shards
    mode = training.checkpointing_mode(gpu)
    if mode != "none" and for_training:
        D.apply_activation_checkpointing(model, mode)
    if training.uses_compile(gpu):
        D.apply_compile(model)
    D.apply_fsdp(model, topo, torch.bfloat16 if training.uses_bf16(gpu) else None)
    model.to_empty(device=topo.device)
    if not load_init:
        return model  # resuming, or a teacher: a checkpoint supersedes both
    if spec.init is not None and for_training:
        # Continued pretraining: released weights or another run's checkpoint cover every parameter.
        from .model.initial_weights import load_initial_weights

        load_initial_weights(model, spec)
    else:
        init_weights(model, training.seed)
    return model


def open_loader(run: ResolvedRun, run_dir: Path) -> PackedMixLoader:
    prepared = PreparedData.from_json((Path(run_dir) / PreparedData.FILE).read_text())
    shards = {name: TokenShards.open(prepared.shard_dirs[name]) for name in run.sources}
    return PackedMixLoader(shards, seed=run.data_seed)


def _exit_before_start(run: ResolvedRun, latest: CheckpointInfo | None) -> RunStatus | None:
    """Why this gang has nothing to train, decided before the process group exists (every rank decides the same)."""
    tokens, step = (latest.tokens, latest.step) if latest else (0, 0)
    checkpoint = latest.path if latest else None
    phase = phase_at(run, tokens)
    if phase is None:
        last = run.phases[-1]
        return RunStatus(
            GangState.COMPLETE, step, tokens, last.index, last.name, checkpoint, "the run had already finished"
        )
    launched = os.environ.get(PodEnv.PHASE_INDEX)  # set in operator pods: the phase the Job was shaped for
    if launched is not None and run.phases[int(launched)].topology != phase.topology:
        return RunStatus(
            GangState.RELAUNCH,
            step,
            tokens,
            phase.index,
            phase.name,
            checkpoint,
            f"the newest checkpoint is in phase {phase.name}, which needs another topology than this gang's",
        )
    return None


def train(run: ResolvedRun, run_dir: Path, manifest: Path | None = None, world_size: int | None = None) -> RunStatus:
    """Train this gang's part of the run; a failure no rerun can fix (every checkpoint damaged, a full disk) is
    also written to the status file, so `stagerun run` prints it instead of "run the same command again"."""
    lock = _lock_if_unheld(run, Path(run_dir))
    try:
        return _train(run, Path(run_dir), manifest, world_size)
    except Exception as exc:
        failure = classify(exc)  # failure_advice.py: only transient failures are worth rerunning
        if failure is not None:  # any rank that hits it (its peers may only see a broken collective)
            try:
                write_status(Path(run_dir), failed_status(failure))
            except OSError as write_error:  # a full disk may refuse the status file too
                log.error("cannot write %s: %s", RunStatus.FILE, write_error)
        raise
    finally:
        if lock is not None:
            lock.release()


def _lock_if_unheld(run: ResolvedRun, run_dir: Path) -> RunLock | None:
    """Rank 0 takes the run lock when no parent holds it for the gang (operator pods, a bare torchrun). A lease a
    dead attempt left is waited out (it expires); another live holder fails the gang with its name."""
    if os.environ.get(HELD_ENV) or D.global_rank() != 0:
        return None
    url = checkpoint_url(run, run_dir)
    wait = LEASE_TTL_SECONDS + 10 if is_url(url) else 0.0
    return acquire(url, wait_seconds=wait, on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))


def _relaunch_for(run: ResolvedRun, info: CheckpointInfo, phase) -> RunStatus | None:
    """RELAUNCH when ``info`` (what rank 0 chose, or a fallback) lies in a phase of another topology than ``phase``."""
    other = phase_at(run, info.tokens)
    if other is None or other.topology == phase.topology:
        return None
    message = f"checkpoint {info.path} is in phase {other.name}, which needs another topology than this gang's"
    return RunStatus(GangState.RELAUNCH, info.step, info.tokens, other.index, other.name, info.path, message)


def _train(run: ResolvedRun, run_dir: Path, manifest: Path | None, world_size: int | None) -> RunStatus:
    manager = CheckpointManager(checkpoint_url(run, run_dir), run.checkpoint.keep)
    latest = manager.latest()  # this rank's own listing: only to shape the gang (rank 0's choice is used below)
    early = _exit_before_start(run, latest)
    if early is not None:
        if D.global_rank() == 0:
            write_status(run_dir, early)
        return early
    phase = phase_at(run, latest.tokens if latest else 0)
    assert phase is not None  # _exit_before_start returned otherwise
    topo = D.init_topology(phase)
    candidates = agreed_candidates(manager)  # every rank uses rank 0's listing, newest first
    if not candidates:
        refuse_scratch_after_damage(manager)
    relaunch = _relaunch_for(run, candidates[0], phase) if candidates else None
    if relaunch is not None:
        return _end(run_dir, topo, relaunch)
    model = build_model(run.model, run.training, topo, load_init=not candidates)  # a checkpoint supersedes them
    # Teachers and dpo references: eval-only models sharded like the policy, weights from a checkpoint (or, for a
    # reference, copied from the policy).
    build_frozen = lambda spec: build_model(spec, run.training, topo, for_training=False, load_init=False)  # noqa: E731
    teachers = Teachers(run.model, build_frozen)
    references = References(run.model, build_frozen, manager, run.training.seed)
    optimizer = build_optimizer(model, run.training, topo.device)
    loader = open_loader(run, run_dir)
    trainer = Trainer(
        run=run,
        topo=topo,
        model=model,
        optimizer=optimizer,
        loader=loader,
        teachers=teachers,
        manager=manager,
        references=references,
    )
    exporter = start_exporter(run, topo.rank, topo.local_rank, topo.world_size, topo.device.type)
    trainer.callbacks.extend(standard_callbacks(trainer, run_dir, exporter, manifest, world_size))
    load_extensions(trainer)
    loaded = trainer.resume(candidates[0] if candidates else None, candidates)
    relaunch = _relaunch_for(run, loaded, phase) if loaded else None  # fell back into another phase's shape
    status = relaunch or trainer.fit()
    del model, optimizer, teachers, references, trainer, exporter
    return _end(run_dir, topo, status)


def _end(run_dir: Path, topo: D.Topology, status: RunStatus) -> RunStatus:
    if topo.is_main:
        write_status(run_dir, status)
    D.shutdown()
    return status
