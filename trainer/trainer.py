"""The step loop: plan -> data -> train_step -> one ``StepRecord``, handed to the callbacks.

Everything a step can lead to besides the optimizer update (a metrics line, the progress bar, /progress and
/metrics, a checkpoint and retention, a manifest reload, a test's fault) is a :class:`Callback` (callbacks.py,
exporter.py). The loop itself only steps, agrees on a stop with the other ranks, and decides why the gang ends.

Users add callbacks of their own without touching the code: ``STAGERUN_CALLBACKS=package.module:factory[,...]``
names factories that receive the :class:`Trainer` and return callbacks and/or checkpoint hooks
(:func:`load_extensions`, docs/architecture.md).
"""

from __future__ import annotations

import base64
import importlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

from stagerun.core.plan import StepPlan, next_phase_needs_relaunch, phase_at, step_plan
from stagerun.core.protocol import GangState, RunStatus, to_json_dict
from stagerun.core.spec import ResolvedRun, to_manifest

from . import distributed as D
from .checkpoint import CheckpointInfo, CheckpointManager, ModelOptimizerState
from .data.loader import PackedMixLoader
from .distill import Teachers
from .step import train_step

log = logging.getLogger("stagerun.trainer")

CALLBACKS_ENV = "STAGERUN_CALLBACKS"


def _wire(name: str) -> Any:
    return field(metadata={"json": name})


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as every callback sees it; ``to_dict`` is a ``metrics.jsonl`` line."""

    step: int
    tokens: int  # seen after this step
    phase: str
    phase_index: int = _wire("phaseIndex")
    loss: float = _wire("loss")
    z_loss: float = _wire("zLoss")
    max_z_loss: float = _wire("maxZLoss")
    distill_loss: float = _wire("distillLoss")
    grad_norm: float = _wire("gradNorm")
    lr: float = _wire("lr")
    batch_tokens: int = _wire("batchTokens")
    seq_len: int = _wire("seqLen")
    step_seconds: float = _wire("stepSeconds")
    data_seconds: float = _wire("dataSeconds")
    tokens_per_second: float = _wire("tokensPerSecond")
    tokens_per_source: dict[str, int] = _wire("tokensPerSource")
    batch_checksum: float = _wire("batchChecksum")

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)


class Callback:
    """Hooks of the step loop, each a no-op here: a callback overrides the ones it needs.

    Every rank calls every hook in list order; a hook that runs a collective (a checkpoint save) must therefore be
    called on all ranks alike. Order within a step: ``on_step`` (a save inside it fires ``on_checkpoint``), then
    ``on_phase_end`` when the step ended its phase.
    """

    def on_resume(self, checkpoint: CheckpointInfo, restarts: int, load_seconds: float) -> None:
        """The model, optimizer, loader and RNG were loaded from ``checkpoint``."""

    def on_start(self, trainer: Trainer) -> None:
        """The loop is about to run its first step (after any resume)."""

    def on_phase_start(self, plan: StepPlan) -> None:
        """The first step of this process in ``plan.phase`` is about to run."""

    def on_step(self, record: StepRecord) -> None: ...

    def on_checkpoint(self, checkpoint: CheckpointInfo, save_seconds: float | None) -> None: ...

    def on_phase_end(self, record: StepRecord) -> None:
        """``record`` was the last step of its phase (its checkpoint is committed)."""

    def on_stop(self, status: RunStatus) -> None:
        """The loop ended normally: why the gang stops (written to status.json by rank 0 afterwards)."""

    def close(self) -> None:
        """Always called when the loop ends, also after an error."""


# Called on every rank just before a checkpoint's commit marker is written (rank 0: after meta.json).
CheckpointHook = Callable[[int], None]


class StopRequest:
    """SIGTERM (Kubernetes eviction, torchrun shutdown) or SIGINT (Ctrl-C): finish the step, checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _restore_rng(encoded: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8))


