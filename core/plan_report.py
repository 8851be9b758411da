"""`stagerun plan`: the schedule as a table, and as a plot of LR, batch size and context length against tokens."""

from __future__ import annotations

from .layout import BatchSplitError, split_batch
from .plan import Segment, lr_at, segments, total_steps
from .spec import format_count, quantities
from .spec.resolve import ResolvedPhase, ResolvedRun
from .spec.validate import phase_layout, source_content

COLUMNS = ("phase", "budget", "steps", "batch tok", "batch seq", "micro x accum", "seqLen", "LR: start -> end", "world")


def schedule_rows(run: ResolvedRun, throughput: float | None = None) -> list[tuple[str, ...]]:
    """One row per (phase, batch size) segment; a phase with a ramp gets a row per ramp step."""
    rows = []
    previous_phase = None
    for seg in segments(run):
        phase = seg.phase
        first_of_phase, previous_phase = phase is not previous_phase, phase
        layout = phase_layout(phase)
        dp = layout.dp if layout is not None else 1
        seqs = seg.batch_tokens // phase.seq_len
        try:
            split = f"{phase.micro_batch_size} x {split_batch(seqs, dp, phase.micro_batch_size).grad_accum}"
        except BatchSplitError:
            split = "does not split"
        lr_text = f"{_schedule_name(phase)} {lr_at(phase, seg.start_tokens):.3g} -> {lr_at(phase, seg.end_tokens):.3g}"
        row: tuple[str, ...] = (
            phase.name if first_of_phase else "",
            format_count(phase.tokens) if first_of_phase else "",
            f"{seg.steps:,}",
            format_count(seg.batch_tokens),
            f"{seqs:,}",
            split,
            str(phase.seq_len),
            lr_text,
            f"{phase.world_size} (dp {dp})",
        )
        if throughput:
            row += (format_duration(seg.steps * seg.batch_tokens / throughput),)
        rows.append(row)
    return rows


def _schedule_name(phase: ResolvedPhase) -> str:
    lr = phase.lr
    name = f"{lr.schedule}-{lr.decay_shape}" if lr.schedule == "wsd" and lr.decay_shape != "linear" else lr.schedule
    return f"{name} (continued)" if lr.continued else name


def format_duration(seconds: float) -> str:
    return quantities.format_duration(seconds, style="approx")  # ETAs: one rounded unit


def render_table(run: ResolvedRun, throughput: float | None = None) -> str:
    header = COLUMNS + (("ETA",) if throughput else ())
    rows = [header] + schedule_rows(run, throughput)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    steps = total_steps(run)
    model = run.model
    phases = f"{len(run.phases)} phase{'' if len(run.phases) == 1 else 's'}"
    summary = (
        f"{run.name}: {phases}, {format_count(run.total_tokens)} tokens, {steps:,} steps; "
        f"model {model.parameter_count() / 1e6:,.1f}M parameters, {model.layers} layers, d={model.dim}"
    )
    if throughput:
        summary += f"; ETA {format_duration(run.total_tokens / throughput)} at {throughput:,.0f} tokens/s"
    return summary + "\n\n" + "\n".join(lines)


_checkpointing_words = {
    "none": "no activation checkpointing",
    "selective": "selective activation checkpointing",
    "full": "full activation checkpointing",
}


def training_lines(run: ResolvedRun) -> list[str]:
    """How the steps run, once the ``auto`` switches are decided by each phase's device (GPU or CPU)."""
    lines = []
    for gpu in sorted({phase.resources.gpus_per_node > 0 for phase in run.phases}, reverse=True):
        training = run.training
        parts = [
            "bf16" if training.uses_bf16(gpu) else "fp32",
            "compiled" if training.uses_compile(gpu) else "eager",
            _checkpointing_words[training.checkpointing_mode(gpu)],
            _optimizer_words(training, gpu),
            ("async" if run.checkpoint.uses_async_save(gpu) else "synchronous") + " checkpoints",
        ]
        if training.float8:
            parts.insert(1, "float8 matmuls")
        lines.append(f"training on {'GPU' if gpu else 'CPU'}: " + ", ".join(parts))
    changes = optimizer_lines(run)
    lines += changes if len(changes) > 1 else []  # only when a phase changes them: then every change
    ropes = rope_lines(run)
    lines += ropes if len(ropes) > 1 else []
    return lines + post_training_lines(run)


