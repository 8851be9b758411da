"""`stagerun plan`: the schedule as a table, and as a plot of LR, batch size and context length against tokens."""

from __future__ import annotations

from .plan import Segment, grad_accumulation, lr_at, segments, total_steps
from .spec import data_parallel_degree, format_count
from .spec.resolve import ResolvedRun

COLUMNS = ("phase", "budget", "steps", "batch tok", "batch seq", "micro x accum", "seqLen", "LR start -> end", "world")


def schedule_rows(run: ResolvedRun, throughput: float | None = None) -> list[tuple[str, ...]]:
    """One row per (phase, batch size) segment; a phase with a ramp gets a row per ramp step."""
    rows = []
    previous_phase = None
    for seg in segments(run):
        phase = seg.phase
        first_of_phase, previous_phase = phase is not previous_phase, phase
        dp = data_parallel_degree(phase) or 1
        seqs = seg.batch_tokens // phase.seq_len
        try:
            split = f"{phase.micro_batch_size} x {grad_accumulation(seqs, dp, phase.micro_batch_size)}"
        except ValueError:
            split = "does not split"
        lr_text = f"{lr_at(phase, seg.start_tokens):.3g} -> {lr_at(phase, seg.end_tokens):.3g}"
        row = (
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


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def render_table(run: ResolvedRun, throughput: float | None = None) -> str:
    header = COLUMNS + (("ETA",) if throughput else ())
    rows = [header] + schedule_rows(run, throughput)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    steps = total_steps(run)
    model = run.model
    summary = (
        f"{run.name}: {len(run.phases)} phases, {format_count(run.total_tokens)} tokens, {steps:,} steps; "
        f"model {model.parameter_count() / 1e6:,.1f}M parameters, {model.layers} layers, d={model.dim}"
    )
    if throughput:
        summary += f"; ETA {format_duration(run.total_tokens / throughput)} at {throughput:,.0f} tokens/s"
    return summary + "\n\n" + "\n".join(lines)


def curve_points(run: ResolvedRun, samples: int = 2000) -> dict[str, list[float]]:
    """LR, batch tokens and seq len sampled along the token axis (used by the plot and its test)."""
    total = run.total_tokens
    tokens, lrs, batches, seq_lens = [], [], [], []
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
