"""Checkpoint averaging (Polyak; Llama 3 averages the checkpoints of its anneal): the mean of the model weights of a
phase's last N checkpoints, two ways.

- In a run, ``spec.phases[i].average: {last: N}``: at the phase's last step, just before its phase-end checkpoint
  is saved, the live weights become the mean of themselves and the phase's N - 1 newest committed checkpoints
  (:func:`average_at_phase_end`, called by ``Trainer.save_checkpoint``). The phase-end checkpoint is then written
  and committed the ordinary way (checksums, marker last), so a half-written average is never loaded, the next
  phase starts from the mean in-process and on resume alike, and a crash before the commit resumes from an earlier
  checkpoint, retrains to the phase end and averages the same checkpoints again. The optimizer state, loader
  position and RNG are the final step's. ``meta.json`` records the averaged steps.
- Offline, ``stagerun export --average N``: the mean of the N newest committed checkpoints of the exported
  checkpoint's phase, read tensor by tensor (:class:`AveragedSource`) straight into the Hugging Face files.

The mean is accumulated in float32 in the run (the master weights' dtype) and in float64 for the export.
Memory in the run: two more copies of this rank's shard of the weights (the sum and one checkpoint being read),
never the optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from .checkpoint import CheckpointInfo, CheckpointManager

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["AveragedSource", "average_at_phase_end", "average_into", "checkpoints_to_average"]

log = logging.getLogger("stagerun.trainer")


def checkpoints_to_average(
    committed: Iterable[CheckpointInfo], newest: CheckpointInfo, count: int
) -> list[CheckpointInfo]:
    """Up to ``count`` committed checkpoints of ``newest``'s phase, ending with ``newest``, oldest first."""
    same_phase = [c for c in committed if c.phase_index == newest.phase_index and c.step <= newest.step]
    return sorted(same_phase, key=lambda c: c.step)[-count:]


@torch.no_grad()
def average_into(model: torch.nn.Module, manager: CheckpointManager, infos: list[CheckpointInfo]) -> None:
    """``model``'s weights := the mean of its current weights and those of ``infos`` (collective: every rank calls
    it; each rank reads its own shards, DCP resharding whatever world wrote them)."""
    current: dict[str, torch.Tensor] = get_model_state_dict(model)  # type: ignore[assignment]  # a model's: tensors
    total = {name: value.detach().float().clone() for name, value in current.items()}
    for info in infos:
        buffer = {name: torch.empty_like(value) for name, value in current.items()}
        manager.load(info, {"train": {"model": buffer}})  # checksums verified first, like any load
        for name, value in buffer.items():
            total[name] += value.float()
        del buffer
    count = len(infos) + 1
    mean: dict[str, Any] = {name: (value / count).to(current[name].dtype) for name, value in total.items()}
    set_model_state_dict(model, mean)


def average_at_phase_end(trainer: Trainer) -> dict[str, Any] | None:
    """At a phase's last step, before its checkpoint: apply ``spec.phases[i].average`` to the live model (see the
    module docstring). Returns what ``meta.json`` records (None when the phase does not average)."""
    from .checkpoint_resume import agreed_candidates

    assert trainer.plan is not None, "average_at_phase_end() is for the save after a step"
    phase = trainer.plan.phase
    wanted = trainer.run.manifest.spec.phases[phase.index].average
    if wanted is None:
        return None
    trainer.manager.wait()  # an async save of this phase still in flight commits first
    earlier = [c for c in agreed_candidates(trainer.manager) if c.phase_index == phase.index and c.step < trainer.step]
    chosen = sorted(earlier[: wanted.last - 1], key=lambda c: c.step)
    if len(chosen) < wanted.last - 1 and trainer.topo.is_main:
        log.warning(
            "spec.phases[%d].average.last is %d but only %d checkpoint(s) of phase %s are committed before its end "
            "(a batch larger than spec.checkpoint.everyTokens saves fewer): averaging %d",
            phase.index,
            wanted.last,
            len(chosen),
            phase.name,
            len(chosen) + 1,
        )
    average_into(trainer.model, trainer.manager, chosen)
    steps = [c.step for c in chosen] + [trainer.step]
    if trainer.topo.is_main:
        log.warning("phase %s ends with the mean weights of steps %s", phase.name, steps)
    return {"last": wanted.last, "steps": steps}


class AveragedSource:
    """stagerun model tensors as the mean over several checkpoint sources (hf/weights.CheckpointSource), tensor by
    tensor: memory holds one tensor group per source at a time."""

    def __init__(self, sources: list[Any]) -> None:
        if not sources:
            raise ValueError("AveragedSource needs at least one checkpoint")
        shapes = sources[0].shapes()
        for source in sources[1:]:
            if source.shapes() != shapes:
                raise ValueError(f"{source.url} holds other tensors than {sources[0].url}: it is another model")
        self.sources = sources
        self.url = sources[-1].url  # the newest: what the export is named after

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.sources[0].shapes()

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        total: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}
        for source in self.sources:
            for name, value in source.load(names).items():
                dtypes[name] = value.dtype
                total[name] = total[name] + value.double() if name in total else value.double()
        return {name: (value / len(self.sources)).to(dtypes[name]) for name, value in total.items()}
