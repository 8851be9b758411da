"""The seed recipes (examples/<report>.yaml: five pre-training runs and two post-training runs that start from two of
them): at full size they validate and plan the published schedules; scaled to tiny (tests/recipes.py) each trains end
to end through all its phases on 2 CPU processes.

The published numbers asserted here, with their sources, are in each manifest's header and in docs/recipes.md.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_tiny, stagerun, write_manifest
from recipes import builtin_corpus, scale_to_tiny, tiny_source, tiny_teacher_manifest

from stagerun.core.chat_template import chat_format
from stagerun.core.memory_estimate import memory_warnings
from stagerun.core.plan import (
    grad_accumulation,
    lr_at,
    next_phase_needs_relaunch,
    segments,
    tokens_at_step,
    total_steps,
)
from stagerun.core.plan_report import render_table
from stagerun.core.spec import load_run, read_manifest, resolve_run
from stagerun.core.spec.presets import resolve_model
from stagerun.trainer.telemetry import read_metrics, read_status

Ki, Mi = 2**10, 2**20
B, T = 10**9, 10**12
RECIPES = [
    "stablelm2-1.6b",
    "index-1.9b",
    "llama3-8b",
    "afm-3b",
    "baichuan2-7b",
    "index-1.9b-chat",  # post-training (sft, dpo) from index-1.9b's checkpoint
    "stablelm2-zephyr",  # post-training (sft, dpo) from stablelm2-1.6b's checkpoint
]


def recipe_path(recipe: str) -> Path:
    return ROOT / "examples" / f"{recipe}.yaml"


def recipe(recipe: str) -> dict:
    return read_manifest(recipe_path(recipe))


def phases(run) -> dict:
    return {phase.name: phase for phase in run.phases}


def steps_until(run, tokens: int) -> int:
    """Optimizer steps that start before ``tokens`` (e.g. the steps of a warmup)."""
    step = 0
    while tokens_at_step(run, step) < tokens:
        step += 1
    return step


# --- full size: what `stagerun validate` and `stagerun plan` say ---------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_plans_with_the_cli(name, tmp_path):
    path = recipe_path(name)
    run = load_run(path)
    validated = stagerun("validate", str(path))
    assert validated.returncode == 0, validated.stdout
    count = f"{len(run.phases)} phase{'s' if len(run.phases) != 1 else ''}"
    assert f"valid TrainingRun {run.name!r} ({count}:" in validated.stdout
    plan = stagerun("plan", str(path), "--throughput", "1000000")
    assert plan.returncode == 0, plan.stdout
    assert "does not split" not in plan.stdout
    for phase in run.phases:
        assert phase.name in plan.stdout
    table = render_table(run, 1e6)  # what `stagerun plan` prints: the totals, then one row per phase and ramp step
    count = len(run.phases)
    assert table.splitlines()[0].startswith(f"{run.name}: {count} phase{'' if count == 1 else 's'}, ")
    assert f"{total_steps(run):,} steps" in table and table in plan.stdout
    assert len(table.splitlines()) == 4 + len(segments(run))
    # Every recipe trains on GPUs: the auto switches resolve to the fast path, and the plan says so (AFM's RMSProp
    # has no fused kernel in torch).
    optimizer = "foreach RMSProp with momentum and decoupled weight decay" if name == "afm-3b" else "fused AdamW"
    assert f"training on GPU: bf16, compiled, selective activation checkpointing, {optimizer}" in plan.stdout
    text = (ROOT / "examples" / f"{name}.yaml").read_text()
    assert text.startswith("# ") and "From the report" in text and "Assumed" in text  # the header cites both
    assert run.manifest.spec.image and run.manifest.spec.checkpoint.path.startswith("s3://")
    assert run.manifest.spec.resources.gpus_per_node == 8 and run.manifest.spec.checkpoint.every_tokens


def test_llama3_8b_reproduces_section_3_4():
    run = load_run(recipe_path("llama3-8b"))
    table = render_table(run)
    core, anneal = run.phases[0], run.phases[-1]
    assert [p.name for p in run.phases] == [
        "core",
        "long-16k",
        "long-32k",
        "long-48k",
        "long-64k",
        "long-96k",
        "long-128k",
        "anneal",
    ]
    # Batch 4M -> 8M -> 16M tokens after 252M and 2.87T tokens (§3.4.1); 8K context in core.
    assert core.ramp == ((0, 4 * Mi), (252 * 10**6, 8 * Mi), (2_870 * B, 16 * Mi)) and core.seq_len == 8192
    assert [s.batch_tokens for s in segments(run) if s.phase is core] == [4 * Mi, 8 * Mi, 16 * Mi]
    # Peak 3e-4 (Table 3, 8B), 8,000 warmup steps, cosine to 1/100 of the peak over 1,200,000 steps (§3.4.1):
    # the steps of the ramp's first two segments, then 16Mi steps up to 1.2M.
    assert (core.lr.schedule, core.lr.peak, core.lr.to) == ("cosine", 3e-4, 3e-6)
    assert abs(steps_until(run, core.lr.warmup_tokens) - 8000) <= 1
    first, second, third = (s for s in segments(run) if s.phase is core)
    horizon_steps = first.steps + second.steps + (core.lr.span_tokens - second.end_tokens) / (16 * Mi)
    assert horizon_steps == 1_200_000 and core.lr.value(core.lr.span_tokens) == pytest.approx(3e-6)
    assert total_steps(run) < 1_200_000  # the run ends before the cosine does: it is still above 3e-6
    # Six long-context stages from 8K to 128K, ~800B tokens (§3.4.2), with tensor parallelism (no CP yet); the
    # cosine keeps running through them (continue), unbroken at each stage boundary.
    stages = run.phases[1:-1]
    assert all(p.lr.continued and p.lr.origin_tokens == 0 for p in stages)
    ends = [lr_at(p, p.end_tokens) for p in (core, *stages)]
    assert all(a > b for a, b in zip(ends, ends[1:])) and ends[-1] > 3e-6
    for before, after in zip((core, *stages), stages):
        assert lr_at(after, after.start_tokens) == pytest.approx(lr_at(before, before.end_tokens))
    assert [p.seq_len for p in stages] == [16384, 32768, 49152, 65536, 98304, 131072]
    assert sum(p.tokens for p in stages) == 800 * B
    # Context parallelism (§3.3.2) grows with seqLen; no TP for 8B (the CP degrees are assumed, see the header).
    assert [p.parallelism.context_parallel for p in stages] == [2, 4, 8, 8, 16, 16]
    assert all(p.parallelism.tensor_parallel == 1 for p in run.phases)
    assert [next_phase_needs_relaunch(run, p) for p in run.phases] == [
        True,
        True,
        True,
        False,
        True,
        False,
        False,
        False,
    ]
    # Each rank holds 6-8K tokens of a sequence, as in the 8K core, and the estimate fits an 80 GB GPU.
    assert {p.seq_len // p.parallelism.context_parallel for p in stages} == {6144, 8192}
    assert run.manifest.spec.resources.gpu_memory == "80Gi" and memory_warnings(run) == []
    # Anneal: the final 40M tokens at 128K, LR linearly to 0, a different (upsampled) mix (§3.4.3).
    assert anneal.tokens == 40 * 10**6 and anneal.seq_len == 131072 and anneal.lr.schedule == "linear"
    assert anneal.lr.peak == pytest.approx(stages[-1].lr.end) and lr_at(anneal, anneal.end_tokens) == 0.0
    assert anneal.weights != core.weights
    assert core.weights == {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}  # §3.1.2
    # §1: 15.6T tokens at 8K *followed by* the ~800B long-context stages and the 40M-token anneal.
    assert core.tokens == 15_600 * B and core.seq_len == 8192
    assert run.total_tokens == 15_600 * B + 800 * B + 40 * 10**6 and run.training.doc_masking
    assert "8 phases, ~16.4T tokens" in table and "16Mi" in table and "131072" in table


def test_stablelm2_reproduces_the_published_schedule():
    run = load_run(recipe_path("stablelm2-1.6b"))
    model = run.model
    assert (model.padded_vocab, model.rotary_fraction, model.norm, model.qkv_bias, model.max_seq_len) == (
        100352,
        0.25,
        "layernorm",
        True,
        4096,
    )
    cosine, inv_sqrt, cooldown = run.phases
    assert model.position_ids == "perDocument"  # config reset_position_ids
    # 512 A100s (card) x micro-batch 2 x accumulation 2 (config) x 4096 = 8Mi tokens per step; 64 nodes x 8.
    assert all(p.world_size == 512 for p in run.phases) and run.manifest.spec.resources.nodes == 64
    assert {s.batch_tokens for s in segments(run)} == {8 * Mi} and cosine.micro_batch_size == 2
    assert grad_accumulation(8 * Mi // 4096, 512, cosine.micro_batch_size) == 2
    # "2T tokens for two epochs" = 4T seen; 420,000 steps before the cooldown = 3.52T.
    assert run.total_tokens == 4 * T and all(p.seq_len == 4096 for p in run.phases)
    assert [s.steps for s in segments(run)][:2] == [352_000, 68_000] and inv_sqrt.end_tokens == 420_000 * 8 * Mi
    # hybrid_cosine_inv_sqrt_2: warmup 0.018 x 540,000 steps; a cosine 1e-3 -> min_lr 1e-4 laid over all 540,000
    # steps and cut at the (derived) switch; then a/sqrt(t + b), continuous in value and slope.
    assert (cosine.lr.peak, cosine.lr.to, cosine.lr.warmup_tokens // (8 * Mi)) == (1e-3, 1e-4, 9720)
    assert cosine.lr.span_tokens == 540_000 * 8 * Mi and cosine.lr.value(cosine.lr.span_tokens) == 1e-4
    assert inv_sqrt.lr.schedule == "invSqrt"
    assert lr_at(inv_sqrt, inv_sqrt.start_tokens) == pytest.approx(lr_at(cosine, cosine.end_tokens))
    assert inv_sqrt.lr.slope(0) == pytest.approx(cosine.lr.slope(cosine.tokens))
    # The switch point is derived so that the LR at the pre-cooldown checkpoint is 2.529e-4 (rounded: 2.532e-4).
    assert lr_at(inv_sqrt, inv_sqrt.end_tokens) == pytest.approx(2.529e-4, rel=2e-3)
    assert cooldown.lr.schedule == "linear" and cooldown.lr.peak == inv_sqrt.lr.end
    assert lr_at(cooldown, cooldown.end_tokens) == 0.0
    assert total_steps(run) == 420_000 + math.ceil(cooldown.tokens / (8 * Mi)) == 476_838
    assert run.manifest.spec.checkpoint.every_tokens == 2_000 * 8 * Mi  # config checkpoint-factor
    training = run.training
    assert training.z_loss == 0.0 and training.doc_masking
    assert (training.optimizer.beta2, training.optimizer.eps, training.optimizer.weight_decay) == (0.95, 1e-8, 0.1)
    assert len(run.sources) == 6 and sum(s.weight for s in run.sources.values()) == pytest.approx(1.0)


def test_index_1_9b_is_wsd_with_a_quality_decay_phase():
    run = load_run(recipe_path("index-1.9b"))
    stable, decay, context = run.phases
    assert run.model.norm_head and stable.tokens + decay.tokens == 2_800 * B
    assert stable.lr.schedule == decay.lr.schedule == "wsd"
    assert lr_at(stable, stable.start_tokens + stable.lr.warmup_tokens) == lr_at(stable, stable.end_tokens) == 3e-4
    assert decay.tokens == 280 * B and decay.lr.peak == 3e-4  # the last 10 % of the 2.8T
    # MiniCPM's exponential decay towards 3e-5, halving the distance every 5,000 steps of 4Mi (assumed half-life).
    assert (decay.lr.decay_shape, decay.lr.half_life_tokens) == ("exponential", 5_000 * 4 * Mi)
    half_lives = decay.tokens / decay.lr.half_life_tokens
    assert lr_at(decay, decay.end_tokens) == pytest.approx(3e-5 + (3e-4 - 3e-5) * 0.5**half_lives)
    assert lr_at(decay, decay.end_tokens) == pytest.approx(3e-5, rel=1e-3)
    # Published proportions: zh:en 4:5, code 6 %, curated data 10 %; instruction share 7 % in the decay phase.
    assert stable.weights["web-zh"] / stable.weights["web-en"] == pytest.approx(4 / 5, rel=1e-6)
    assert (stable.weights["code"], stable.weights["quality"]) == (0.06, 0.10)
    assert decay.weights["instruct"] == 0.07 > stable.weights["instruct"]
    assert decay.weights["quality"] > stable.weights["quality"]
    assert run.model.init_std == 0.01  # config.json initializer_range
    assert not next_phase_needs_relaunch(run, stable)  # the mix and LR change in the running job
    # Index-1.9B-32K: continued pre-training at 32K with the RoPE base x32, after the base run.
    assert (context.seq_len, context.rope.theta) == (32768, 32 * stable.rope.theta) and stable.rope.theta == 1e4
    assert next_phase_needs_relaunch(run, decay)  # tensor parallelism for 32K


def phase_segment(run, phase):
    """The one segment (constant batch) of a phase without a batch ramp."""
    (segment,) = [s for s in segments(run) if s.phase is phase]
    return segment


def test_index_1_9b_chat_is_sft_with_replay_then_one_epoch_of_dpo():
    """Issue 18's reading of the Index-1.9B report: SFT at LR 1e-5 on the responses only (packed), the SFT data at
    ~60 % of the loss tokens with pre-training replay the rest; then DPO with beta 0.1 at 1e-6, cosine, 1 epoch (of
    the assumed 102,400 pairs of ~1Ki tokens); a separate run from the pre-training run, in Index-1.9B-Chat's
    chat format."""
    run, base = load_run(recipe_path("index-1.9b-chat")), load_run(recipe_path("index-1.9b"))
    sft, dpo = run.phases
    # It starts from the pre-training run: its checkpoint root (weights only), its tokenizer, its architecture.
    init = run.manifest.spec.model.init
    assert (init.from_, init.path) == ("checkpoint", base.checkpoint.path)
    assert run.tokenizer.path == base.tokenizer.path
    same = ("layers", "dim", "heads", "kv_heads", "ffn_hidden", "padded_vocab", "norm_head", "init_std", "rope_theta")
    assert {f: getattr(run.model, f) for f in same} == {f: getattr(base.model, f) for f in same}
    assert (sft.kind, dpo.kind) == ("sft", "dpo") and sft.masks_documents and dpo.masks_documents
    # SFT: 1e-5 after the warmup, cosine to 0; the chat set gives 60 % of the loss tokens, replayed text the rest.
    sft_segment = phase_segment(run, sft)
    assert (sft.lr.schedule, sft_segment.batch_tokens, sft_segment.steps) == ("cosine", 1 * Mi, 2000)
    assert lr_at(sft, sft.start_tokens + sft.lr.warmup_tokens) == pytest.approx(1e-5)
    assert lr_at(sft, sft.end_tokens) == pytest.approx(0, abs=1e-12)
    assert {name: w for name, w in sft.weights.items() if w} == {"chat": 0.6, "replay": 0.4}
    assert (run.sources["chat"].format, run.sources["replay"].format) == ("chat", "auto")
    assert run.sources["replay"].path == base.sources["quality"].path  # the pre-training run's curated set
    # DPO: beta 0.1 against the weights it starts from (the SFT result), 1e-6 cosine to 0, a fresh optimizer.
    assert (dpo.dpo.beta, dpo.dpo.nll_weight, dpo.dpo.reference) == (0.1, 0.0, None)
    assert dpo.lr.schedule == "cosine" and lr_at(dpo, dpo.start_tokens + dpo.lr.warmup_tokens) == pytest.approx(1e-6)
    assert lr_at(dpo, dpo.end_tokens) == pytest.approx(0, abs=1e-12)
    assert dpo.reset_optimizer and not sft.reset_optimizer
    assert {name for name, w in dpo.weights.items() if w} == {"prefs"} and run.sources["prefs"].format == "preference"
    # 1 epoch of 102,400 pairs at ~1Ki sequence tokens a pair: 800 steps of 128 pairs, 10 % of them warmup.
    pairs, pair_tokens = 102_400, 1 * Ki
    dpo_segment = phase_segment(run, dpo)
    assert dpo.tokens == pairs * pair_tokens and dpo_segment.batch_tokens == 128 * pair_tokens
    assert dpo_segment.steps == pairs // 128 == 800 and dpo.lr.warmup_tokens == 80 * dpo_segment.batch_tokens
    # Index-1.9B-Chat's format: <unk> opens the system message, reserved_0 a user turn, reserved_1 the reply, and
    # </s> ends the reply (trained on, with the reply); the four are tokens of Index's vocabulary already.
    fmt = chat_format(run.tokenizer.chat_template)
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    rendered = fmt.render(chat)
    assert rendered.text == "<unk>Sreserved_0Ureserved_1A</s>"
    assert [rendered.text[a:b] for a, b in rendered.loss_spans] == ["A</s>"]
    assert (fmt.generation_prompt, fmt.end_of_turn) == ("reserved_1", "</s>")
    assert set(fmt.special_tokens) == {"<unk>", "reserved_0", "reserved_1", "</s>"}
    assert run.model.vocab_size == base.model.vocab_size == 65029  # no rows added for the template
    assert {p.world_size for p in run.phases} == {32} and not next_phase_needs_relaunch(run, sft)


def test_stablelm2_zephyr_is_three_epochs_of_sft_then_zephyrs_dpo():
    """Stable LM 2 Zephyr 1.6B: SFT for 3 epochs, then DPO with Zephyr-7B-beta's settings (alignment-handbook at
    c69ae4b): beta 0.1, LR 5e-7 linear with 10 % warmup, 3 epochs, 64 pairs a step; SFT with Zephyr's 2e-5 cosine
    and 512 packed sequences of 2048; AdamW without weight decay (the Zephyr paper)."""
    run, base = load_run(recipe_path("stablelm2-zephyr")), load_run(recipe_path("stablelm2-1.6b"))
    sft, dpo = run.phases
    init = run.manifest.spec.model.init
    assert (init.from_, init.path) == ("checkpoint", base.checkpoint.path)
    assert run.tokenizer.path == base.tokenizer.path
    same = ("layers", "dim", "heads", "padded_vocab", "rotary_fraction", "norm", "qkv_bias", "position_ids")
    assert {f: getattr(run.model, f) for f in same} == {f: getattr(base.model, f) for f in same}
    assert (sft.kind, dpo.kind) == ("sft", "dpo")
    # SFT: 512 packed sequences of 2048 a step, 2e-5 cosine to 0 after a 10 % warmup; 3 epochs of 500 steps.
    sft_segment = phase_segment(run, sft)
    assert (sft.seq_len, sft_segment.batch_tokens) == (2048, 512 * 2048)
    assert sft_segment.steps == 3 * 500 and sft.lr.warmup_tokens * 10 == sft.tokens
    assert lr_at(sft, sft.start_tokens + sft.lr.warmup_tokens) == pytest.approx(2e-5) and sft.lr.schedule == "cosine"
    assert {name: w for name, w in sft.weights.items() if w} == {"sft": 1.0}  # no replay
    # DPO: 3 epochs of 73,856 pairs of ~1Ki tokens, 64 pairs a step; a row holds two of Zephyr's 1024-token
    # sequences (prompt + chosen, prompt + rejected).
    pairs, pair_tokens = 73_856, 1 * Ki
    dpo_segment = phase_segment(run, dpo)
    assert dpo.tokens == 3 * pairs * pair_tokens and dpo_segment.batch_tokens == 64 * pair_tokens
    assert dpo_segment.steps == 3 * pairs // 64 == 3462 and dpo.seq_len == 2 * 1024
    assert dpo.lr.warmup_tokens // dpo_segment.batch_tokens == dpo_segment.steps // 10
    # beta 0.1; 5e-7 after the warmup, then linear to 0: half way down at the middle of the decay.
    assert (dpo.dpo.beta, dpo.dpo.nll_weight, dpo.dpo.reference) == (0.1, 0.0, None)
    decay_start = dpo.start_tokens + dpo.lr.warmup_tokens
    assert (dpo.lr.schedule, lr_at(dpo, decay_start)) == ("linear", pytest.approx(5e-7))
    assert lr_at(dpo, (decay_start + dpo.end_tokens) / 2) == pytest.approx(2.5e-7)
    assert dpo.reset_optimizer and {name for name, w in dpo.weights.items() if w} == {"prefs"}
    # AdamW, no weight decay (Zephyr §4), transformers' defaults for the rest; the same in both phases.
    optimizer = sft.optimizer
    assert (optimizer.type, optimizer.weight_decay, optimizer.beta1, optimizer.beta2) == ("adamw", 0.0, 0.9, 0.999)
    assert (optimizer.eps, optimizer.grad_clip) == (1e-8, 1.0) and dpo.optimizer == optimizer
    # The model card's format is stagerun's zephyr.
    fmt = chat_format(run.tokenizer.chat_template)
    chat = [{"role": "user", "content": "List 3 synonyms"}, {"role": "assistant", "content": "1. Dwarf"}]
    text = fmt.render(chat).text
    assert text == "<|user|>\nList 3 synonyms<|endoftext|>\n<|assistant|>\n1. Dwarf<|endoftext|>\n"
    assert (fmt.generation_prompt, fmt.end_of_turn) == ("<|assistant|>\n", "<|endoftext|>")
    assert {p.world_size for p in run.phases} == {16} and not next_phase_needs_relaunch(run, sft)  # 16 GPUs


def test_afm_distils_in_core_then_continues_and_lengthens_context():
    run = load_run(recipe_path("afm-3b"))
    core, continued, context = run.phases
    assert [(p.seq_len, p.tokens) for p in run.phases] == [(4096, 6_300 * B), (8192, 1_000 * B), (32768, 100 * B)]
    assert core.ramp == ((0, 16 * Mi),)  # 4096 sequences of 4096
    assert (core.lr.peak, core.lr.warmup_tokens // (16 * Mi)) == (1e-2, 5000)
    assert lr_at(core, core.end_tokens) == pytest.approx(0.005 * 1e-2)
    for phase in (continued, context):
        assert (phase.lr.peak, phase.lr.warmup_tokens // (16 * Mi)) == (3e-4, 1000)
        assert lr_at(phase, phase.end_tokens) == pytest.approx(0.001 * 3e-4)
    assert core.distill.weight == 0.9 and continued.distill is None and context.distill is None
    # §2 query/key normalisation; §3.2.1 initialised from (a pruned) checkpoint; §3.3 RMSProp with momentum and
    # decoupled weight decay, read AXLearn-style: the per-step shrink at peak LR (3.16e-4, then 1e-5) / peak LR.
    assert run.model.qk_norm and run.manifest.spec.model.init.from_ == "checkpoint"
    assert {p.optimizer.type for p in run.phases} == {"rmspropMomentum"}
    assert (core.optimizer.momentum, core.optimizer.beta2, core.optimizer.grad_clip) == (0.9, 0.99, 1.0)
    assert core.optimizer.weight_decay * core.lr.peak == pytest.approx(3.16e-4)
    assert continued.optimizer.weight_decay * continued.lr.peak == pytest.approx(1e-5, rel=1e-3)
    assert context.optimizer == continued.optimizer  # inherited
    teacher = resolve_model(core.distill.teacher.model)
    assert teacher.padded_vocab == run.model.padded_vocab == 49152
    assert teacher.parameter_count() == pytest.approx(6.4e9, rel=0.01)  # larger than the 2.8B student
    assert continued.weights["web"] < core.weights["web"] and continued.weights["math"] > core.weights["math"]
    assert continued.weights["licensed"] > 0 == core.weights["licensed"]
    assert context.weights["long-qa"] > 0 and context.parallelism.tensor_parallel == 2
    assert (core.rope.theta, continued.rope.theta, context.rope.theta) == (5e5, 5e5, 6_315_089)  # §3.2.3
    assert next_phase_needs_relaunch(run, continued)


def test_baichuan2_7b_reproduces_section_2():
    run = load_run(recipe_path("baichuan2-7b"))
    (phase,) = run.phases
    training = run.training
    assert run.model.norm_head and run.model.position == "rope" and run.model.padded_vocab == 125696
    assert (training.max_z_loss, training.grad_clip) == (2e-4, 0.5)
    assert (training.optimizer.beta1, training.optimizer.beta2, training.optimizer.weight_decay) == (0.9, 0.95, 0.1)
    assert (phase.tokens, phase.seq_len, phase.lr.schedule, phase.lr.peak) == (2_600 * B, 4096, "cosine", 2e-4)
    assert steps_until(run, phase.lr.warmup_tokens) == 2000
    # §2.7: 1,024 A800s; tensor parallelism inside a node, ZeRO (here FSDP) across the nodes.
    assert phase.world_size == 1024 and phase.parallelism.tensor_parallel == 8


# --- scaled to tiny: the same phases, end to end on 2 CPU processes ------------------------------------------------


def test_scale_to_tiny_keeps_the_recipes_shape():
    for name in RECIPES:
        full_manifest = recipe(name)
        full, tiny = load_run(recipe_path(name)), resolve_run(scale_to_tiny(full_manifest))
        assert [p.name for p in tiny.phases] == [p.name for p in full.phases]
        assert [p.lr.schedule for p in tiny.phases] == [p.lr.schedule for p in full.phases]
        assert [p.lr.continued for p in tiny.phases] == [p.lr.continued for p in full.phases]
        assert_same_lr_values(full, tiny)
        assert [p.optimizer for p in tiny.phases] == [p.optimizer for p in full.phases]
        assert [p.rope for p in tiny.phases] == [p.rope for p in full.phases]
        assert [p.weights for p in tiny.phases] == [p.weights for p in full.phases]
        assert [p.distill is not None for p in tiny.phases] == [p.distill is not None for p in full.phases]
        # Post-training: the kinds, DPO's settings, fresh or carried optimizer state, the chat format, and chat and
        # preference sources (as builtin generated sets of the same content) stay.
        assert [p.kind for p in tiny.phases] == [p.kind for p in full.phases]
        assert [p.dpo for p in tiny.phases] == [p.dpo for p in full.phases]  # no recipe names its own reference
        assert [p.reset_optimizer for p in tiny.phases] == [p.reset_optimizer for p in full.phases]
        assert tiny.tokenizer.chat_template == full.tokenizer.chat_template
        assert {n: s.format for n, s in tiny.sources.items()} == {n: s.format for n, s in full.sources.items()}
        # Relaunches happen only where the full recipe has them, and a recipe with any keeps at least one.
        full_relaunch = [next_phase_needs_relaunch(full, p) for p in full.phases]
        tiny_relaunch = [next_phase_needs_relaunch(tiny, p) for p in tiny.phases]
        assert all(f or not t for f, t in zip(full_relaunch, tiny_relaunch))
        assert any(full_relaunch) == any(tiny_relaunch)
        assert [p.parallelism.tensor_parallel > 1 for p in tiny.phases] == [
            p.parallelism.tensor_parallel > 1 for p in full.phases
        ]
        assert [p.parallelism.context_parallel > 1 for p in tiny.phases] == [
            p.parallelism.context_parallel > 1 for p in full.phases
        ]
        assert [len(p.ramp) for p in tiny.phases] == [len(p.ramp) for p in full.phases]
        for t, f in zip(tiny.phases, full.phases):  # batch ratios within a phase are exact
            assert [size / t.ramp[0][1] for _, size in t.ramp] == [size / f.ramp[0][1] for _, size in f.ramp]
        full_lens, tiny_lens = [p.seq_len for p in full.phases], [p.seq_len for p in tiny.phases]
        for i, j in zip(range(len(full_lens)), range(1, len(full_lens))):  # the order of context lengths is kept
            if full_lens[i] == full_lens[j]:
                assert tiny_lens[i] == tiny_lens[j]
            else:
                assert (tiny_lens[i] <= tiny_lens[j]) == (full_lens[i] < full_lens[j])
        model, full_model = tiny.model, full.model
        assert model.heads // model.kv_heads == full_model.heads // full_model.kv_heads
        for option in (
            "position",
            "rotary_fraction",
            "norm",
            "norm_bias",
            "qkv_bias",
            "norm_head",
            "tied_embeddings",
            "rope_theta",
            "qk_norm",
            "position_ids",
        ):
            assert getattr(model, option) == getattr(full_model, option), (name, option)
        assert tiny.training.max_z_loss == full.training.max_z_loss
        assert tiny.training.doc_masking == full.training.doc_masking
        assert total_steps(tiny) <= 40 and all(p.world_size == 2 for p in tiny.phases)


def assert_same_lr_values(full, tiny) -> None:
    """The scaled phases' LR peaks and ends equal the recipe's, except where they depend on where a phase sits in a
    schedule that crosses phases (continue, invSqrt, and what inherits from them): scaled phases keep 2 steps per
    batch segment, not their length ratios. Values that rest on rounded scaled lengths (warmup, horizon, half-life)
    agree to 0.1 %. Where a phase starts from the previous phase's LR, the scaled LR is continuous there too."""
    exact_peak = exact_end = True
    for index, (f, t) in enumerate(zip(full.phases, tiny.phases)):
        raw = full.manifest.spec.phases[index].lr
        own_shape = raw is not None and not f.lr.continued and f.lr.schedule != "invSqrt"
        if f.lr.continued:  # the continued schedule's peak; its value at this phase's end depends on the position
            exact_end = False
        elif f.lr.schedule == "invSqrt":  # starts at the previous end; decays over its own (unscaled-ratio) length
            exact_peak, exact_end = exact_end, False
        elif raw is None:  # constant at the previous phase's end
            exact_peak = exact_end
        else:
            exact_peak = raw.peak is not None or exact_end
            exact_end = exact_peak and f.lr.running_end_tokens == f.end_tokens
        if exact_peak:
            tolerance = None if own_shape and raw.peak is not None else 1e-3
            assert t.lr.peak == pytest.approx(f.lr.peak, rel=tolerance), (f.name, "peak")
        if exact_end:
            tolerance = None if f.lr.end == f.lr.to == t.lr.to else 1e-3
            assert t.lr.end == pytest.approx(f.lr.end, rel=tolerance), (f.name, "end")
        starts_fresh = own_shape and (raw.peak is not None or f.lr.warmup_tokens > 0)
        if index and not starts_fresh:
            before = tiny.phases[index - 1]
            assert lr_at(t, t.start_tokens) == pytest.approx(lr_at(before, before.end_tokens)), f.name