def post_training_lines(run: ResolvedRun) -> list[str]:
    """What each sft and dpo phase trains on and against (spec.phases[].kind, .dpo, optimizer.reset); none for a
    run that only pretrains."""
    content = {name: source_content(source) for name, source in run.sources.items()}
    lines = []
    for phase in run.phases:
        if phase.kind == "pretrain":
            continue
        used = {name: w for name, w in phase.weights.items() if w > 0}
        fresh = "fresh optimizer" if phase.reset_optimizer else "optimizer carried over"
        if phase.kind == "sft":
            # text sources in an sft phase are replay: their share counts loss tokens, as the chat sources' do
            chats = [f"{n} {w:.0%}" for n, w in used.items() if content.get(n) == "chat"]
            replay = [f"{n} {w:.0%}" for n, w in used.items() if content.get(n) != "chat"]
            what = f"loss on the responses of {', '.join(chats) or '(shard sets: chat if their manifest says so)'}"
            if replay:
                what += f", replay of {', '.join(replay)} (shares of loss tokens)"
            lines.append(f"sft phase {phase.name}: {what}; conversations packed and masked from each other; {fresh}")
            continue
        dpo = phase.dpo
        assert dpo is not None  # resolve_run sets it on every dpo phase
        reference = (
            f"reference {dpo.reference.checkpoint}"
            if dpo.reference is not None
            else "reference = the weights the phase starts with, frozen"
        )
        nll = f", NLL weight {dpo.nll_weight:g}" if dpo.nll_weight > 0 else ""
        lines.append(
            f"dpo phase {phase.name}: beta {dpo.beta:g}{nll} on pairs of {', '.join(used)}; {reference}; {fresh}"
        )
    return lines


def rope_lines(run: ResolvedRun) -> list[str]:
    """The RoPE each phase starts with, where it differs from the phase before (spec.phases[].rope)."""
    lines, before = [], None
    for phase in run.phases:
        if phase.rope is not None and phase.rope != before:
            lines.append(f"RoPE from {phase.name}: {phase.rope.describe()}")
            before = phase.rope
    return lines


def _optimizer_words(training, gpu: bool) -> str:
    if training.optimizer.type == "rmspropMomentum":
        return "foreach RMSProp with momentum and decoupled weight decay"
    return ("fused" if training.uses_fused_adamw(gpu) else "foreach") + " AdamW"


def optimizer_lines(run: ResolvedRun) -> list[str]:
    """The optimizer settings each phase starts with, where they differ from the phase before (the first always)."""
    lines, before = [], None
    for phase in run.phases:
        opt = phase.optimizer
        if opt == before:
            continue
        betas = (
            f"betas ({opt.beta1:g}, {opt.beta2:g})"
            if opt.type == "adamw"
            else (f"alpha {opt.beta2:g}, momentum {opt.momentum:g}")
        )
        clip = f"clip {opt.grad_clip:g}" if opt.grad_clip > 0 else "no clipping"
        lines.append(
            f"optimizer from {phase.name}: weight decay {opt.weight_decay:g}, {betas}, eps {opt.eps:g}, {clip}"
        )
        before = opt
    return lines


MEMORY_COLUMNS = ("phase", "parameters", "gradients", "optimizer", "activations", "loss", "peak per rank")


def memory_table(run: ResolvedRun) -> str:
    """Estimated memory per rank of each phase (core/memory_estimate.py), with the share of resources.gpuMemory."""
    from .memory_estimate import gpu_memory_of, memory_rows

    known = {phase.name: gpu_memory_of(phase) for phase in run.phases}
    header = MEMORY_COLUMNS + (("of gpuMemory",) if any(known.values()) else ())
    rows = [header] + memory_rows(run, known if any(known.values()) else None)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = "estimated memory per rank at the peak of a step (the parts do not all peak at once: docs/manifest.md)"
    return title + ":\n" + "\n".join(lines)


def curve_points(run: ResolvedRun, samples: int = 2000) -> dict[str, list[float]]:
    """LR, batch tokens and seq len sampled along the token axis (used by the plot and its test)."""
    total = run.total_tokens
    tokens: list[float] = []
    lrs: list[float] = []
    batches: list[float] = []
    seq_lens: list[float] = []
    segs: list[Segment] = segments(run)
    for i in range(samples + 1):
        t = total * i / samples
        seg = next((s for s in segs if t < s.end_tokens), segs[-1])
        tokens.append(t)
        lrs.append(lr_at(seg.phase, t))
        batches.append(seg.batch_tokens)
        seq_lens.append(seg.phase.seq_len)
    return {"tokens": tokens, "lr": lrs, "batch_tokens": batches, "seq_len": seq_lens}


def plot_schedule(run: ResolvedRun, out_path: str) -> None:
    """Three stacked panels against tokens, with phase boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve_points(run)
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(10, 7))
    panels = [("lr", "learning rate"), ("batch_tokens", "global batch (tokens)"), ("seq_len", "context length")]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(points["tokens"], points[key], drawstyle="steps-post" if key != "lr" else "default")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for phase in run.phases:
            ax.axvline(phase.start_tokens, color="grey", linestyle=":", linewidth=1)
    for phase in run.phases:
        axes[0].annotate(
            phase.name,
            (phase.start_tokens, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="dimgrey",
        )
    axes[-1].set_xlabel("tokens")
    fig.suptitle(f"{run.name}: schedule ({format_count(run.total_tokens)} tokens)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
