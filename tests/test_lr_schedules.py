"""LR schedules beyond one phase: invSqrt (StableLM 2's hybrid), WSD's exponential decay (MiniCPM), schedules that
continue across phases (Llama 3), cosine over a horizon longer than the phase; their checks; the plan's report."""

from __future__ import annotations

import math

import pytest

from stagerun.core.plan import lr_at, segments, step_plan
from stagerun.core.plan_report import curve_points, plot_schedule, render_table
from stagerun.core.spec import SpecError, resolve_run
from stagerun.core.spec.changes import immutable_changes

M = 10**6


def manifest(*phases: dict) -> dict:
    return {
        "apiVersion": "stagerun.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "lr"},
        "spec": {
            "model": {"preset": "tiny"},
            "tokenizer": {"train": {"vocabSize": 512}},
            "data": {
                "sources": {
                    "a": {"path": "builtin:python-docs", "weight": 0.5},
                    "b": {"path": "builtin:python-code", "weight": 0.5},
                }
            },
            "phases": list(phases),
            "resources": {"processesPerNode": 1},
        },
    }


def first(tokens="4M", **lr) -> dict:
    return {"name": "one", "tokens": tokens, "seqLen": 128, "batch": {"size": "16Ki"}, "lr": lr}


def problems(doc: dict) -> list[str]:
    with pytest.raises(SpecError) as caught:
        resolve_run(doc)
    return [str(p) for p in caught.value.problems]


def slope_left(phase, tokens: float, h: float = 1.0) -> float:
    return (lr_at(phase, tokens) - lr_at(phase, tokens - h)) / h


def slope_right(phase, tokens: float, h: float = 1.0) -> float:
    return (lr_at(phase, tokens + h) - lr_at(phase, tokens)) / h


# StableLM 2's hybrid_cosine_inv_sqrt_2 at 1/100,000 scale: warmup, a cosine cut part-way down (its horizon is
# the whole decay), inverse square root from there, then a linear cooldown to 0.
HYBRID = manifest(
    first("3M", schedule="cosine", peak=1e-3, to=1e-4, warmupTokens="100K", horizonTokens="5.4M"),
    {"name": "inv-sqrt", "tokens": "1.2M", "lr": {"schedule": "invSqrt"}},
    {"name": "cooldown", "tokens": "600K", "lr": {"schedule": "linear", "to": 0}},
)


def test_inv_sqrt_continues_the_cosine_in_value_and_slope():
    run = resolve_run(HYBRID)
    cosine, inv, cooldown = run.phases
    junction = cosine.end_tokens
    assert lr_at(inv, junction) == pytest.approx(lr_at(cosine, junction), rel=1e-12)
    # The cosine is still falling where the phase ends (its horizon is longer), and the inverse square root leaves
    # with that same slope: finite differences on either side agree with the analytic slope.
    analytic = cosine.lr.slope(junction - cosine.lr.origin_tokens)
    assert analytic < 0
    assert slope_left(cosine, junction) == pytest.approx(analytic, rel=1e-4)
    assert slope_right(inv, junction) == pytest.approx(analytic, rel=1e-4)
    # And it is alpha / sqrt(t + beta): lr^-2 is linear in tokens.
    xs = [junction + k * 200_000 for k in range(6)]
    inv_sq = [lr_at(inv, x) ** -2 for x in xs]
    steps = [b - a for a, b in zip(inv_sq, inv_sq[1:])]
    assert all(step == pytest.approx(steps[0], rel=1e-9) for step in steps)
    alpha, beta = inv.lr.inv_sqrt
    assert lr_at(inv, inv.end_tokens) == pytest.approx(alpha / math.sqrt(inv.tokens + beta), rel=1e-12)
    # The cooldown starts where the inverse square root ended and reaches 0.
    assert cooldown.lr.peak == inv.lr.end and lr_at(cooldown, cooldown.end_tokens) == 0.0
    curve = [lr_at(phase, t) for phase in run.phases for t in range(phase.start_tokens, phase.end_tokens, 10_000)]
    after_warmup = curve[10:]
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:]))  # falls all the way
    before, across = (
        lr_at(cosine, junction - 10_000) - lr_at(cosine, junction),
        lr_at(cosine, junction) - lr_at(inv, junction + 10_000),
    )
    assert across == pytest.approx(before, rel=0.01)  # no kink: the step across the junction is like its neighbour