def prepare_run_dir(shared_data: Path, folder: Path, manifest: dict) -> Path:
    """A run dir holding the session's tokenizer and, for each recipe source, a copy of the shards of the builtin
    corpus it maps to (copies: a run never writes into the shared data).

    A recipe with a chat template gets an empty run dir: the session's tokenizer uses all 512 ids, so the
    template's tokens would be appended past the tiny vocabSize; the run trains its own 512-token tokenizer with
    them reserved, and tokenizes its sources (the builtin chat corpora are not in the shared data anyway)."""
    run_dir = folder / "run"
    (run_dir / "data").mkdir(parents=True)
    if manifest["spec"]["tokenizer"].get("chatTemplate") is not None:
        return run_dir
    (run_dir / "tokenizer.json").symlink_to(shared_data / "tokenizer.json")
    for source, spec in manifest["spec"]["data"]["sources"].items():
        corpus = {"builtin:python-docs": "docs", "builtin:python-code": "code"}[spec["path"]]
        shutil.copytree(shared_data / "data" / corpus, run_dir / "data" / source)
    return run_dir


def run_scaled(manifest: dict, shared_data: Path, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = prepare_run_dir(shared_data, folder, manifest)
    path = write_manifest(folder / f"{manifest['metadata']['name']}.yaml", manifest)
    result = run_tiny(path, run_dir)
    assert result.returncode == 0, result.stdout[-4000:]
    return result, read_metrics(run_dir / "metrics.jsonl"), run_dir


def assert_ran_the_whole_plan(manifest: dict, metrics: list[dict], run_dir: Path) -> None:
    run = resolve_run(manifest)
    assert [m["step"] for m in metrics] == list(range(1, total_steps(run) + 1))
    assert metrics[-1]["tokens"] == segments(run)[-1].end_tokens
    seen = [m["phase"] for m in metrics]
    assert [name for i, name in enumerate(seen) if i == 0 or seen[i - 1] != name] == [p.name for p in run.phases]
    expected = {p.name: p.seq_len for p in run.phases}
    assert all(m["seqLen"] == expected[m["phase"]] for m in metrics)
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert read_status(run_dir).state == "complete"


@pytest.mark.parametrize(
    "name", ["stablelm2-1.6b", "index-1.9b", "llama3-8b", "baichuan2-7b", "index-1.9b-chat", "stablelm2-zephyr"]
)
def test_scaled_recipe_trains_through_every_phase(name, shared_data, tmp_path):
    manifest = scale_to_tiny(recipe(name))
    result, metrics, run_dir = run_scaled(manifest, shared_data, tmp_path)
    assert_ran_the_whole_plan(manifest, metrics, run_dir)
    if name == "llama3-8b":  # core (CP 1) -> long-16k (CP 2): the gang is relaunched once, then runs to the end
        assert result.stdout.count("needs another topology") == 1 and "starting the next gang" in result.stdout
        assert {m["batchTokens"] for m in metrics if m["phase"] == "core"} == {1 * Ki, 2 * Ki, 4 * Ki}
        assert metrics[-1]["lr"] < metrics[-2]["lr"]  # the anneal decays toward 0
        # The core's cosine keeps running through the long-context stages (continue), across the relaunch.
        long = [m["lr"] for m in metrics if m["phase"].startswith("long-")]
        assert all(a > b for a, b in zip(long, long[1:]))
    if name == "stablelm2-1.6b":  # the hybrid: cosine, then a/sqrt(t + b) from where it is, then linear to 0
        lrs = {phase: [m["lr"] for m in metrics if m["phase"] == phase] for phase in ("cosine", "inv-sqrt", "cooldown")}
        tail = lrs["cosine"][-1:] + lrs["inv-sqrt"] + lrs["cooldown"]
        assert all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] < lrs["inv-sqrt"][-1] / 2
    if name == "baichuan2-7b":
        assert all(m["maxZLoss"] > 0 for m in metrics)
    if name == "index-1.9b":  # the decay phase upsamples the high-quality source
        stable_end = max(i for i, m in enumerate(metrics) if m["phase"] == "stable")
        before, after = metrics[stable_end]["tokensPerSource"], metrics[-1]["tokensPerSource"]
        assert after["quality"] - before["quality"] > 2 * before["quality"]
        assert metrics[-1]["lr"] < metrics[stable_end]["lr"]
    if name in ("index-1.9b-chat", "stablelm2-zephyr"):  # sft on the chat set (and replay), then dpo on the pairs
        assert_sft_then_dpo(manifest, metrics, replay="replay" if name == "index-1.9b-chat" else None)