def _same_model(expected: dict[str, Any], checkpoint_path: str) -> Callable[[dict[str, Any]], None]:
    def check(meta: dict[str, Any]) -> None:
        saved = meta.get("model", {})
        if saved != expected:
            changed = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
            raise RuntimeError(
                f"checkpoint {checkpoint_path} was written by a different model (spec.model fields differ: "
                f"{', '.join(changed)}); restore those fields, or point spec.checkpoint.path elsewhere to start anew"
            )

    return check


class Trainer:
    """Owns the training state (model, optimizer, loader, RNG, position in the plan) and runs the step loop."""

    def __init__(
        self,
        *,
        run: ResolvedRun,
        topo: D.Topology,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: PackedMixLoader,
        teachers: Teachers,
        manager: CheckpointManager,
    ) -> None:
        self.run, self.topo, self.manager = run, topo, manager
        self.model, self.optimizer, self.loader, self.teachers = model, optimizer, loader, teachers
        self.app_state = {"train": ModelOptimizerState(model, optimizer)}
        self.model_fields = {k: v for k, v in to_manifest(run.model).items() if k != "init"}  # init: where it began
        self.callbacks: list[Callback] = []
        self.step, self.tokens, self.restarts = 0, 0, 0
        self.last_checkpoint: str | None = None
        self.plan: StepPlan | None = None  # the step just taken, while its callbacks run
        self.stopping = False  # some rank was asked to stop: checkpoint after this step and end

    def resume(self, latest: CheckpointInfo | None) -> None:
        if latest is None:
            if self.topo.is_main:
                log.warning("no committed checkpoint under %s: starting from step 0", self.manager.url)
            return
        meta = self.manager.load(latest, self.app_state, check_meta=_same_model(self.model_fields, latest.path))
        self.loader.load_state_dict(meta["loader"])
        _restore_rng(meta["rng"])
        self.step, self.tokens, self.last_checkpoint = latest.step, latest.tokens, latest.path
        self.restarts = meta.get("restarts", 0) + 1
        load_seconds = self.manager.last_load_seconds
        assert load_seconds is not None  # load() just measured it
        for callback in self.callbacks:
            callback.on_resume(latest, self.restarts, load_seconds)
        if self.topo.is_main:
            phase = phase_at(self.run, self.tokens)
            name = phase.name if phase else "?"
            log.warning("resumed from %s (step %d, %d tokens, phase %s)", latest.path, self.step, self.tokens, name)

    def fit(self) -> RunStatus:
        """Step until the run ends, the next phase needs another gang, or a stop is asked; returns why."""
        stop = StopRequest()
        status: RunStatus | None = None
        running_phase: int | None = None
        try:
            for callback in self.callbacks:
                callback.on_start(self)
            while status is None:
                plan = step_plan(self.run, self.tokens, self.step)
                assert plan is not None  # the last phase's end stops the loop before the plan runs out
                if plan.phase.index != running_phase:
                    running_phase = plan.phase.index
                    for callback in self.callbacks:
                        callback.on_phase_start(plan)
                record = self._train_step(plan)
                self.plan, self.stopping = plan, D.any_rank(stop.requested, self.topo)
                for callback in self.callbacks:
                    callback.on_step(record)
                if plan.ends_phase:
                    for callback in self.callbacks:
                        callback.on_phase_end(record)
                status = self._status_after(plan)
            for callback in self.callbacks:
                callback.on_stop(status)
        finally:
            for callback in self.callbacks:
                callback.close()
        return status

    def _train_step(self, plan: StepPlan) -> StepRecord:
        started = time.perf_counter()
        micro_batches = self.loader.next_step(
            phase_index=plan.phase.index,
            weights=plan.phase.weights,
            seq_len=plan.seq_len,
            global_sequences=plan.batch_sequences,
            dp_rank=self.topo.dp_rank,
            dp_size=self.topo.dp_size,
            micro_batch_size=plan.phase.micro_batch_size,
        )
        data_seconds = time.perf_counter() - started
        teacher, distill_weight = self.teachers.for_phase(plan.phase)
        result = train_step(
            self.model,
            self.optimizer,
            micro_batches,
            lr=plan.lr,
            topo=self.topo,
            training=self.run.training,
            teacher=teacher,
            distill_weight=distill_weight,
            vocab_size=self.run.model.vocab_size,
        )
        if not math.isfinite(result.loss):
            newest = self.manager.latest()
            raise FloatingPointError(
                f"loss is {result.loss} at step {self.step + 1} (phase {plan.phase.name}); stopping without a "
                f"checkpoint so the newest good one ({newest.path if newest else 'none'}) stays the newest. "
                "Lower lr.peak, lengthen the warmup, or enable spec.training.zLoss / maxZLoss"
            )
        self.step, self.tokens = self.step + 1, plan.tokens_after
        seconds = time.perf_counter() - started
        return StepRecord(
            step=self.step,
            tokens=self.tokens,
            phase=plan.phase.name,
            phase_index=plan.phase.index,
            loss=result.loss,
            z_loss=result.z_loss,
            max_z_loss=result.max_z_loss,
            distill_loss=result.distill_loss,
            grad_norm=result.grad_norm,
            lr=plan.lr,
            batch_tokens=plan.batch_tokens,
            seq_len=plan.seq_len,
            step_seconds=seconds,
            data_seconds=data_seconds,
            tokens_per_second=plan.batch_tokens / seconds,
            tokens_per_source=dict(self.loader.tokens_per_source),
            batch_checksum=result.batch_checksum,
        )

    def save_checkpoint(self) -> CheckpointInfo:
        """Checkpoint the state after the step just taken (collective: every rank calls it)."""
        assert self.plan is not None, "save_checkpoint() is for callbacks of a step"
        phase = self.plan.phase
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "phase_index": phase.index,
            "phase": phase.name,
            "loader": self.loader.state_dict(),
            "rng": _rng_state(),
            "model": self.model_fields,
            "run": self.run.name,
            "worldSize": self.topo.world_size,
            "restarts": self.restarts,
        }
        info = self.manager.save(self.step, self.app_state, meta, phase_boundary=self.plan.ends_phase)
        self.last_checkpoint = info.path
        for callback in self.callbacks:
            callback.on_checkpoint(info, self.manager.last_save_seconds)
        return info

    def _status_after(self, plan: StepPlan) -> RunStatus | None:
        """Why the gang stops after this step, or None to keep going."""
        run, phase, step, tokens, checkpoint = self.run, plan.phase, self.step, self.tokens, self.last_checkpoint
        if plan.ends_phase and phase.index == len(run.phases) - 1:
            return RunStatus(GangState.COMPLETE, step, tokens, phase.index, phase.name, checkpoint, "all phases done")
        if plan.ends_phase and next_phase_needs_relaunch(run, phase):
            nxt = run.phases[phase.index + 1]
            message = f"phase {nxt.name} needs another topology (world size {nxt.world_size})"
            return RunStatus(GangState.RELAUNCH, step, tokens, nxt.index, nxt.name, checkpoint, message)
        if self.stopping:
            message = "stopped on request after a checkpoint"
            return RunStatus(GangState.STOPPED, step, tokens, phase.index, phase.name, checkpoint, message)
        return None


def load_extensions(trainer: Trainer, spec: str | None = None) -> None:
    """Install the callbacks and checkpoint hooks that ``STAGERUN_CALLBACKS`` (or ``spec``) names.

    Each comma-separated entry is ``package.module:factory``; ``factory(trainer)`` returns an iterable whose
    :class:`Callback` items are appended to ``trainer.callbacks`` (after the built-in ones) and whose other
    callables become ``trainer.manager.before_commit`` hooks, called as ``hook(step)``.
    """
    for entry in (os.environ.get(CALLBACKS_ENV, "") if spec is None else spec).split(","):
        entry = entry.strip()
        if not entry:
            continue
        module_name, _, attribute = entry.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"{CALLBACKS_ENV}: {entry!r} is not package.module:factory")
        factory = getattr(importlib.import_module(module_name), attribute)
        items: Iterable[Callback | CheckpointHook] = factory(trainer) or ()
        for item in items:
            if isinstance(item, Callback):
                trainer.callbacks.append(item)
            elif callable(item):
                trainer.manager.before_commit.append(item)
            else:
                raise TypeError(f"{CALLBACKS_ENV}: {entry} returned {item!r}, neither a Callback nor a callable")
