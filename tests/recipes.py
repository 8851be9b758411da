"""The seed recipes (examples/<report>.yaml) scaled down to CPU size, phase for phase.

``scale_to_tiny(manifest)`` keeps what makes a recipe that recipe and shrinks what makes it big:

kept      every phase (name, order, `kind`, and whether it sets or inherits lr and data), LR schedule shapes and
          values (`peak`, `to`, `decayFraction`, `decayShape`, `continue`, `invSqrt`), data weights per phase,
          `distill` (weight), `dpo` (beta, nllWeight), per-phase `optimizer` settings (`reset` included), the
          training block's losses and optimizer (type, `zLoss`, `maxZLoss`, `docMasking`, betas, momentum, weight
          decay, `gradClip`), the tokenizer's `chatTemplate` (format, roles, special tokens), sources' `format`
          chat / preference, and the architecture *options* of the model (preset, position, rotaryFraction, norm,
          normBias, qkvBias, qkNorm, positionIds, normHead, tiedEmbeddings, ropeTheta, the GQA ratio
          heads/kvHeads).
scaled    the model to 2 layers of head dim 16 (MHA: 4 heads; GQA ratio r: 2 KV heads and 2r query heads, so tensor
          parallelism over 2 ranks divides both), vocab 512; seqLen L to 64 x L/4096 clamped to 64..256 (4K -> 64,
          8K -> 128, 16K and longer -> 256: the order is kept, equal lengths stay equal), sft and dpo phases to 256
          whatever their length (whole builtin conversations and pairs per row: a dpo prompt must fit in half a
          row); every global batch divided by one factor per recipe (the smallest batch becomes 1Ki tokens, so the
          ratios between batch sizes are exact); each batch segment of a phase (a ramp step) to STEPS_PER_SEGMENT
          steps, ramp points moving with them (seqLen, batch and microBatchSize are stated in every scaled phase);
          warmupTokens and halfLifeTokens to the same fraction of the scaled phase; horizonTokens to the same
          multiple of the tokens its schedule runs over (the phase and the phases that continue it). The LR where a
          schedule crosses phases (continue, invSqrt) is not exact: phases keep 2 steps per batch segment, not their
          length ratios.
replaced  resources -> 1 node x 2 CPU processes (phase resources dropped); tensorParallel > 1 and contextParallel
          > 1 -> 2, other degrees -> defaults, so a phase that changes TP or CP still relaunches the gang; sources
          -> the builtin corpora (format chat -> builtin:chat-arithmetic, format preference ->
          builtin:preference-arithmetic; text sources by name: with code or math -> builtin:python-code, the rest
          -> builtin:python-docs); tokenizer -> a 512-token BPE trained on 1M bytes (with the recipe's chatTemplate:
          its special tokens are reserved inside the 512, which validation checks); checkpoint -> the run dir (only
          `keep`); a distilling phase's teacher -> a tiny model with the student's scaled architecture at
          ``teacher_checkpoint``, a dpo phase's `reference.checkpoint` (when the recipe names one) -> a tiny run's
          checkpoint at ``reference_checkpoint``; `model.init` is dropped (the tiny run starts from random weights:
          the recipe's checkpoint is a full-size placeholder). A recipe whose dpo phase comes first would then be
          invalid (DPO from random weights); the post-training recipes open with an sft phase, so theirs trains
          from random weights through sft, then dpo against the sft result.
dropped   image, scheduling, queueName, hangTimeout, maxRestarts, suspend, metrics, and the GPU-only training
          switches (precision, compile, activationCheckpointing).
"""

from __future__ import annotations

import copy
import math

from stagerun.core.spec import resolve_run

TINY_VOCAB = 512
TINY_LAYERS = 2
HEAD_DIM = 16
SMALLEST_BATCH = 1024  # tokens: the recipe's smallest global batch scales to this
STEPS_PER_SEGMENT = 2
MIN_SEQ, MAX_SEQ = 64, 256
WORLD = 2  # CPU processes of the scaled runs
TEACHER_PLACEHOLDER = "TEACHER-CHECKPOINT"
REFERENCE_PLACEHOLDER = "REFERENCE-CHECKPOINT"
POST_TRAINING_SEQ = 256  # sft and dpo phases: whole builtin conversations and pairs per row
# The builtin generated corpus of each post-training source format (trainer/data/chat_corpora.py).
BUILTIN_CHAT_CORPORA = {"chat": "builtin:chat-arithmetic", "preference": "builtin:preference-arithmetic"}