def assert_sft_then_dpo(manifest: dict, metrics: list[dict], replay: str | None) -> None:
    """The sft steps draw from the chat source (and the replay source) only, the dpo steps from the pairs only; the
    first dpo step compares the policy with itself (its reference is the weights the phase starts from), so every
    reward is 0 and the loss is log 2; the dpo steps carry their pair counts."""
    sources = manifest["spec"]["data"]["sources"]
    chat = next(n for n, s in sources.items() if s.get("format") == "chat")
    prefs = next(n for n, s in sources.items() if s.get("format") == "preference")
    sft = [m for m in metrics if m["phase"] == "sft"]
    dpo = [m for m in metrics if m["phase"] == "dpo"]
    assert sft and dpo
    drawn_in_sft = {n for n, count in sft[-1]["tokensPerSource"].items() if count}
    assert drawn_in_sft == ({chat, replay} if replay else {chat})
    before, after = sft[-1]["tokensPerSource"], dpo[-1]["tokensPerSource"]
    assert {n for n in after if after[n] != before.get(n, 0)} == {prefs}
    assert dpo[0]["dpoLoss"] == pytest.approx(math.log(2), rel=1e-4) and dpo[0]["rewardsMargin"] == pytest.approx(0)
    assert all(m["pairs"] > 0 and math.isfinite(m["dpoLoss"]) for m in dpo)
    assert all("dpoLoss" not in m for m in sft)


