"""Distillation (AFM): a teacher model runs beside the student, in eval mode and without gradients, sharded the same
way; the student's target becomes ``weight x one-hot(teacher top-1) + (1 - weight) x one-hot(label)``.

The teacher's weights come from a stagerun checkpoint: a checkpoint root (its newest committed checkpoint) or one
``step-…`` folder. Teachers are built when a distilling phase starts and dropped when a phase without one starts.
"""

from __future__ import annotations

import logging
import re

import torch

from stagerun.core.spec import ModelSpec, ResolvedPhase, to_manifest
from stagerun.core.spec.presets import resolve_model

from .checkpoint import CheckpointInfo, CheckpointManager, ModelOptimizerState

log = logging.getLogger("stagerun.trainer")
_STEP = re.compile(r"^step-(\d+)$")


def teacher_checkpoint(url: str) -> tuple[CheckpointManager, CheckpointInfo]:
    """The checkpoint ``url`` names: the newest committed one under a root, or the committed step folder itself."""
    manager = CheckpointManager(url, keep=1_000_000)  # read-only use: retention is never applied here
    latest = manager.latest()
    if latest is not None:
        return manager, latest
    parent, _, name = url.rstrip("/").rpartition("/")
    match = _STEP.match(name)
    if match and parent:
        parent_manager = CheckpointManager(parent, keep=1_000_000)
        for info in parent_manager.committed():
            if info.step == int(match.group(1)):
                return parent_manager, info
    raise FileNotFoundError(
        f"spec.phases[*].distill.teacher.checkpoint: no committed checkpoint at {url} (give a "
        "checkpoint root or a committed step-… folder of the teacher's run)"
    )


class Teachers:
    """The teacher of the current phase, built on first use and kept while consecutive phases share it."""

    def __init__(self, student: ModelSpec, build_model) -> None:
        self.student, self._build = student, build_model
        self._key: tuple[str, ModelSpec] | None = None
        self._model: torch.nn.Module | None = None

    def for_phase(self, phase: ResolvedPhase):
        """(teacher model, weight) for a distilling phase, else (None, 0.0)."""
        if phase.distill is None:
            self._key = self._model = None  # a non-distilling phase frees the teacher's memory
            return None, 0.0
        teacher = phase.distill.teacher
        spec = resolve_model(teacher.model) if teacher.model is not None else self.student
        key = (teacher.checkpoint, spec)
        if key != self._key:
            self._model = self._load(spec, teacher.checkpoint)
            self._key = key
        return self._model, phase.distill.weight

    def _load(self, spec: ModelSpec, url: str):
        manager, info = teacher_checkpoint(url)
        model = self._build(spec)
        expected = {k: v for k, v in to_manifest(spec).items() if k != "init"}

        def same_architecture(meta: dict) -> None:
            if meta.get("model") != expected:
                raise RuntimeError(
                    f"teacher checkpoint {info.path} holds another architecture than "
                    "spec.phases[*].distill.teacher.model says: set the teacher's model fields to "
                    f"those it was trained with ({meta.get('model')})"
                )

        manager.load(info, {"train": ModelOptimizerState(model, None)}, check_meta=same_architecture)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        log.warning("teacher loaded from %s (step %d)", info.path, info.step)
        return model


@torch.no_grad()
def teacher_targets(teacher, inputs: torch.Tensor, doc_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """The teacher's top-1 prediction at every position (padded vocabulary rows never win)."""
    logits = teacher(inputs, doc_ids)
    return logits[..., :vocab_size].argmax(dim=-1)