# Model fields that state a size (replaced); every other field the manifest sets is an option and is kept.
SIZE_FIELDS = {
    "vocabSize",
    "dim",
    "layers",
    "heads",
    "kvHeads",
    "ffnHidden",
    "ffnMultiplier",
    "ffnMultipleOf",
    "maxSeqLen",
    "init",
}
# Builtin corpus for each recipe source name: code-like sources read Python source, the rest prose.
CODE_LIKE = ("code", "math")
GPU_ONLY_TRAINING = ("precision", "compile", "activationCheckpointing")


def tiny_seq_len(seq_len: int, kind: str = "pretrain") -> int:
    """4K -> 64, 8K -> 128, 16K and longer -> 256 (a multiple of 8, order-preserving, equal stays equal); sft and
    dpo phases -> 256 (POST_TRAINING_SEQ), so a builtin pair's prompt fits in half a row."""
    if kind != "pretrain":
        return POST_TRAINING_SEQ
    scaled = seq_len * MIN_SEQ // 4096
    return min(max(scaled - scaled % 8, MIN_SEQ), MAX_SEQ)


def builtin_corpus(source_name: str) -> str:
    return "builtin:python-code" if any(word in source_name for word in CODE_LIKE) else "builtin:python-docs"


def tiny_source(source_name: str, source: dict) -> dict:
    """A recipe source replaced by a builtin corpus of the same content: conversations and preference pairs by
    the generated chat corpora (format kept), text by builtin_corpus(name)."""
    fmt = source.get("format")
    if fmt in BUILTIN_CHAT_CORPORA:
        return {"path": BUILTIN_CHAT_CORPORA[fmt], "format": fmt, "weight": source["weight"]}
    return {"path": builtin_corpus(source_name), "weight": source["weight"]}