@pytest.fixture(scope="module")
def afm_teacher(shared_data, tmp_path_factory) -> str:
    """A tiny teacher for the scaled AFM recipe: its core phase, without distillation, on the student's scaled
    architecture; returns its checkpoint root."""
    teacher = tiny_teacher_manifest(scale_to_tiny(recipe("afm-3b")), name="afm-teacher")
    _, _, run_dir = run_scaled(teacher, shared_data, tmp_path_factory.mktemp("afm-teacher"))
    return str(run_dir / "checkpoints")


def test_scaled_afm_distils_in_core_then_continues_at_longer_contexts(afm_teacher, shared_data, tmp_path):
    manifest = scale_to_tiny(recipe("afm-3b"), teacher_checkpoint=afm_teacher)
    result, metrics, run_dir = run_scaled(manifest, shared_data, tmp_path)
    assert_ran_the_whole_plan(manifest, metrics, run_dir)
    assert "teacher loaded from" in result.stdout
    core = [m for m in metrics if m["phase"] == "core"]
    assert core and all(m["distillLoss"] > 0 for m in core)
    assert all(m["distillLoss"] == 0 for m in metrics if m["phase"] != "core")
    assert result.stdout.count("needs another topology") == 1  # context-32k runs with tensor parallelism
    assert metrics[-1]["tokensPerSource"]["long-qa"] > 0  # only the context phase draws from it


