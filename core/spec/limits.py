"""Upper bounds on manifest sizes: past them a value is a typo or an attack, never a recipe.

Without them `layers: 1e9` or `vocabSize: 1e10` passed validation and then hung or crashed inside the workers
(allocating the model), and `lr.peak: 1e300` trained to NaN. Each bound sits one to two orders of magnitude above the
largest published run (so no real recipe is refused; tests check that every example validates) and below where the
trainer or Kubernetes would break; the reason is part of the message. The field reader applies them
(``fields.Reader``), so an absurd value never reaches the schedule arithmetic or the model builder.

Bounds are keyed by (spec class name, attribute): the classes live in modules this one cannot import (they import
``fields``, which imports this).
"""

from __future__ import annotations

from dataclasses import dataclass

# Integers travel as int64 through the apiserver (a CRD's integer fields) and torch: nothing larger can be carried.
INT64_MAX = 2**63 - 1
# Any token count (phase budgets, warmup, checkpoint interval, ramp points): 1000T. The largest published runs
# train on ~40T tokens (Llama 4); 10^15 tokens at 10^7 tokens/s (a very large cluster) is three years of training.
MAX_TOKENS = 10**15


@dataclass(frozen=True)
class Bound:
    maximum: float
    why: str


_TOKENS = Bound(MAX_TOKENS, "25x the largest published training run (~40T tokens); three years at 10M tokens/s")
_VOCAB = Bound(2**24, "64x the largest released vocabularies (Gemma: 262144); token ids must fit the shards' uint32")
_SEQ = Bound(2**24, "16x the longest trained context windows (1M tokens)")
_STEPS = Bound(10**9, "a billion steps")
_DURATION = Bound(366 * 24 * 3600, "a year")

BOUNDS: dict[tuple[str, str], Bound] = {
    # spec.model (and a distillation teacher's model)
    ("ModelSpec", "vocab_size"): _VOCAB,
    ("ModelSpec", "pad_vocab_multiple"): Bound(2**16, "real paddings are 64 to 256"),
    ("ModelSpec", "dim"): Bound(2**17, "7x the widest dense model published (PaLM 540B: 18432)"),
    ("ModelSpec", "layers"): Bound(4096, "4x the deepest transformers trained (DeepNet: 1000 layers)"),
    ("ModelSpec", "heads"): Bound(4096, "32x the most heads published (Llama 3 405B: 128)"),
    ("ModelSpec", "kv_heads"): Bound(4096, "32x the most heads published (Llama 3 405B: 128)"),
    ("ModelSpec", "ffn_hidden"): Bound(2**20, "14x the widest published MLP (PaLM 540B: 73728)"),
    ("ModelSpec", "ffn_multiplier"): Bound(64, "real multipliers are 1 to 4"),
    ("ModelSpec", "ffn_multiple_of"): Bound(2**16, "real multiples are 64 to 1024"),
    ("ModelSpec", "max_seq_len"): _SEQ,
    ("ModelSpec", "rope_theta"): Bound(1e12, "real bases are 10^4 to 10^8"),
    ("PhaseRopeSpec", "theta"): Bound(1e12, "real bases are 10^4 to 10^8"),
    ("RopeScalingSpec", "factor"): Bound(1024, "real context extensions are 2x to 128x"),
    ("ModelSpec", "norm_eps"): Bound(1.0, "an epsilon above 1 outweighs the variance it guards"),
    ("ModelSpec", "init_std"): Bound(1.0, "real inits are 0.002 to 0.02; above 1 the first logits overflow"),
    ("TokenizerTrainSpec", "vocab_size"): _VOCAB,
    ("TokenizerTrainSpec", "max_bytes"): Bound(2**40, "BPE training holds its text's statistics in memory (1 TiB)"),
    # spec.phases
    ("PhaseSpec", "tokens"): _TOKENS,
    ("PhaseSpec", "seq_len"): _SEQ,
    ("PhaseSpec", "micro_batch_size"): Bound(2**16, "sequences per rank per forward pass"),
    ("BatchSpec", "size"): Bound(2**30, "16x the largest published batches (DeepSeek-V3: ~63M tokens)"),
    ("RampPoint", "size"): Bound(2**30, "16x the largest published batches (DeepSeek-V3: ~63M tokens)"),
    ("RampPoint", "tokens"): _TOKENS,
    ("LRSpec", "peak"): Bound(
        1.0,
        "AdamW moves each weight by about the LR per step: at 1 the first step erases the "
        "init (real peaks are 1e-4 to 1e-2)",
    ),
    ("LRSpec", "to"): Bound(1.0, "AdamW moves each weight by about the LR per step (real values are below 1e-2)"),
    ("LRSpec", "warmup_tokens"): _TOKENS,
    ("LRSpec", "horizon_tokens"): _TOKENS,
    ("LRSpec", "half_life_tokens"): _TOKENS,
    # spec.training, spec.checkpoint, spec.resources, spec.metrics, spec
    ("OptimizerSpec", "eps"): Bound(1.0, "real values are 1e-8 to 1e-6; above 1 AdamW stops adapting"),
    ("OptimizerSpec", "weight_decay"): Bound(10.0, "decay is LR x weightDecay per step (real: 0.01 to 0.1)"),
    ("TrainingSpec", "grad_clip"): Bound(1e6, "real clips are 0.3 to 1; use 0 to disable clipping"),
    ("TrainingSpec", "z_loss"): Bound(1.0, "real weights are 1e-4 (PaLM)"),
    ("TrainingSpec", "max_z_loss"): Bound(1.0, "real weights are 2e-4 (Baichuan 2)"),
    ("TrainingSpec", "loss_chunk_tokens"): _SEQ,
    ("TrainingSpec", "gc_every_steps"): _STEPS,
    ("TrainingSpec", "log_every_steps"): _STEPS,
    ("CheckpointSpec", "every_tokens"): _TOKENS,
    ("CheckpointSpec", "keep"): Bound(10**6, "a million checkpoints"),
    ("ResourcesSpec", "nodes"): Bound(100_000, "an Indexed Job has at most 100000 completions (Kubernetes batch/v1)"),
    ("ResourcesSpec", "gpus_per_node"): Bound(64, "8x the GPUs of today's largest nodes (8)"),
    ("ResourcesSpec", "processes_per_node"): Bound(1024, "more worker processes than any node has cores"),
    ("MetricsSpec", "peak_tflops"): Bound(1e6, "200x the fastest accelerator (~5000 dense TFLOP/s)"),
    ("RunSpec", "max_restarts"): Bound(10**6, "a million relaunches"),
    ("RunSpec", "hang_timeout"): _DURATION,
    ("RunSpec", "startup_timeout"): _DURATION,
}


def bound_of(class_name: str, attribute: str, kind: str | None) -> Bound | None:
    """The upper bound of a field: its own, else the general one for its kind (token counts)."""
    bound = BOUNDS.get((class_name, attribute))
    if bound is None and kind == "count":
        return _TOKENS
    return bound


def format_bound(value: float) -> str:
    """2**30 -> '1073741824 (2^30)', 10**15 -> '1e+15': readable and exact enough to act on."""
    if isinstance(value, int) and value >= 1024 and value & (value - 1) == 0:
        return f"{value} (2^{value.bit_length() - 1})"
    if isinstance(value, int) and value >= 10**6:
        return f"{value:.0e}".replace("e+0", "e").replace("e+", "e")
    return f"{value:g}"
