"""Resolution: a parsed TrainingRun becomes a ResolvedRun whose every phase states every value.

Inheritance rules (documented in docs/manifest.md):
- seqLen, batch, microBatchSize, data weights, parallelism and resources: unset means "as the previous phase
  ended" (batch: the last size the previous phase used).
- lr unset: constant at the LR the previous phase ended with. lr.peak unset: that same LR.
The first phase must set seqLen, batch and lr.peak. Cross-field problems are reported with the manifest path of the
field that causes them; nothing is coerced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .fields import Problem, explicit_fields
from .model import ModelSpec
from .quantities import format_count
from .run import (
    CheckpointSpec,
    DistillSpec,
    ParallelismSpec,
    PhaseSpec,
    ResourcesSpec,
    SourceSpec,
    TokenizerSpec,
    TrainingRun,
    TrainingSpec,
)

WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ResolvedLR:
    schedule: str
    peak: float
    end: float
    warmup_tokens: int
    decay_fraction: float
    decay_shape: str


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
    distill: DistillSpec | None = None  # not inherited: only the phases that say so distil

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
    names: set[str] = set()
    failed = False
    for index, phase in enumerate(spec.phases):
        path = f"spec.phases[{index}]"
        if failed and prev is None:
            break  # every later phase inherits from the broken first one: their problems would only echo it
        if phase.name in names:
            problems.append(
                Problem(f"{path}.name", f"duplicate phase name {phase.name!r}", "give each phase a unique name")
            )
        names.add(phase.name)
        ok = True

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
        elif seq_len > model.max_seq_len:
            problems.append(
                Problem(
                    f"{path}.seqLen",
                    f"{seq_len} is longer than the model's maxSeqLen {model.max_seq_len}",
                    f"lower seqLen or raise spec.model.maxSeqLen to at least {seq_len}",
                )
            )
            ok = False

        ramp = _resolve_ramp(phase, prev, path, problems)
        ok = ok and ramp is not None
        if ramp is not None and seq_len is not None:
            ok = _check_ramp(ramp, phase, seq_len, path, problems) and ok

        micro = phase.micro_batch_size or (prev.micro_batch_size if prev else 1)
        lr = _resolve_lr(phase, prev, path, problems)
        ok = ok and lr is not None

        weights = _resolve_weights(phase, prev, default_weights, sources, path, problems)
        ok = ok and weights is not None

        parallelism = _merge(prev.parallelism if prev else spec.parallelism, phase.parallelism)
        resources = _merge(prev.resources if prev else spec.resources, phase.resources)
        world = world_override or resources.world_size
        if ok:
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
                distill=phase.distill,
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


def _resolve_ramp(phase: PhaseSpec, prev: ResolvedPhase | None, path: str, problems: list[Problem]):
    batch = phase.batch
    if batch is None or (batch.size is None and batch.ramp is None):
        if prev is None:
            problems.append(
                Problem(
                    f"{path}.batch",
                    "the first phase must set batch.size or batch.ramp",
                    "add e.g. batch: {size: 4Mi} (tokens per optimizer step)",
                )
            )
            return None
        return ((0, prev.ramp[-1][1]),)
    if batch.size is not None and batch.ramp is not None:
        problems.append(Problem(f"{path}.batch", "set either size or ramp, not both", "keep one of them"))
        return None
    if batch.size is not None:
        return ((0, batch.size),)
    if not batch.ramp:
        problems.append(Problem(f"{path}.batch.ramp", "is empty", "list at least one {tokens, size} point"))
        return None
    return tuple((point.tokens, point.size) for point in batch.ramp)


def _check_ramp(ramp, phase: PhaseSpec, seq_len: int, path: str, problems: list[Problem]) -> bool:
    ok = True
    is_ramp = phase.batch is not None and phase.batch.ramp is not None
    inherited = phase.batch is None or (phase.batch.size is None and phase.batch.ramp is None)
    if is_ramp:
        where = lambda i, f: f"{path}.batch.ramp[{i}].{f}"  # noqa: E731
    else:
        where = lambda i, f: f"{path}.batch" + ("" if inherited else ".size")  # noqa: E731
    if ramp[0][0] != 0:
        problems.append(
            Problem(
                where(0, "tokens"),
                f"the first ramp point must be at tokens 0, got {ramp[0][0]}",
                "start the ramp with {tokens: 0, size: ...}",
            )
        )
        ok = False
    for i in range(1, len(ramp)):
        if ramp[i][0] <= ramp[i - 1][0]:
            problems.append(
                Problem(
                    where(i, "tokens"),
                    f"ramp points must be in increasing token order, "
                    f"{format_count(ramp[i][0])} follows {format_count(ramp[i - 1][0])}",
                    "sort the ramp by tokens",
                )
            )
            ok = False
        if ramp[i][1] <= ramp[i - 1][1]:
            problems.append(
                Problem(
                    where(i, "size"),
                    f"a batch ramp must increase, {format_count(ramp[i][1])} follows {format_count(ramp[i - 1][1])}",
                    "make each size larger than the one before",
                )
            )
            ok = False
    for i, (tokens, size) in enumerate(ramp):
        if tokens >= phase.tokens:
            problems.append(
                Problem(
                    where(i, "tokens"),
                    f"{format_count(tokens)} is not inside the phase's budget of "
                    f"{format_count(phase.tokens)} tokens, so this size would never be used",
                    "ramp tokens count from the phase start; lower it or drop the point",
                )
            )
            ok = False
        if size % seq_len:
            hint, fix = "", ""
            if size % 1000 == 0:
                hint = "; note K/M/B/T are powers of 1000 while Ki/Mi/Gi/Ti are powers of 1024"
                binary = _binary_reading(size)
                if binary and binary[1] % seq_len == 0:
                    fix = f"did you mean {binary[0]} ({binary[1]} tokens)? otherwise "
            lower, upper = size - size % seq_len, size + seq_len - size % seq_len
            origin = " (inherited from the previous phase)" if inherited else ""
            problems.append(
                Problem(
                    where(i, "size"),
                    f"batch of {size} tokens{origin} is not a whole number of sequences of seqLen {seq_len}{hint}",
                    f"{fix}use {lower or upper} or {upper} tokens",
                )
            )
            ok = False
    return ok


def _binary_reading(size: int) -> tuple[str, int] | None:
    """'8K' read as '8Ki': the size a user most likely meant when a decimal size does not fit."""
    for suffix, decimal, binary in (
        ("Ti", 10**12, 2**40),
        ("Gi", 10**9, 2**30),
        ("Mi", 10**6, 2**20),
        ("Ki", 10**3, 2**10),
    ):
        if size % decimal == 0:
            return f"{size // decimal}{suffix}", size // decimal * binary
    return None


def _resolve_lr(phase: PhaseSpec, prev: ResolvedPhase | None, path: str, problems: list[Problem]):
    lr = phase.lr
    if lr is None:
        if prev is None:
            problems.append(
                Problem(
                    f"{path}.lr",
                    "the first phase must set lr",
                    "add e.g. lr: {peak: 3e-4, warmupTokens: 100M, schedule: cosine}",
                )
            )
            return None
        return ResolvedLR("constant", prev.lr.end, prev.lr.end, 0, 0.0, "linear")
    peak = lr.peak if lr.peak is not None else (prev.lr.end if prev else None)
    ok = True
    if peak is None:
        problems.append(Problem(f"{path}.lr.peak", "the first phase must set lr.peak", "add e.g. peak: 3e-4"))
        return None
    if peak <= 0:
        problems.append(
            Problem(
                f"{path}.lr.peak",
                "the previous phase ended at LR 0, so this phase has no LR to start from",
                "set lr.peak explicitly",
            )
        )
        return None
    if lr.schedule == "constant":
        if lr.to is not None and lr.to != peak:
            problems.append(
                Problem(
                    f"{path}.lr.to",
                    "a constant schedule has no end LR different from peak",
                    "drop `to`, or choose schedule linear, cosine or wsd",
                )
            )
            ok = False
        end = peak
    else:
        end = lr.to if lr.to is not None else 0.0
        if end > peak:
            problems.append(
                Problem(
                    f"{path}.lr.to", f"end LR {end} is above the peak {peak}", "decay schedules go down: lower `to`"
                )
            )
            ok = False
    if lr.warmup_tokens >= phase.tokens:
        problems.append(
            Problem(
                f"{path}.lr.warmupTokens",
                f"warmup of {format_count(lr.warmup_tokens)} tokens does not end "
                f"inside the phase ({format_count(phase.tokens)} tokens)",
                "shorten the warmup",
            )
        )
        ok = False
    decay_fraction = 0.0
    if lr.schedule == "wsd":
        if lr.decay_fraction is None:
            problems.append(
                Problem(
                    f"{path}.lr.decayFraction",
                    "required with schedule wsd",
                    "e.g. decayFraction: 0.1 decays over the last 10 % of the phase; 0 stays at peak",
                )
            )
            ok = False
        else:
            decay_fraction = lr.decay_fraction
            if decay_fraction == 0:
                end = peak
            decay_tokens = int(phase.tokens * decay_fraction)
            if phase.tokens - decay_tokens < lr.warmup_tokens:
                problems.append(
                    Problem(
                        f"{path}.lr.decayFraction",
                        "the decay would start before the warmup ends",
                        "lower decayFraction or warmupTokens",
                    )
                )
                ok = False
    elif lr.decay_fraction is not None:
        problems.append(
            Problem(
                f"{path}.lr.decayFraction",
                f"only applies to schedule wsd, not {lr.schedule}",
                "drop decayFraction, or use schedule: wsd",
            )
        )
        ok = False
    if not ok:
        return None
    return ResolvedLR(lr.schedule, peak, end, lr.warmup_tokens, decay_fraction, lr.decay_shape)


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
