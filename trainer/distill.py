"""Distillation (AFM): a teacher model runs beside the student, in eval mode and without gradients, sharded the same
way; the student's target becomes ``weight x one-hot(teacher top-1) + (1 - weight) x one-hot(label)``.

The teacher's weights come from a stagerun checkpoint: a checkpoint root (its newest committed checkpoint) or one
``step-…`` folder. Teachers are built when a distilling phase starts and dropped when a phase without one starts.
"""

from __future__ import annotations

import logging
import re

import torch

from stagerun.core.spec import ModelSpec, ResolvedPhase
from stagerun.core.spec.model import architecture_fields, comparable_model_fields
from stagerun.core.spec.presets import resolve_model

from .checkpoint import CheckpointInfo, CheckpointManager, ModelOptimizerState

log = logging.getLogger("stagerun.trainer")
_STEP = re.compile(r"^step-(\d+)$")


class TeacherError(Exception):
    """A teacher no rerun can fix (failure_advice.py classifies it as permanent)."""


class TeacherNotFound(TeacherError, FileNotFoundError):
    pass


class TeacherMismatch(TeacherError, RuntimeError):
    pass


def teacher_spec(teacher, student: ModelSpec) -> ModelSpec:
    """The resolved architecture of a TeacherSpec: its own model fields, or the student's."""
    return resolve_model(teacher.model) if teacher.model is not None else student


def architecture_differences(spec: ModelSpec, meta: dict) -> list[str] | None:
    """The spec.model fields in which the checkpoint with ``meta`` (its meta.json) differs from ``spec``; None when
    it holds that architecture. Both sides through ``architecture_fields``, so a checkpoint written before a model
    field existed matches a spec that leaves the field at its default."""
    saved = meta.get("model")
    if not isinstance(saved, dict):
        return ["model (meta.json does not record it)"]
    expected = architecture_fields(spec)
    saved = comparable_model_fields(saved)
    if saved == expected:
        return None
    return sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))


def check_teacher_architecture(info: CheckpointInfo, meta: dict, spec: ModelSpec) -> None:
    """Raise TeacherMismatch unless the checkpoint's meta says it holds ``spec`` (also the pre-flight check)."""
    changed = architecture_differences(spec, meta)
    if changed is not None:
        raise TeacherMismatch(
            f"teacher checkpoint {info.path} holds another architecture than "
            "spec.phases[*].distill.teacher.model says: set the teacher's model fields to "
            f"those it was trained with (fields that differ: {', '.join(changed)}; it has {meta.get('model')})"
        )


TEACHER_FIELD = "spec.phases[*].distill.teacher.checkpoint"


def committed_checkpoint(
    url: str, field: str = TEACHER_FIELD, not_found: type[Exception] = TeacherNotFound
) -> tuple[CheckpointManager, CheckpointInfo]:
    """The checkpoint ``url`` names: the newest committed one under a root, or the committed step folder itself.
    ``field``: the manifest field that gave ``url``, named in the ``not_found`` error when nothing committed is
    there (also spec.model.init's checkpoint, model/initial_weights.py)."""
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
    raise not_found(
        f"{field}: no committed checkpoint at {url} (give a checkpoint root or a committed step-… folder of "
        "the run whose weights you want)"
    )


teacher_checkpoint = committed_checkpoint  # the teachers' name for it (pre-flight, tests)


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
        spec = teacher_spec(teacher, self.student)
        key = (teacher.checkpoint, spec)
        if key != self._key:
            self._model = self._load(spec, teacher.checkpoint)
            self._key = key
        return self._model, phase.distill.weight

    def _load(self, spec: ModelSpec, url: str):
        manager, info = teacher_checkpoint(url)
        model = self._build(spec)
        check = lambda meta: check_teacher_architecture(info, meta, spec)  # noqa: E731 - before any tensor is read
        manager.load(info, {"train": ModelOptimizerState(model, None)}, check_meta=check)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        log.warning("teacher loaded from %s (step %d)", info.path, info.step)
        return model


@torch.no_grad()
def teacher_targets(
    teacher,
    inputs: torch.Tensor,
    doc_ids: torch.Tensor | None,
    vocab_size: int,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The teacher's top-1 prediction at every position (padded vocabulary rows never win). ``positions``: the
    batch's per-document positions, used if the teacher's own spec asks for them."""
    logits = teacher(inputs, doc_ids, positions=positions)
    return logits[..., :vocab_size].argmax(dim=-1)
