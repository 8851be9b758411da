"""What the step loop hands to everything around it: the :class:`StepRecord` of each step, the :class:`Callback`
interface, and loading users' callbacks from ``STAGERUN_CALLBACKS``.

Kept apart from the loop (trainer.py) because it is the extension surface: the built-in callbacks (callbacks.py,
exporter.py), the tests' faults and users' own callbacks implement it, and it changes far less often than the loop.
Users add callbacks without touching the code: ``STAGERUN_CALLBACKS=package.module:factory[,...]`` names
factories that receive the :class:`~stagerun.trainer.trainer.Trainer` and return callbacks and/or checkpoint hooks
(:func:`load_extensions`, docs/architecture.md). ``Callback``, ``StepRecord`` and ``load_extensions`` are also
importable from ``stagerun.trainer.trainer``, the documented path.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stagerun.core.plan import StepPlan
from stagerun.core.protocol import RunStatus, to_json_dict

from .checkpoint import CheckpointInfo

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CALLBACKS_ENV", "Callback", "CheckpointHook", "StepRecord", "load_extensions"]

CALLBACKS_ENV = "STAGERUN_CALLBACKS"


def _wire(name: str) -> Any:
    return field(metadata={"json": name})


def _wire_optional(name: str) -> Any:
    """A field that defaults to None (the ones only some phases fill): records built without it stay valid."""
    return field(default=None, metadata={"json": name})


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as every callback sees it; ``to_dict`` is a ``metrics.jsonl`` line.

    The values read back from the device (losses, grad norm, checksum) and the timings are there only on steps that
    read them (``has_values``): log steps (``spec.training.logEverySteps``), checkpoint steps and a phase's last
    step; on the others they are None, the device may still be busy with the step, and reading them would stall
    the host. Timings are means over the steps since the previous step with values (the host runs ahead of the
    device in between, so only such windows measure it).
    """

    step: int
    tokens: int  # seen after this step
    phase: str
    phase_index: int = _wire("phaseIndex")
    loss: float | None = _wire("loss")
    z_loss: float | None = _wire("zLoss")
    max_z_loss: float | None = _wire("maxZLoss")
    distill_loss: float | None = _wire("distillLoss")
    grad_norm: float | None = _wire("gradNorm")
    lr: float = _wire("lr")
    batch_tokens: int = _wire("batchTokens")
    seq_len: int = _wire("seqLen")
    step_seconds: float | None = _wire("stepSeconds")
    data_seconds: float | None = _wire("dataSeconds")  # waited for the batch (the prefetch thread draws it ahead)
    tokens_per_second: float | None = _wire("tokensPerSecond")
    tokens_per_source: dict[str, int] = _wire("tokensPerSource")
    batch_checksum: float | None = _wire("batchChecksum")
    # kind: dpo phases only (None elsewhere), read with the other values: means over the global batch's pairs, as
    # TRL logs them (rewards/chosen, ...); a reward is beta x (policy - reference) summed response log-probability.
    # In these phases ``loss`` is the objective: dpoLoss + nllWeight x dpoNll.
    dpo_loss: float | None = _wire_optional("dpoLoss")
    rewards_chosen: float | None = _wire_optional("rewardsChosen")
    rewards_rejected: float | None = _wire_optional("rewardsRejected")
    rewards_margin: float | None = _wire_optional("rewardsMargin")
    rewards_accuracy: float | None = _wire_optional("rewardsAccuracy")  # pairs whose chosen reward is higher
    dpo_nll: float | None = _wire_optional("dpoNll")  # mean NLL of the chosen responses' tokens
    pairs: int | None = _wire_optional("pairs")  # preference pairs in the global batch
    # The loader's packing counts of this step's global batch (data/loader.py StepCounts), every sft and dpo step:
    # conversations longer than a row begun (split over rows, sft) and pairs cut to fit a row (dpo).
    split_conversations: int | None = _wire_optional("splitConversations")
    truncated_pairs: int | None = _wire_optional("truncatedPairs")

    @property
    def has_values(self) -> bool:
        return self.loss is not None

    def post_training_values(self) -> dict[str, float] | None:
        """This step's sft/dpo values under metrics.POST_TRAINING_GAUGES' names (without ``stagerun_``), those it
        has; None on a pretrain step (nothing to export)."""
        values = {
            "dpo_loss": self.dpo_loss,
            "dpo_rewards_chosen": self.rewards_chosen,
            "dpo_rewards_rejected": self.rewards_rejected,
            "dpo_rewards_margin": self.rewards_margin,
            "dpo_rewards_accuracy": self.rewards_accuracy,
            "dpo_nll": self.dpo_nll,
            "dpo_pairs": self.pairs,
            "split_conversations": self.split_conversations,
            "truncated_pairs": self.truncated_pairs,
        }
        present = {k: float(v) for k, v in values.items() if v is not None}
        return present or None

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

    def on_checkpoint(self, checkpoint: CheckpointInfo, save_seconds: float | None) -> None:
        """``checkpoint`` is committed. With async saves (``spec.checkpoint.asyncSave``) each rank learns that on
        its own, a step or more after the save started (or when the loop ends), so ranks may call this at
        different steps: it must not run collectives."""

    def on_phase_end(self, record: StepRecord) -> None:
        """``record`` was the last step of its phase (its checkpoint is saved; an async one may still be in
        flight, and commits before the gang ends)."""

    def on_stop(self, status: RunStatus) -> None:
        """The loop ended normally: why the gang stops (written to status.json by rank 0 afterwards)."""

    def close(self) -> None:
        """Always called when the loop ends, also after an error."""


# Called on every rank just before a checkpoint's commit marker is written (rank 0: after meta.json).
CheckpointHook = Callable[[int], None]


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