def test_inv_sqrt_needs_a_falling_lr_to_continue():
    full_cosine = manifest(
        first(schedule="cosine", peak=1e-3, to=1e-4),  # ends at the bottom of its cosine: slope 0
        {"name": "two", "tokens": "1M", "lr": {"schedule": "invSqrt"}},
    )
    (message,) = problems(full_cosine)
    assert message.startswith("spec.phases[1].lr.schedule: invSqrt continues a falling LR, but phase one ends flat")
    assert "horizonTokens" in message
    flat = manifest(first(peak=1e-3), {"name": "two", "tokens": "1M", "lr": {"schedule": "invSqrt"}})
    assert "ends flat" in problems(flat)[0]
    alone = manifest(first(schedule="invSqrt"))
    assert problems(alone)[0].startswith("spec.phases[0].lr.schedule: the first phase has no previous schedule")
    with_peak = manifest(
        HYBRID["spec"]["phases"][0], {"name": "two", "tokens": "1M", "lr": {"schedule": "invSqrt", "peak": 1e-3}}
    )
    (message,) = problems(with_peak)
    assert message.startswith("spec.phases[1].lr: schedule invSqrt takes its value and slope") and "peak" in message


def test_wsd_exponential_decay_halves_every_half_life():
    run = resolve_run(
        manifest(
            first(
                "10M",
                schedule="wsd",
                peak=1e-3,
                to=1e-5,
                warmupTokens="1M",
                decayFraction=0.4,
                decayShape="exponential",
                halfLifeTokens="1M",
            )
        )
    )
    (phase,) = run.phases
    assert lr_at(phase, 5 * M) == 1e-3 and lr_at(phase, 6 * M) == 1e-3  # stable until the last 40 %
    for k in range(5):  # lr = to + (peak - to) x 0.5^(tokens into the decay / halfLife)
        assert lr_at(phase, 6 * M + k * M) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5**k, rel=1e-12)
    assert lr_at(phase, 7.5 * M) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5**1.5, rel=1e-12)
    # It ends where the curve is, not at `to`: four half-lives in, and the next phase starts from there.
    assert phase.lr.end == pytest.approx(1e-5 + (1e-3 - 1e-5) / 16, rel=1e-12)
    assert phase.lr.slope(8 * M) == pytest.approx(-(1e-3 - 1e-5) * math.log(2) / M / 4, rel=1e-12)


def test_exponential_decay_checks_name_the_field():
    missing = problems(manifest(first(schedule="wsd", peak=1e-3, decayFraction=0.2, decayShape="exponential")))
    assert missing[0].startswith("spec.phases[0].lr.halfLifeTokens: required with decayShape exponential")
    wrong_schedule = problems(manifest(first(schedule="cosine", peak=1e-3, halfLifeTokens="1M")))
    assert wrong_schedule[0].startswith("spec.phases[0].lr.halfLifeTokens: only applies to schedule wsd")
    shape = problems(manifest(first(schedule="cosine", peak=1e-3, decayShape="exponential")))
    assert shape[0].startswith("spec.phases[0].lr.decayShape: only applies to schedule wsd, not cosine")


def continued(*later: dict) -> dict:
    return manifest(
        first("6M", schedule="cosine", peak=1e-3, to=1e-5, warmupTokens="500K"),
        {"name": "two", "tokens": "3M", "data": {"weights": {"a": 0.2, "b": 0.8}}, "lr": {"schedule": "continue"}},
        {"name": "three", "tokens": "1M", "lr": {"schedule": "continue"}},
        *later,
    )


def test_continue_across_phases_equals_one_long_schedule():
    split = resolve_run(continued({"name": "after", "tokens": "1M"}))
    whole = resolve_run(
        manifest(
            first("10M", schedule="cosine", peak=1e-3, to=1e-5, warmupTokens="500K"), {"name": "after", "tokens": "1M"}
        )
    )
    for t in range(0, 10 * M + 1, 50_000):  # the same curve, exactly, on every phase's part of it
        phase = next(p for p in split.phases if t < p.end_tokens or p.index == 2)
        assert lr_at(phase, t) == lr_at(whole.phases[0], t), t
    tokens, step = 0, 0
    while (plan := step_plan(split, tokens, step)) is not None:  # every step's LR, as the trainer takes them
        assert plan.lr == step_plan(whole, tokens, step).lr
        tokens, step = plan.tokens_after, step + 1
    one, two, three, after = split.phases
    assert [p.lr.continued for p in split.phases] == [False, True, True, False]
    assert lr_at(one, one.end_tokens) > 1e-4  # phase one ends mid-cosine, not at `to`
    assert two.weights == {"a": 0.2, "b": 0.8}  # only the data changed
    assert three.lr.end == 1e-5 and after.lr.peak == 1e-5  # the union ends at `to`; an lr-less phase holds it


