"""Plan: schedule arithmetic at every boundary, and step counts that add up to the token budgets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stagerun.core.plan import (
    batch_tokens_at,
    checkpoint_due,
    grad_accumulation,
    lr_at,
    next_phase_needs_relaunch,
    phase_at,
    phase_first_tokens,
    segments,
    step_plan,
    tokens_at_step,
    total_steps,
)
from stagerun.core.plan_report import curve_points, plot_schedule, render_table
from stagerun.core.spec import load_run, resolve_run

REPO = Path(__file__).resolve().parent.parent

ROOT = Path(__file__).resolve().parents[1]


def manifest(phases, **spec_extra) -> dict:
    spec = {
        "model": {"preset": "tiny", "maxSeqLen": 4096},
        "tokenizer": {"train": {"vocabSize": 512}},
        "data": {
            "sources": {
                "a": {"path": "builtin:python-docs", "weight": 0.5},
                "b": {"path": "builtin:python-code", "weight": 0.5},
            }
        },
        "phases": phases,
    }
    spec.update(spec_extra)
    return {"apiVersion": "stagerun.io/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "plan"}, "spec": spec}


LLAMA_LIKE = manifest(
    [
        {
            "name": "core",
            "tokens": "10M",
            "seqLen": 1024,
            "batch": {
                "ramp": [
                    {"tokens": 0, "size": "64Ki"},
                    {"tokens": "1M", "size": "128Ki"},
                    {"tokens": "5M", "size": "256Ki"},
                ]
            },
            "lr": {"schedule": "cosine", "peak": 1e-3, "to": 1e-4, "warmupTokens": "500K"},
        },
        {"name": "long", "tokens": "2M", "seqLen": 4096},
        {
            "name": "anneal",
            "tokens": "1M",
            "lr": {"schedule": "linear", "to": 0},
            "data": {"weights": {"a": 0.2, "b": 0.8}},
        },
    ]
)


@pytest.fixture
def run():
    return resolve_run(LLAMA_LIKE)


def test_phase_boundaries_are_exact(run):
    assert phase_at(run, 0).name == "core"
    assert phase_at(run, 10**7 - 1).name == "core"
    assert phase_at(run, 10**7).name == "long"
    assert phase_at(run, 12 * 10**6 - 1).name == "long"
    assert phase_at(run, 12 * 10**6).name == "anneal"
    assert phase_at(run, 13 * 10**6 - 1).name == "anneal"
    assert phase_at(run, 13 * 10**6) is None


def test_ramp_switches_at_the_exact_token(run):
    core = run.phases[0]
    assert batch_tokens_at(core, 0) == 65536
    assert batch_tokens_at(core, 10**6 - 1) == 65536
    assert batch_tokens_at(core, 10**6) == 131072
    assert batch_tokens_at(core, 5 * 10**6 - 1) == 131072
    assert batch_tokens_at(core, 5 * 10**6) == 262144
    # Later phases inherit the size the ramp ended with, counted from their own start.
    assert batch_tokens_at(run.phases[1], 10**7) == 262144


def test_warmup_cosine_and_linear_decay_values(run):
    core, long, anneal = run.phases
    assert lr_at(core, 0) == 0.0
    assert lr_at(core, 250_000) == pytest.approx(5e-4)
    assert lr_at(core, 500_000) == pytest.approx(1e-3)
    midway = 500_000 + (10**7 - 500_000) / 2
    assert lr_at(core, midway) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(core, 10**7) == pytest.approx(1e-4)
    assert lr_at(long, 10**7) == lr_at(long, 12 * 10**6) == pytest.approx(1e-4)  # constant at the inherited LR
    assert lr_at(anneal, 12 * 10**6) == pytest.approx(1e-4)
    assert lr_at(anneal, 12.5 * 10**6) == pytest.approx(5e-5)
    assert lr_at(anneal, 13 * 10**6) == 0.0


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_wsd_decay_starts_exactly_at_its_fraction(shape):
    run = resolve_run(
        manifest(
            [
                {
                    "name": "p",
                    "tokens": "1M",
                    "seqLen": 128,
                    "batch": {"size": "16Ki"},
                    "lr": {
                        "schedule": "wsd",
                        "peak": 1e-3,
                        "to": 1e-5,
                        "warmupTokens": "100K",
                        "decayFraction": 0.2,
                        "decayShape": shape,
                    },
                }
            ]
        )
    )
    phase = run.phases[0]
    assert lr_at(phase, 100_000) == pytest.approx(1e-3)
    assert lr_at(phase, 799_999) == pytest.approx(1e-3)
    assert lr_at(phase, 800_000) == pytest.approx(1e-3)
    assert lr_at(phase, 800_001) < 1e-3
    assert lr_at(phase, 900_000) == pytest.approx((1e-3 + 1e-5) / 2)  # midpoint of both shapes
    assert lr_at(phase, 10**6) == pytest.approx(1e-5)


def test_wsd_with_zero_decay_fraction_holds_the_peak():
    run = resolve_run(
        manifest(
            [
                {
                    "name": "stable",
                    "tokens": "1M",
                    "seqLen": 128,
                    "batch": {"size": "16Ki"},
                    "lr": {"schedule": "wsd", "peak": 1e-3, "decayFraction": 0},
                },
                {"name": "decay", "tokens": "100K", "lr": {"schedule": "linear", "to": 0}},
            ]
        )
    )
    assert lr_at(run.phases[0], 10**6) == pytest.approx(1e-3)
    assert run.phases[1].lr.peak == pytest.approx(1e-3)


def test_step_lr_is_evaluated_at_the_middle_of_the_step(run):
    first = step_plan(run, 0, 0)
    assert first.lr == pytest.approx(1e-3 * (65536 / 2) / 500_000)
    assert first.lr > 0


def test_segments_match_step_by_step_iteration(run):
    tokens, step, by_step = 0, 0, []
    while (plan := step_plan(run, tokens, step)) is not None:
        by_step.append((plan.phase.name, plan.batch_tokens))
        tokens, step = plan.tokens_after, step + 1
    from_segments = [(seg.phase.name, seg.batch_tokens) for seg in segments(run) for _ in range(seg.steps)]
    assert by_step == from_segments
    assert total_steps(run) == step
    assert tokens_at_step(run, step) == tokens
    for probe in (0, 1, 7, step // 2, step - 1):
        assert step_plan(run, tokens_at_step(run, probe), probe) is not None


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_tokens_per_phase_equal_budgets_within_one_step(path):
    run = load_run(path)
    per_phase: dict[int, int] = {}
    for seg in segments(run):
        per_phase[seg.phase.index] = per_phase.get(seg.phase.index, 0) + seg.steps * seg.batch_tokens
    for phase in run.phases:
        largest = max(size for _, size in phase.ramp)
        assert abs(per_phase.get(phase.index, 0) - phase.tokens) < largest + max(
            size for p in run.phases for _, size in p.ramp
        )
    total = sum(per_phase.values())
    assert run.total_tokens <= total < run.total_tokens + max(s for p in run.phases for _, s in p.ramp)


def test_phase_overshoot_does_not_move_later_boundaries():
    # 300 tokens per step, 1000-token phases: every phase ends mid-step, the next starts where the previous stopped.
    run = resolve_run(
        manifest(
            [
                {
                    "name": "a",
                    "tokens": 1000,
                    "seqLen": 8,
                    "batch": {"size": 296},
                    "microBatchSize": 37,
                    "lr": {"peak": 1e-3},
                },
                {"name": "b", "tokens": 1000},
            ],
            resources={"processesPerNode": 1},
        )
    )
    segs = segments(run)
    assert [(s.phase.name, s.start_tokens, s.steps) for s in segs] == [("a", 0, 4), ("b", 1184, 3)]
    assert phase_at(run, 1183).name == "b" and phase_at(run, 1999).name == "b"
    # Where each phase's first step starts: what a phase that starts fresh (optimizer.reset, a dpo reference) keys on.
    assert [phase_first_tokens(run, p) for p in run.phases] == [0, 1184]
    assert run.phases[1].start_tokens == 1000


def test_a_phase_the_one_before_overshoots_entirely_has_no_first_step():
    phases = [
        # a: 4 steps of 296 run to 1,184, past b's whole budget (900 to 1,100)
        {"name": "a", "tokens": 900, "seqLen": 8, "batch": {"size": 296}, "microBatchSize": 37, "lr": {"peak": 1e-3}},
        {"name": "b", "tokens": 200, "batch": {"size": 200}, "microBatchSize": 25},
        {"name": "c", "tokens": 1000},
    ]
    run = resolve_run(manifest(phases, resources={"processesPerNode": 1}))
    assert [phase_first_tokens(run, p) for p in run.phases] == [0, None, 1184]


def test_grad_accumulation_split():
    assert grad_accumulation(64, 2, 16) == 2
    assert grad_accumulation(64, 4, 1) == 16
    with pytest.raises(ValueError, match="do not split"):
        grad_accumulation(64, 3, 1)


def test_checkpoint_due_crosses_multiples():
    assert checkpoint_due(100, 0, 100) and checkpoint_due(100, 99, 101) and checkpoint_due(100, 150, 310)
    assert not checkpoint_due(100, 0, 99) and not checkpoint_due(100, 100, 199) and not checkpoint_due(None, 0, 10**9)


def test_relaunch_only_when_the_topology_changes():
    run = resolve_run(
        manifest(
            [
                {"name": "a", "tokens": "1M", "seqLen": 128, "batch": {"size": "16Ki"}, "lr": {"peak": 1e-3}},
                {"name": "b", "tokens": "1M", "seqLen": 256},
                {"name": "c", "tokens": "1M", "parallelism": {"tensorParallel": 2}},
            ],
            resources={"processesPerNode": 2},
        )
    )
    assert not next_phase_needs_relaunch(run, run.phases[0])
    assert next_phase_needs_relaunch(run, run.phases[1])
    assert not next_phase_needs_relaunch(run, run.phases[2])


def test_plan_says_how_the_auto_switches_resolve_per_device(run):
    from dataclasses import replace

    from stagerun.core.plan_report import training_lines

    assert training_lines(run) == [
        "training on CPU: fp32, eager, no activation checkpointing, foreach AdamW, synchronous checkpoints"
    ]
    on_gpu = replace(run.phases[0], resources=replace(run.phases[0].resources, gpus_per_node=8))
    mixed = replace(run, phases=[on_gpu, *run.phases[1:]])
    assert training_lines(mixed) == [
        "training on GPU: bf16, compiled, selective activation checkpointing, fused AdamW, async checkpoints",
        "training on CPU: fp32, eager, no activation checkpointing, foreach AdamW, synchronous checkpoints",
    ]
    explicit = replace(mixed, training=replace(run.training, compile=False, activation_checkpointing="full"))
    assert "eager, full activation checkpointing" in training_lines(explicit)[0]


def test_plan_table_and_plot(run, tmp_path):
    table = render_table(run, throughput=10_000)
    lines = table.splitlines()
    assert "phase" in lines[2] and "micro x accum" in lines[2] and "ETA" in lines[2]
    assert any(line.startswith("core") for line in lines) and any(line.startswith("anneal") for line in lines)
    assert "64Ki" in table and "256Ki" in table and "4096" in table
    points = curve_points(run, samples=130)
    assert max(points["lr"]) == pytest.approx(1e-3, rel=0.05) and points["lr"][-1] == 0.0
    assert points["seq_len"][0] == 1024 and points["seq_len"][-1] == 4096
    out = tmp_path / "plan.png"
    plot_schedule(run, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_llama3_scale_arithmetic_is_instant():
    import time

    run = resolve_run(
        manifest(
            [
                {
                    "name": "core",
                    "tokens": "15T",
                    "seqLen": 4096,
                    "batch": {
                        "ramp": [
                            {"tokens": 0, "size": "4Mi"},
                            {"tokens": "252M", "size": "8Mi"},
                            {"tokens": "2.87T", "size": "16Mi"},
                        ]
                    },
                    "lr": {"schedule": "cosine", "peak": 8e-5, "to": 8e-7, "warmupTokens": "8B"},
                }
            ],
            resources={"nodes": 128, "gpusPerNode": 8},
            parallelism={"tensorParallel": 8},
            model={"preset": "llama3-8b"},
        )
    )
    started = time.perf_counter()
    steps = total_steps(run)
    assert time.perf_counter() - started < 0.5
    first = -(-252_000_000 // 2**22)  # 61 steps of 4Mi, overshooting 252M by < one batch
    t1 = first * 2**22
    second = -(-(2_870_000_000_000 - t1) // 2**23)
    t2 = t1 + second * 2**23
    third = -(-(15 * 10**12 - t2) // 2**24)
    assert first == 61 and steps == first + second + third


def test_plan_table_names_each_phases_schedule(run):
    rows = render_table(run).splitlines()[4:]
    assert "cosine 0 -> " in rows[0]  # core starts at the bottom of its warmup
    assert [row.split()[0] for row in rows if row.split()[0] in ("long", "anneal")] == ["long", "anneal"]
    by_name = {row.split()[0]: row for row in rows if row.split()[0] in ("long", "anneal")}
    assert "constant 0.0001 -> 0.0001" in by_name["long"]  # lr unset: holds where core ended
    assert "linear 8.1e-05 -> 0 " in by_name["anneal"]  # its first step starts past the boundary (long overshoots)


def test_plan_into_a_pipe_closed_early_prints_no_traceback():
    # `stagerun plan FILE | head -1` when the reader has left: Python used to print a BrokenPipeError traceback
    # (twice: once more flushing stdout at exit). The read end closes before the child can have written anything
    # (it writes only after importing and reading the manifest), so its first write fails.
    command = [sys.executable, "-c", "from stagerun.trainer.cli import main; raise SystemExit(main())"]
    process = subprocess.Popen(
        [*command, "plan", str(REPO / "examples" / "llama3-8b.yaml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141 and b"Traceback" not in stderr, stderr.decode()


def test_plan_says_what_each_post_training_phase_trains_on():
    from conftest import tiny_run

    from stagerun.core.plan_report import post_training_lines, training_lines

    sources = {
        "docs": {"path": "builtin:python-docs", "weight": 1.0},
        "chat": {"path": "builtin:chat-arithmetic", "weight": 0.0},
        "prefs": {"path": "builtin:preference-arithmetic", "weight": 0.0},
    }
    manifest = tiny_run(
        tokenizer={"train": {"vocabSize": 512, "maxBytes": "1M"}, "chatTemplate": {"format": "chatml"}},
        data={"sources": sources},
        phases=[
            {"name": "pre", "tokens": "8Ki", "seqLen": 64, "batch": {"size": "1Ki"}, "lr": {"peak": 1e-3}},
            {"name": "sft", "tokens": "4Ki", "kind": "sft", "data": {"weights": {"chat": 0.6, "docs": 0.4}}},
            {"name": "dpo", "tokens": "4Ki", "kind": "dpo", "data": {"weights": {"prefs": 1.0}}},
            {
                "name": "dpo-2",
                "tokens": "4Ki",
                "dpo": {"beta": 0.05, "nllWeight": 0.2, "reference": {"checkpoint": "/runs/sft"}},
                "optimizer": {"reset": True},
            },
        ],
    )
    lines = post_training_lines(resolve_run(manifest))
    assert lines == [
        "sft phase sft: loss on the responses of chat 60%, replay of docs 40% (shares of loss tokens); "
        "conversations packed and masked from each other; optimizer carried over",
        "dpo phase dpo: beta 0.1 on pairs of prefs; reference = the weights the phase starts with, frozen; "
        "optimizer carried over",
        "dpo phase dpo-2: beta 0.05, NLL weight 0.2 on pairs of prefs; reference /runs/sft; fresh optimizer",
    ]
    assert training_lines(resolve_run(manifest))[-3:] == lines
    assert post_training_lines(resolve_run(tiny_run())) == []  # a pretraining run: nothing to say