def test_builtin_corpus_mapping():
    assert builtin_corpus("code") == builtin_corpus("math") == "builtin:python-code"
    assert builtin_corpus("web-zh") == builtin_corpus("long-qa") == "builtin:python-docs"
    # Post-training sources map by their content, whatever their name.
    chat = tiny_source("code-chat", {"path": "s3://x/*.jsonl", "format": "chat", "weight": 0.6})
    pairs = tiny_source("prefs", {"path": "s3://y/*.jsonl", "format": "preference", "weight": 0.0})
    assert chat == {"path": "builtin:chat-arithmetic", "format": "chat", "weight": 0.6}
    assert pairs == {"path": "builtin:preference-arithmetic", "format": "preference", "weight": 0.0}
    assert tiny_source("replay", {"path": "s3://z/", "weight": 0.4}) == {"path": "builtin:python-docs", "weight": 0.4}


def test_scale_to_tiny_replaces_a_dpo_reference_checkpoint_and_keeps_the_rest():
    """A dpo phase that names its reference gets the tiny one (as a distilling phase gets a tiny teacher); beta,
    nllWeight, the optimizer reset and the custom chat format stay; model.init goes (the tiny run starts from
    random weights, valid because the recipe's sft phase comes before dpo)."""
    manifest = recipe("index-1.9b-chat")
    manifest["spec"]["phases"][1]["dpo"] = {"beta": 0.2, "nllWeight": 0.2, "reference": {"checkpoint": "s3://b/sft"}}
    tiny = resolve_run(scale_to_tiny(manifest, reference_checkpoint="runs/sft/checkpoints"))
    dpo = tiny.phases[1]
    assert (dpo.dpo.beta, dpo.dpo.nll_weight, dpo.dpo.reference.checkpoint) == (0.2, 0.2, "runs/sft/checkpoints")
    assert dpo.reset_optimizer and tiny.manifest.spec.model.init is None
    assert tiny.tokenizer.chat_template == load_run(recipe_path("index-1.9b-chat")).tokenizer.chat_template
    assert tiny.tokenizer.train.vocab_size == 512 and [p.seq_len for p in tiny.phases] == [256, 256]