def test_continue_of_wsd_places_the_decay_at_the_end_of_the_union():
    run = resolve_run(
        manifest(
            first("8M", schedule="wsd", peak=1e-3, to=0, decayFraction=0.1),
            {"name": "two", "tokens": "2M", "lr": {"schedule": "continue"}},
        )
    )
    one, two = run.phases
    assert lr_at(one, one.end_tokens) == 1e-3 and lr_at(two, 9 * M) == 1e-3  # decay: the last 1M of 10M
    assert lr_at(two, 9.5 * M) == pytest.approx(5e-4) and lr_at(two, 10 * M) == 0.0


def test_continue_checks_name_the_field():
    alone = problems(manifest(first(schedule="continue")))
    assert alone[0].startswith("spec.phases[0].lr.schedule: the first phase has no previous schedule to continue")
    with_values = continued()
    with_values["spec"]["phases"][1]["lr"].update(peak=1e-3, warmupTokens="1K")
    (message,) = problems(with_values)
    assert message.startswith("spec.phases[1].lr: schedule continue takes every value from the schedule it continues")
    assert "peak, warmupTokens cannot be set" in message


def test_adding_a_continuing_phase_changes_the_running_phase_so_a_live_run_refuses_it():
    accepted = resolve_run(continued({"name": "after", "tokens": "1M"}))
    edited = continued({"name": "after", "tokens": "1M", "lr": {"schedule": "continue"}})
    # The cosine's span grows by phase "after": the LR of the phase now running would change under it.
    assert immutable_changes(accepted, resolve_run(edited), current_phase=0) == ["spec.phases[0] (one)"]


def test_cosine_over_a_longer_horizon_ends_part_way():
    run = resolve_run(
        manifest(
            first("4M", schedule="cosine", peak=1e-3, to=1e-4, horizonTokens="8M"),
            {"name": "two", "tokens": "1M"},
        )
    )
    one, two = run.phases
    assert lr_at(one, 2 * M) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert one.lr.end == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)  # half-way along the horizon: the midpoint
    assert two.lr.schedule == "constant" and two.lr.peak == one.lr.end  # lr unset: holds where phase one ended


def test_horizon_checks_name_the_field():
    short = problems(manifest(first("4M", schedule="cosine", peak=1e-3, horizonTokens="3M")))
    assert short[0].startswith("spec.phases[0].lr.horizonTokens: 3M tokens is shorter than the schedule runs")
    union = continued()
    union["spec"]["phases"][0]["lr"]["horizonTokens"] = "8M"
    (message,) = problems(union)
    assert "and the phases that continue it (10M in all)" in message and "at least 10M" in message
    constant = problems(manifest(first(peak=1e-3, horizonTokens="8M")))
    assert constant[0].startswith("spec.phases[0].lr.horizonTokens: a constant schedule has no shape")


def test_plan_names_each_phases_schedule_and_plots_the_hybrid(tmp_path):
    run = resolve_run(HYBRID)
    table = render_table(run)
    assert "cosine 0.000156 -> " not in table  # the start is the warmup's
    rows = {line.split()[0]: line for line in table.splitlines()[4:]}
    assert "cosine 0 -> " in rows["one"] and "invSqrt " in rows["inv-sqrt"] and "linear " in rows["cooldown"]
    assert "(continued)" in render_table(resolve_run(continued()))
    points = curve_points(run, samples=480)
    assert max(points["lr"]) == pytest.approx(1e-3, rel=0.01) and points["lr"][-1] == 0.0
    out = tmp_path / "hybrid.png"
    plot_schedule(run, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s.phase.name for s in segments(run)] == ["one", "inv-sqrt", "cooldown"]
