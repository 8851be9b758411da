"""Resolution: a parsed TrainingRun becomes a ResolvedRun whose every phase states every value.

Inheritance rules (documented in docs/manifest.md):
- seqLen, batch, microBatchSize, data weights, parallelism and resources: unset means "as the previous phase
  ended" (batch: the last size the previous phase used).
- lr unset: constant at the LR the previous phase ended with. lr.peak unset: that same LR.
- optimizer fields unset: the previous phase's (first phase: spec.training.optimizer and gradClip).
- rope fields unset: the previous phase's (first phase: spec.model.ropeTheta and ropeScaling; :mod:`.rope`).
The first phase must set seqLen, batch and lr.peak. Cross-field problems are reported with the manifest path of the
field that causes them; nothing is coerced. The batch ramp (:mod:`.ramp`) and the LR schedule (:mod:`.lr_schedule`)
and the optimizer settings (:mod:`.optimizer`) are resolved in their own modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .fields import Problem, explicit_fields
from .lr_schedule import ResolvedLR, resolve_lr, running_tokens
from .model import ModelSpec
from .optimizer import ResolvedOptimizer, first_optimizer, resolve_optimizer
from .ramp import check_ramp, resolve_ramp
from .rope import ResolvedRope, model_rope, resolve_phase_rope
from .run import (
    CheckpointSpec,
    DistillSpec,
    DpoSpec,
    EvalSpec,
    ParallelismSpec,
    ResourcesSpec,
    SourceSpec,
    TokenizerSpec,
    TrainingRun,
    TrainingSpec,
)

__all__ = [
    "WEIGHT_TOLERANCE",
    "ResolvedLR",
    "ResolvedOptimizer",
    "ResolvedPhase",
    "ResolvedRun",
    "check_weights_sum",
    "resolve_phases",
]

WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ResolvedPhase:
    index: int
    name: str
    start_tokens: int
    tokens: int
    seq_len: int
    ramp: tuple[tuple[int, int], ...]  # (tokens since phase start, global batch in tokens)
    micro_batch_size: int
    lr: ResolvedLR
    weights: dict[str, float]
    parallelism: ParallelismSpec
    resources: ResourcesSpec
    world_size: int
    optimizer: ResolvedOptimizer
    distill: DistillSpec | None = None  # not inherited: only the phases that say so distil
    eval: EvalSpec | None = None  # inherited whole; an empty block ({}) turns evaluation off
    rope: ResolvedRope | None = None  # None: ALiBi (no rotary tables); changes in-process at the phase start
    kind: str = "pretrain"  # pretrain | sft | dpo (spec.phases[].kind, inherited)
    dpo: DpoSpec | None = None  # set exactly on dpo phases (defaults when the manifest gives none)
    reset_optimizer: bool = False  # spec.phases[].optimizer.reset: fresh optimizer state at the phase start

    @property
    def masks_documents(self) -> bool:
        """Whether sequences attend only within their documents: sft and dpo always (packed conversations and
        pairs must not see each other), pretrain phases when spec.training.docMasking says so."""
        return self.kind != "pretrain"

    @property
    def end_tokens(self) -> int:
        return self.start_tokens + self.tokens

    @property
    def topology(self) -> tuple:
        """What a running gang cannot change in-process: a new value needs a relaunch."""
        return (self.parallelism, self.resources.nodes, self.resources.gpus_per_node, self.world_size)


@dataclass(frozen=True)
class ResolvedRun:
    name: str
    namespace: str | None
    model: ModelSpec
    tokenizer: TokenizerSpec
    sources: dict[str, SourceSpec]
    data_seed: int
    phases: tuple[ResolvedPhase, ...]
    checkpoint: CheckpointSpec
    training: TrainingSpec
    manifest: TrainingRun

    @property
    def total_tokens(self) -> int:
        return self.phases[-1].end_tokens


def resolve_phases(run: TrainingRun, model: ModelSpec, problems: list[Problem], world_override: int | None):
    """Resolved phases (or None entries where a phase could not be resolved), recording problems."""
    spec = run.spec
    sources = list(spec.data.sources)
    default_weights = {name: src.weight for name, src in spec.data.sources.items()}
    resolved: list[ResolvedPhase] = []
    start = 0
    prev: ResolvedPhase | None = None
    failed = False
    first_optim = first_optimizer(spec.training, problems)
    first_rope = model_rope(model, problems)
    for index, phase in enumerate(spec.phases):
        path = f"spec.phases[{index}]"
        if failed and prev is None:
            break  # every later phase inherits from the broken first one: their problems would only echo it
        ok = True  # (unique phase names: the reader checks spec.phases, a list keyed by name)

        seq_len = phase.seq_len if phase.seq_len is not None else (prev.seq_len if prev else None)
        if seq_len is None:
            problems.append(Problem(f"{path}.seqLen", "the first phase must set seqLen", "add e.g. seqLen: 4096"))
            ok = False
        elif phase.seq_len is not None and seq_len % 8:
            problems.append(
                Problem(
                    f"{path}.seqLen",
                    f"must be a positive multiple of 8, got {seq_len}",
                    f"use {seq_len - seq_len % 8 or 8} or {seq_len + 8 - seq_len % 8}",
                )
            )
            ok = False
        elif model.max_seq_len is not None and seq_len > model.max_seq_len:
            problems.append(
                Problem(
                    f"{path}.seqLen",
                    f"{seq_len} is longer than the model's maxSeqLen {model.max_seq_len}",
                    f"lower seqLen or raise spec.model.maxSeqLen to at least {seq_len}",
                )
            )
            ok = False

        ramp = resolve_ramp(phase, prev, path, problems)
        ok = ok and ramp is not None
        if ramp is not None and seq_len is not None:
            ok = check_ramp(ramp, phase, seq_len, path, problems) and ok

        micro = phase.micro_batch_size or (prev.micro_batch_size if prev else 1)
        lr = resolve_lr(phase, prev, path, problems, start=start, run_tokens=running_tokens(spec.phases, index))
        ok = ok and lr is not None
        optim_before = prev.optimizer if prev else first_optim
        optimizer = resolve_optimizer(phase.optimizer, optim_before, path, problems) if optim_before else None
        ok = ok and optimizer is not None

        rope, rope_ok = resolve_phase_rope(phase.rope, prev.rope if prev else first_rope, model, path, problems)
        ok = ok and rope_ok
        weights = _resolve_weights(phase, prev, default_weights, sources, path, problems)
        ok = ok and weights is not None

        kind = phase.kind or (prev.kind if prev else "pretrain")
        dpo = _resolve_dpo(phase, kind, prev, path, problems)
        ok = ok and (dpo is not None or kind != "dpo")

        parallelism = _merge(prev.parallelism if prev else spec.parallelism, phase.parallelism)
        resources = _merge(prev.resources if prev else spec.resources, phase.resources)
        world = world_override or resources.world_size
        if ok and seq_len is not None and lr is not None and optimizer is not None:  # ok implies them (for mypy)
            current = ResolvedPhase(
                index=index,
                name=phase.name,
                start_tokens=start,
                tokens=phase.tokens,
                seq_len=seq_len,
                ramp=ramp,
                micro_batch_size=micro,
                lr=lr,
                weights=weights,
                parallelism=parallelism,
                resources=resources,
                world_size=world,
                optimizer=optimizer,
                distill=phase.distill,
                eval=phase.eval if phase.eval is not None else (prev.eval if prev else None),
                rope=rope,
                kind=kind,
                dpo=dpo,
                reset_optimizer=bool(phase.optimizer is not None and phase.optimizer.reset),
            )
            if phase.distill is not None:
                ok = _check_teacher(phase.distill, model, path, problems)
            if ok:
                resolved.append(current)
                prev = current
            else:
                failed = True
        else:
            failed = True  # keep going: later phases' own problems are reported too (they inherit from `prev`)
        start += phase.tokens
    return None if failed else tuple(resolved)


def _resolve_dpo(phase, kind: str, prev: ResolvedPhase | None, path: str, problems: list[Problem]) -> DpoSpec | None:
    """A dpo phase's settings: its own, else the previous dpo phase's, else the defaults; None elsewhere."""
    if kind != "dpo":
        if phase.dpo is not None:
            problems.append(
                Problem(
                    f"{path}.dpo",
                    f"only applies to phases of kind dpo; this phase's is {kind}",
                    "drop dpo, or set kind: dpo",
                )
            )
        return None
    if phase.dpo is not None:
        return phase.dpo
    return prev.dpo if prev is not None and prev.dpo is not None else DpoSpec()


def _check_teacher(distill: DistillSpec, student: ModelSpec, path: str, problems: list[Problem]) -> bool:
    """The teacher's architecture must resolve and predict over the student's (padded) vocabulary."""
    from .presets import PRESETS, resolve_model

    raw = distill.teacher.model
    if raw is not None and raw.preset is not None and raw.preset not in PRESETS:
        problems.append(
            Problem(
                f"{path}.distill.teacher.model.preset",
                f"unknown preset {raw.preset!r}",
                f"use one of {', '.join(PRESETS)}",
            )
        )
        return False
    teacher = resolve_model(raw) if raw is not None else student
    if teacher.vocab_size is None or teacher.padded_vocab != student.padded_vocab:
        problems.append(
            Problem(
                f"{path}.distill.teacher.model.vocabSize",
                f"the teacher's vocabulary ({teacher.vocab_size}) differs from the student's ({student.vocab_size})",
                "distillation compares predictions token by token: use the student's vocabSize",
            )
        )
        return False
    return True


def _merge(base, override):
    """``base`` with the fields ``override`` set explicitly."""
    if override is None:
        return base
    return dataclasses.replace(base, **{name: getattr(override, name) for name in explicit_fields(override)})


def _resolve_weights(phase, prev, default_weights, sources, path, problems):
    if phase.data is None or phase.data.weights is None:
        return dict(prev.weights) if prev else dict(default_weights)
    weights = phase.data.weights
    ok = True
    for name, weight in weights.items():
        if name not in sources:
            problems.append(
                Problem(
                    f"{path}.data.weights.{name}",
                    "names no source in spec.data.sources",
                    f"use one of {', '.join(sources)}",
                )
            )
            ok = False
        elif weight < 0:
            problems.append(Problem(f"{path}.data.weights.{name}", f"must be at least 0, got {weight}"))
            ok = False
    if ok and not check_weights_sum(weights, f"{path}.data.weights", problems):
        ok = False
    if not ok:
        return None
    return {name: float(weights.get(name, 0.0)) for name in sources}


def check_weights_sum(weights: dict[str, float], path: str, problems: list[Problem]) -> bool:
    total = sum(weights.values())
    if total <= 0:
        problems.append(Problem(path, "all weights are 0", "give at least one source a positive weight"))
        return False
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        normalised = ", ".join(f"{k}: {v / total:.4g}" for k, v in weights.items())
        problems.append(
            Problem(path, f"weights sum to {total:.6g}, not 1", f"normalised, they would be {{{normalised}}}")
        )
        return False
    return True
