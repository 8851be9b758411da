"""The step loop: plan -> data -> train_step -> one ``StepRecord``, handed to the callbacks.

Everything a step can lead to besides the optimizer update (a metrics line, the progress bar, /progress and
/metrics, a checkpoint and retention, a manifest reload, a test's fault) is a :class:`Callback` (callbacks.py,
exporter.py). The loop itself only steps, agrees on a stop with the other ranks, and decides why the gang ends.

This module is the loop and the training state it owns (what a checkpoint of it stores, how a resume restores
it). The interface the loop hands out (``StepRecord``, ``Callback``, loading users' callbacks from
``STAGERUN_CALLBACKS``) is callback_api.py's; those names stay importable from here, the path the docs give
(docs/architecture.md).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, cast

import torch

from stagerun.core.chat_template import chat_format
from stagerun.core.plan import (
    StepPlan,
    checkpoint_due,
    next_phase_needs_relaunch,
    phase_at,
    phase_first_tokens,
    step_plan,
)
from stagerun.core.protocol import GangState, RunStatus
from stagerun.core.spec import ResolvedRun, to_manifest
from stagerun.core.spec.model import architecture_fields

from . import distributed as D
from .batch import StepBatch
from .callback_api import Callback, StepRecord, load_extensions
from .checkpoint import CheckpointInfo, CheckpointManager, ModelOptimizerState
from .checkpoint_average import average_at_phase_end
from .checkpoint_resume import Resumption, agreed_candidates, load_newest_intact
from .data.loader import PackedMixLoader
from .distill import Teachers
from .dpo import References
from .model import Transformer
from .prefetch import Prefetcher
from .step import StepResult, apply_phase_optimizer, dpo_step, reset_optimizer_state, train_step

# Callback, StepRecord and load_extensions are callback_api.py's; docs, extensions and train.py import them here.
__all__ = [
    "SAVE_WAIT_ON_ERROR_SECONDS",
    "STOP_CHECK_STEPS",
    "Callback",
    "StepRecord",
    "StopRequest",
    "Trainer",
    "load_extensions",
]

log = logging.getLogger("stagerun.trainer")

# The stop agreement is a collective plus a host sync: it runs on every step that reads values anyway (log,
# checkpoint and phase-end steps) and otherwise every this many steps, so a SIGTERM leads to a checkpoint within at
# most this many steps (fewer with a smaller logEverySteps; the default of 1 agrees after every step).
STOP_CHECK_STEPS = 8
# A run failing with an async save in flight gives it this long to commit (it is a good checkpoint of an earlier
# step), then abandons it: no marker is written, so a half-written folder is never loaded.
SAVE_WAIT_ON_ERROR_SECONDS = 120.0


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


@dataclass
class _Window:
    """The steps since the last step that read values: their timings are measured as one stretch."""

    started: float
    steps: int = 0
    tokens: int = 0
    data_seconds: float = 0.0


class Trainer:
    """Owns the training state (model, optimizer, loader, RNG, position in the plan) and runs the step loop.

    ``prefetch``: draw the next step's batch in a background thread (prefetch.py) while the step runs.
    ``references``: the dpo phases' reference models (dpo.py); without, a dpo phase cannot run."""

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
        prefetch: bool = True,
        references: References | None = None,
    ) -> None:
        self.run, self.topo, self.manager = run, topo, manager
        self.model, self.optimizer, self.loader, self.teachers = model, optimizer, loader, teachers
        self.references = references
        self.reference: torch.nn.Module | None = None  # the running dpo phase's frozen reference
        self.app_state = {"train": ModelOptimizerState(model, optimizer)}
        self.model_fields = architecture_fields(run.model)  # without init (where it began), as checkpoints record it
        template = run.tokenizer.chat_template
        self.chat_template = chat_format(template) if template is not None else None  # validated by resolve_run
        self.callbacks: list[Callback] = []
        self.step, self.tokens, self.restarts = 0, 0, 0
        self.last_checkpoint: str | None = None
        self.plan: StepPlan | None = None  # the step just taken, while its callbacks run
        self.batch: StepBatch | None = None  # its batch: the loader state a checkpoint after it stores
        self.result: StepResult | None = None  # its train_step result (device values until first read)
        self.stopping = False  # some rank was asked to stop: checkpoint after this step and end
        self.prefetch = prefetch
        self.prefetcher: Prefetcher | None = None  # the running loop's
        self.async_save = run.checkpoint.uses_async_save(topo.device.type == "cuda")
        self.resumption: Resumption | None = None  # set by resume(): what the fallback rules need
        self._window = _Window(time.perf_counter())

    def resume(
        self, latest: CheckpointInfo | None, candidates: list[CheckpointInfo] | None = None
    ) -> CheckpointInfo | None:
        """Load the newest intact checkpoint (collective) and return it; None starts from step 0.

        ``candidates``: rank 0's committed checkpoints, newest first (checkpoint_resume.agreed_candidates; listed
        here when not given, from ``latest`` down). A damaged one is de-committed and the previous one loaded."""
        if candidates is None:
            candidates = [] if latest is None else agreed_candidates(self.manager)
            candidates = [c for c in candidates if latest is not None and c.step <= latest.step]
        if not candidates:
            if self.topo.is_main:
                log.warning("no committed checkpoint under %s: starting from step 0", self.manager.url)
            return None
        fields = self.model_fields
        info, meta = load_newest_intact(self.manager, self.app_state, candidates, lambda c: _same_model(fields, c.path))
        self.resumption = Resumption(self.manager, candidates, info)
        self._restore(info, meta)
        return info

    def _restore(self, latest: CheckpointInfo, meta: dict[str, Any]) -> None:
        """The rest of a loaded checkpoint's state: loader position, RNG, counters; then the callbacks hear of it."""
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
        running_phase: int | None = None
        topo, training = self.topo, self.run.training
        prefetcher = self.prefetcher = Prefetcher(
            self.loader,
            device=topo.device,
            dp_rank=topo.dp_rank,
            dp_size=topo.dp_size,
            doc_masking=training.doc_masking,
            enabled=self.prefetch,
            context=topo.context_shard,
        )
        finished = False
        try:
            for callback in self.callbacks:
                callback.on_start(self)
            self._window = _Window(time.perf_counter())
            while True:
                plan = step_plan(self.run, self.tokens, self.step)
                assert plan is not None  # the last phase's end stops the loop before the plan runs out
                if plan.phase.index != running_phase:
                    running_phase = plan.phase.index
                    self._start_phase(plan)
                    rope = plan.phase.rope  # spec.phases[].rope: new rotary tables in-process, no relaunch
                    if rope is not None and cast(Transformer, self.model).set_rope(rope):
                        log.info("phase %s: RoPE %s", plan.phase.name, rope.describe())
                    for callback in self.callbacks:
                        callback.on_phase_start(plan)
                try:
                    record = self._train_step(plan, prefetcher, stop)
                except FloatingPointError as error:
                    self._fall_back(error, prefetcher)  # once, right after a resume; else it raises
                    running_phase = None
                    continue
                for callback in self.callbacks:
                    callback.on_step(record)
                if plan.ends_phase:
                    for callback in self.callbacks:
                        callback.on_phase_end(record)
                self._collect_checkpoint(block=False)
                if self._status_after(plan) is not None:
                    break
            self._collect_checkpoint(block=True)  # the gang ends: its last checkpoint commits first
            status = self._status_after(plan)
            assert status is not None
            for callback in self.callbacks:
                callback.on_stop(status)
            finished = True
        finally:
            prefetcher.close()  # a batch drawn ahead for a step never taken is dropped
            if not finished:
                self._settle_failed_save()
            for callback in self.callbacks:
                callback.close()
        return status

    def _start_phase(self, plan: StepPlan) -> None:
        """What changes in-process when this gang's first step of a phase is next (after a resume too)."""
        phase = plan.phase
        apply_phase_optimizer(self.optimizer, phase.optimizer)  # also after a resume's load
        # Fresh: the phase starts with this step. After a mid-phase resume the checkpoint holds the phase's own
        # optimizer state, and the reference must be the weights the phase began with, not the current ones.
        # (The phase's first step starts where the previous phase's last step ended, which may be past its budget.)
        first_tokens = phase_first_tokens(self.run, phase)
        assert first_tokens is not None, "a phase with a step to take has a first step"
        fresh = self.tokens == first_tokens
        if phase.reset_optimizer and fresh:
            reset_optimizer_state(self.optimizer)
            if self.topo.is_main:
                log.warning("phase %s: optimizer state reset (phases[%d].optimizer.reset)", phase.name, phase.index)
        if phase.kind == "dpo" and self.references is None:
            raise RuntimeError("a dpo phase needs the Trainer's references (dpo.References)")
        if self.references is not None:
            self.reference = self.references.for_phase(phase, self.model, fresh=fresh, first_tokens=first_tokens)

    def _train_step(self, plan: StepPlan, prefetcher: Prefetcher, stop: StopRequest) -> StepRecord:
        started = time.perf_counter()
        batch = prefetcher.take(plan)
        self._window.data_seconds += time.perf_counter() - started
        prefetcher.prefetch(self._next_plan(plan))  # drawn while this step runs (on GPUs: while its kernels run)
        if plan.phase.masks_documents and any(mb.doc_ids is None for mb in batch.micro_batches):
            # Packed conversations or pairs attending to each other would train silently on the wrong context.
            phase = plan.phase
            raise RuntimeError(f"phase {phase.name} ({phase.kind}) masks documents, but its batch has no doc ids")
        teacher, distill_weight = self.teachers.for_phase(plan.phase)
        if plan.phase.kind == "dpo":
            assert self.reference is not None and plan.phase.dpo is not None  # _start_phase built it
            result = dpo_step(
                self.model,
                self.reference,
                self.optimizer,
                batch,
                lr=plan.lr,
                topo=self.topo,
                training=self.run.training,
                dpo=plan.phase.dpo,
                grad_clip=plan.phase.optimizer.grad_clip,
            )
        else:  # pretrain and sft (whose loader masks every target outside the assistant turns)
            result = train_step(
                self.model,
                self.optimizer,
                batch,
                lr=plan.lr,
                topo=self.topo,
                training=self.run.training,
                teacher=teacher,
                distill_weight=distill_weight,
                vocab_size=self.run.model.vocab_size,
                grad_clip=plan.phase.optimizer.grad_clip,
            )
        self.step, self.tokens = self.step + 1, plan.tokens_after
        self.plan, self.batch, self.result = plan, batch, result
        if self._scheduled_sync(plan) or self.step % STOP_CHECK_STEPS == 0:
            self.stopping = D.any_rank(stop.requested, self.topo)
        return self._record(plan, batch, result)

    def _next_plan(self, plan: StepPlan) -> StepPlan | None:
        """The plan of the step after ``plan`` as the run stands now (a reload or a stop may still change it)."""
        if plan.ends_phase and next_phase_needs_relaunch(self.run, plan.phase):
            return None  # another gang trains it
        return step_plan(self.run, plan.tokens_after, plan.step + 1)

    def _scheduled_sync(self, plan: StepPlan) -> bool:
        """Whether the step just taken reads values anyway, a stop aside: a log step or a scheduled checkpoint."""
        return self.step % self.run.training.log_every_steps == 0 or self._checkpoint_scheduled(plan)

    def _checkpoint_scheduled(self, plan: StepPlan) -> bool:
        return plan.ends_phase or checkpoint_due(self.run.checkpoint.every_tokens, plan.tokens, plan.tokens_after)

    def wants_checkpoint(self) -> bool:
        """Whether the step just taken ends with a checkpoint: a phase's end, ``everyTokens``, or a stop."""
        assert self.plan is not None, "wants_checkpoint() is for callbacks of a step"
        return self.stopping or self._checkpoint_scheduled(self.plan)

    def _record(self, plan: StepPlan, batch: StepBatch, result: StepResult) -> StepRecord:
        window = self._window
        window.steps, window.tokens = window.steps + 1, window.tokens + plan.batch_tokens
        record = StepRecord(
            step=self.step,
            tokens=self.tokens,
            phase=plan.phase.name,
            phase_index=plan.phase.index,
            loss=None,
            z_loss=None,
            max_z_loss=None,
            distill_loss=None,
            grad_norm=None,
            lr=plan.lr,
            batch_tokens=plan.batch_tokens,
            seq_len=plan.seq_len,
            step_seconds=None,
            data_seconds=None,
            tokens_per_second=None,
            tokens_per_source=dict(batch.tokens_per_source),
            batch_checksum=None,
        )
        if plan.phase.kind != "pretrain":  # the loader's packing counts: host values, there on every step
            counts = batch.counts
            record = dataclasses.replace(
                record, split_conversations=counts.split_conversations, truncated_pairs=counts.truncated_pairs
            )
        if not (self._scheduled_sync(plan) or self.stopping):
            return record
        self._check_finite()  # the one host sync of the step (the result caches what it read)
        if self.resumption is not None:
            self.resumption.stepped_finite()  # the resumed-from checkpoint trains: retention keeps it
        now = time.perf_counter()
        elapsed, self._window = now - window.started, _Window(now)
        dpo = result.dpo if plan.phase.kind == "dpo" else None
        if dpo is not None:
            record = dataclasses.replace(
                record,
                dpo_loss=dpo.loss,
                rewards_chosen=dpo.chosen_reward,
                rewards_rejected=dpo.rejected_reward,
                rewards_margin=dpo.reward_margin,
                rewards_accuracy=dpo.reward_accuracy,
                dpo_nll=dpo.nll,
                pairs=dpo.pairs,
            )
        return dataclasses.replace(
            record,
            loss=result.loss,
            z_loss=result.z_loss,
            max_z_loss=result.max_z_loss,
            distill_loss=result.distill_loss,
            grad_norm=result.grad_norm,
            batch_checksum=result.batch_checksum,
            step_seconds=elapsed / window.steps,
            data_seconds=window.data_seconds / window.steps,
            tokens_per_second=window.tokens / elapsed,
        )

    def _check_finite(self) -> None:
        """Raise before anything is saved when the step just taken diverged (reads its loss: a host sync)."""
        assert self.plan is not None and self.result is not None
        loss = self.result.loss
        if not math.isfinite(loss):
            newest = self.manager.latest()
            raise FloatingPointError(
                f"loss is {loss} at step {self.step} (phase {self.plan.phase.name}); stopping without a "
                f"checkpoint so the newest good one ({newest.path if newest else 'none'}) stays the newest. "
                "Lower lr.peak, lengthen the warmup, or enable spec.training.zLoss / maxZLoss"
            )

    def save_checkpoint(self) -> CheckpointInfo | None:
        """Checkpoint the state after the step just taken (collective: every rank calls it).

        Returns the committed checkpoint; None for an async save, whose ``on_checkpoint`` comes once it commits."""
        assert self.plan is not None and self.batch is not None, "save_checkpoint() is for callbacks of a step"
        self._check_finite()  # a diverged step is never saved (its value is cached when the loop read it)
        phase = self.plan.phase
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "phase_index": phase.index,
            "phase": phase.name,
            "loader": self.batch.loader_state,  # not self.loader's: that may be a prefetched step further
            "rng": _rng_state(),
            "model": self.model_fields,
            "rope": to_manifest(phase.rope) if phase.rope else None,  # what `stagerun export` writes to config.json
            # the chat format the run trains with: `stagerun export` writes it to tokenizer_config.json unasked
            "chatTemplate": self.chat_template.to_json() if self.chat_template is not None else None,
            "run": self.run.name,
            "worldSize": self.topo.world_size,
            "restarts": self.restarts,
        }
        boundary = self.plan.ends_phase
        averaged = average_at_phase_end(self) if boundary else None  # spec.phases[i].average (checkpoint_average.py)
        if averaged is not None:
            meta["averaged"] = averaged
        if not self.async_save:
            info = self.manager.save(self.step, self.app_state, meta, phase_boundary=boundary)
            self._committed(info)
            return info
        gpu = self.topo.device.type == "cuda"
        previous = self.manager.save_async(self.step, self.app_state, meta, phase_boundary=boundary, pinned=gpu)
        if previous is not None:  # the save before had not committed yet: it has now
            self._committed(previous)
        return None

    def _fall_back(self, error: FloatingPointError, prefetcher: Prefetcher) -> None:
        """A non-finite loss right after a resume: load an older checkpoint, once, and go on; else raise ``error``.

        Every rank gets here on the same step (the loss is the global mean). What was committed after the target
        descends from the suspect state and is de-committed (checkpoint_resume.py)."""
        resumption = self.resumption
        target = resumption.fallback_target() if resumption is not None else None
        if resumption is None or target is None:
            raise error
        target_phase = phase_at(self.run, target.tokens)
        assert self.plan is not None  # the step that diverged
        if target_phase is None or target_phase.topology != self.plan.phase.topology:
            raise error  # another gang shape: this gang cannot train it (the next run resumes from there)
        self._settle_failed_save()  # an async save in flight commits (then is de-committed below) or is abandoned
        suspect = resumption.loaded
        reason = f"{error} (right after resuming from {suspect.path}); fell back to {target.path}"
        if self.topo.is_main:
            log.error("NON-FINITE LOSS RIGHT AFTER A RESUME: falling back once to %s: %s", target.path, error)
        resumption.decommit_after(target, reason)
        prefetcher.discard()  # drawn for a step of the abandoned timeline
        older = [c for c in resumption.candidates if c.step <= target.step]
        fields = self.model_fields
        info, meta = load_newest_intact(self.manager, self.app_state, older, lambda c: _same_model(fields, c.path))
        self.resumption = Resumption(self.manager, older, info)
        self.resumption.fell_back = True
        self._restore(info, meta)
        self._window = _Window(time.perf_counter())

    def _committed(self, info: CheckpointInfo) -> None:
        if self.resumption is not None:
            self.resumption.committed = True
        self.last_checkpoint = info.path
        for callback in self.callbacks:
            callback.on_checkpoint(info, self.manager.last_save_seconds)

    def _collect_checkpoint(self, *, block: bool) -> None:
        """Hand an async save that has committed to the callbacks (``block``: wait for it first)."""
        info = self.manager.wait() if block else self.manager.poll()
        if info is not None:
            self._committed(info)

    def _settle_failed_save(self) -> None:
        """The loop is failing: let an async save in flight commit, or abandon it (no marker) after a while."""
        try:
            self.manager.wait(timeout=SAVE_WAIT_ON_ERROR_SECONDS)
        except Exception as e:  # noqa: BLE001 - the loop's own error is the one to raise
            log.warning("checkpoint in flight when the run failed did not commit: %s", e)

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