def scale_to_tiny(
    manifest: dict,
    *,
    teacher_checkpoint: str = TEACHER_PLACEHOLDER,
    reference_checkpoint: str = REFERENCE_PLACEHOLDER,
    name: str | None = None,
) -> dict:
    """A copy of ``manifest`` (a full-size recipe) that trains in seconds on 2 CPU processes, same phases.

    ``teacher_checkpoint``: where the tiny teacher of a distilling phase is (a stagerun checkpoint root of a run of
    ``tiny_teacher_manifest(...)``); ``reference_checkpoint``: likewise the frozen reference of a dpo phase that
    names one (``dpo.reference``; a phase without it uses its own starting weights and needs none). The
    placeholders validate but do not train.
    """
    full = resolve_run(manifest)  # every inherited value stated; raises if the recipe itself is invalid
    out = copy.deepcopy(manifest)
    spec = out["spec"]
    if name:
        out["metadata"]["name"] = name
    for key in ("image", "scheduling", "queueName", "hangTimeout", "metrics", "maxRestarts", "suspend"):
        spec.pop(key, None)
    training = spec.get("training")
    if training:
        for key in GPU_ONLY_TRAINING:
            training.pop(key, None)

    seq_lens = [tiny_seq_len(phase.seq_len, phase.kind) for phase in full.phases]
    model = tiny_model(spec["model"], full.model, max(seq_lens))
    spec["model"] = model
    tokenizer = {"train": {"vocabSize": TINY_VOCAB, "maxBytes": "1M"}}
    if spec["tokenizer"].get("chatTemplate") is not None:  # its special tokens are reserved inside the 512
        tokenizer["chatTemplate"] = spec["tokenizer"]["chatTemplate"]
    spec["tokenizer"] = tokenizer
    for source_name, source in spec["data"]["sources"].items():
        spec["data"]["sources"][source_name] = tiny_source(source_name, source)
    spec["resources"] = {"nodes": 1, "processesPerNode": WORLD}
    spec["parallelism"] = tiny_parallelism(spec.get("parallelism"))
    spec["checkpoint"] = {"keep": 2}

    factor = min(size for phase in full.phases for _, size in phase.ramp) / SMALLEST_BATCH
    tiny_tokens: list[int] = []
    for raw, phase, seq_len in zip(spec["phases"], full.phases, seq_lens):
        raw.pop("resources", None)
        if "parallelism" in raw:
            raw["parallelism"] = tiny_parallelism(raw["parallelism"])
        tp = min(phase.parallelism.tensor_parallel, 2)
        cp = min(phase.parallelism.context_parallel, 2)
        dp = WORLD // (tp * cp)
        sizes = tiny_batches([size for _, size in phase.ramp], factor, seq_len, dp)
        segment_tokens = [STEPS_PER_SEGMENT * size for size in sizes]
        tokens = sum(segment_tokens)
        tiny_tokens.append(tokens)
        raw["tokens"] = tokens
        raw["seqLen"] = seq_len
        if len(sizes) > 1:
            points, at = [], 0
            for size, seg in zip(sizes, segment_tokens):
                points.append({"tokens": at, "size": size})
                at += seg
            raw["batch"] = {"ramp": points}
        else:
            raw["batch"] = {"size": sizes[0]}
        raw["microBatchSize"] = math.gcd(8, *(size // seq_len // dp for size in sizes))
        own_shape = raw.get("lr") and raw["lr"].get("schedule") not in ("continue", "invSqrt")
        if own_shape and phase.lr.warmup_tokens:
            warmup = round(phase.lr.warmup_tokens / phase.tokens * tokens)
            limit = tokens - int(tokens * phase.lr.decay_fraction) - 1 if phase.lr.schedule == "wsd" else tokens - 1
            raw["lr"]["warmupTokens"] = max(1, min(warmup, limit))
        if own_shape and "halfLifeTokens" in raw["lr"]:
            raw["lr"]["halfLifeTokens"] = max(1, round(phase.lr.half_life_tokens / phase.tokens * tokens))
        if raw.get("distill"):
            raw["distill"]["teacher"] = {"checkpoint": teacher_checkpoint, "model": dict(model)}
        if (raw.get("dpo") or {}).get("reference"):  # beta and nllWeight stay as they are
            raw["dpo"]["reference"] = {"checkpoint": reference_checkpoint}
    for index, (raw, phase) in enumerate(zip(spec["phases"], full.phases)):
        if raw.get("lr") and "horizonTokens" in raw["lr"]:  # the schedule's phases cover the same share of it
            full_run = phase.lr.running_end_tokens - phase.lr.origin_tokens
            tiny_run = tiny_tokens[index] + sum(continued_tokens(spec["phases"], tiny_tokens, index))
            raw["lr"]["horizonTokens"] = max(tiny_run, round(phase.lr.span_tokens / full_run * tiny_run))
    return out


def continued_tokens(phases: list[dict], tokens: list[int], index: int) -> list[int]:
    """The tokens of the phases right after ``index`` that continue its schedule (``lr: {schedule: continue}``)."""
    result = []
    for raw, count in zip(phases[index + 1 :], tokens[index + 1 :]):
        if (raw.get("lr") or {}).get("schedule") != "continue":
            break
        result.append(count)
    return result


def tiny_teacher_manifest(tiny: dict, name: str = "teacher") -> dict:
    """A run that trains the teacher a scaled recipe distils from: its first phase, without distillation, on the
    student's scaled architecture (so `distill.teacher.model` matches the checkpoint)."""
    teacher = copy.deepcopy(tiny)
    teacher["metadata"]["name"] = name
    first = teacher["spec"]["phases"][0]
    first.pop("distill", None)
    first.pop("parallelism", None)
    teacher["spec"]["phases"] = [first]
    return teacher


def tiny_model(raw: dict, resolved, max_seq_len: int) -> dict:
    """The recipe's model block with its sizes replaced: same options, 2 layers, same GQA ratio, vocab 512."""
    ratio = resolved.heads // resolved.kv_heads
    heads, kv_heads = (4, 4) if ratio == 1 else (2 * ratio, 2)
    dim = heads * HEAD_DIM
    model = {key: value for key, value in raw.items() if key not in SIZE_FIELDS}
    model.update(
        vocabSize=TINY_VOCAB,
        dim=dim,
        layers=TINY_LAYERS,
        heads=heads,
        kvHeads=kv_heads,
        ffnHidden=3 * dim,
        maxSeqLen=max_seq_len,
    )
    return model


def tiny_parallelism(raw: dict | None) -> dict:
    """tensorParallel or contextParallel > 1 becomes 2 (what 2 processes allow; the recipes never set both);
    FSDP takes the rest; other degrees stay at 1."""
    if raw is None:
        return {"fsdp": -1, "tensorParallel": 1}
    result = {}
    if "tensorParallel" in raw:
        result["tensorParallel"] = 2 if raw["tensorParallel"] > 1 else 1
    if "contextParallel" in raw:
        result["contextParallel"] = 2 if raw["contextParallel"] > 1 else 1
    if "fsdp" in raw:
        result["fsdp"] = -1
    return result or {"fsdp": -1}


def tiny_batches(sizes: list[int], factor: float, seq_len: int, dp: int) -> list[int]:
    """Each size divided by ``factor``, rounded to whole sequences that split over ``dp`` ranks, still increasing."""
    unit = seq_len * dp
    result: list[int] = []
    for size in sizes:
        tiny = max(unit, round(size / factor / unit) * unit)
        if result and tiny <= result[-1]:
            tiny = result[-1] + unit
        result.append(tiny)
    return result
