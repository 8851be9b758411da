"""Checks that span fields: everything the field reader alone cannot see. Each problem names a field and a fix."""

from __future__ import annotations

import re

from ..layout import BatchSplitError, LayoutError, ParallelLayout
from .fields import Problem, explicit_fields
from .k8s_values import check_run_values
from .model import ModelSpec, resolved_value
from .pod_template import OPERATOR_MOUNT_PATHS, check_pod_template, mount_path_problem
from .presets import PRESETS, REQUIRED_WITHOUT_PRESET
from .quantities import resource_quantity_value
from .resolve import ResolvedPhase, check_weights_sum
from .run import API_VERSION, KIND, TrainingRun

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# On Kubernetes a run's name also names its children: the headless Service `<name>-a<attempt>` must be a DNS-1035
# label on clusters before v1.34 (starting with a letter), and the pods' hostnames `<name>-a<attempt>-<index>` must
# fit in 63 characters. The CRD states the same rule (operator/crd.py), so the apiserver refuses such names too.
KUBERNETES_RUN_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
KUBERNETES_MAX_RUN_NAME = 50
# Each size field has its own bound (limits.py); together they still allow a model no cluster could hold. 10^13
# parameters (20x the largest dense models published, ~5e11) in bf16 with AdamW state is ~160 TB of accelerator memory.
MAX_PARAMETERS = 10**13
BUILTIN_CORPORA = (
    "builtin:python-docs",
    "builtin:python-code",
    "builtin:chat-arithmetic",  # generated conversations (trainer/data/chat_corpora.py)
    "builtin:preference-arithmetic",  # generated preference pairs
)
BUILTIN_CONTENT = {
    "builtin:python-docs": "text",
    "builtin:python-code": "text",
    "builtin:chat-arithmetic": "chat",
    "builtin:preference-arithmetic": "preference",
}


def check_run(run: TrainingRun, problems: list[Problem]) -> None:
    if run.api_version != API_VERSION:
        problems.append(
            Problem("apiVersion", f"must be {API_VERSION}, got {run.api_version!r}", f"apiVersion: {API_VERSION}")
        )
    if run.kind != KIND:
        problems.append(Problem("kind", f"must be {KIND}, got {run.kind!r}", f"kind: {KIND}"))
    _check_label(run.metadata.name, "metadata.name", problems)
    spec = run.spec
    if not spec.phases:
        problems.append(Problem("spec.phases", "is empty", "list at least one phase"))
    for index, phase in enumerate(spec.phases):
        _check_label(phase.name, f"spec.phases[{index}].name", problems)
    _check_averages(run, problems)
    _check_evaluations(run, problems)
    _check_sources(run, problems)
    _check_tokenizer(run, problems)
    check_post_training(run, problems)
    _check_resources(spec.resources, "spec.resources", problems)
    if spec.checkpoint.path is not None:
        _check_url(spec.checkpoint.path, "spec.checkpoint.path", problems)
        if spec.checkpoint.path.startswith("memory://"):
            problems.append(
                Problem(
                    "spec.checkpoint.path",
                    "memory:// keeps nothing past the process that wrote it (each worker has its own, and a resume "
                    "would find no checkpoint)",
                    "use a directory, a mounted volume (volumeClaim) or an object store such as s3://bucket/runs/NAME",
                )
            )
    if spec.checkpoint.volume_claim is not None and not (spec.checkpoint.path or "").startswith("/"):
        problems.append(
            Problem(
                "spec.checkpoint.path",
                "with volumeClaim the path is where the volume is mounted: it must be an absolute path",
                "e.g. path: /checkpoints",
            )
        )
    elif spec.checkpoint.volume_claim is not None:
        unmountable = mount_path_problem(spec.checkpoint.path or "", OPERATOR_MOUNT_PATHS)
        if unmountable:
            problems.append(Problem("spec.checkpoint.path", f"with volumeClaim: {unmountable}", "e.g. /checkpoints"))
    check_run_values(run, problems)
    for index, phase in enumerate(spec.phases):
        if phase.resources is not None:
            _check_resources(phase.resources, f"spec.phases[{index}].resources", problems)
    gpu_resources = {spec.resources.gpu_resource} | {
        p.resources.gpu_resource for p in spec.phases if p.resources is not None
    }
    checkpoint_mount = spec.checkpoint.path if spec.checkpoint.volume_claim else None
    check_pod_template(spec.pod_template, problems, gpu_resources=gpu_resources, checkpoint_mount=checkpoint_mount)


def check_model_fields(model: ModelSpec, problems: list[Problem]) -> bool:
    """Problems a resolved model cannot be built with; False when the model is unusable."""
    if model.preset is not None and model.preset not in PRESETS:
        problems.append(
            Problem("spec.model.preset", f"unknown preset {model.preset!r}", f"use one of {', '.join(PRESETS)}")
        )
        return False
    if model.preset is None:
        missing = [name for name in REQUIRED_WITHOUT_PRESET if getattr(model, name) is None]
        for name in missing:
            from .fields import camel

            problems.append(
                Problem(
                    f"spec.model.{camel(name)}",
                    "required when no preset is given",
                    f"set it, or choose a preset ({', '.join(PRESETS)})",
                )
            )
        if missing:
            return False
    return True


def check_model(model: ModelSpec, raw: ModelSpec, problems: list[Problem]) -> None:
    """Consistency of a resolved model; ``raw`` is the manifest's block (to tell what the user set)."""
    path = "spec.model"
    dim, heads = resolved_value(model.dim, "dim"), resolved_value(model.heads, "heads")
    kv_heads, max_seq_len = resolved_value(model.kv_heads, "kvHeads"), resolved_value(model.max_seq_len, "maxSeqLen")
    rotary_fraction = resolved_value(model.rotary_fraction, "rotaryFraction")
    if dim % heads:
        problems.append(
            Problem(f"{path}.dim", f"{dim} is not divisible by heads ({heads})", "choose dim = heads x head dim")
        )
        return
    if heads % kv_heads:
        problems.append(
            Problem(
                f"{path}.kvHeads",
                f"heads ({heads}) is not a multiple of kvHeads ({kv_heads})",
                "grouped-query attention needs heads = kvHeads x group size",
            )
        )
    if model.head_dim % 2:
        problems.append(Problem(f"{path}.dim", f"head dim {model.head_dim} is odd", "use an even dim / heads"))
    if model.position == "alibi" and "rotary_fraction" in explicit_fields(raw):
        problems.append(
            Problem(
                f"{path}.rotaryFraction",
                "has no meaning with position: alibi",
                "drop rotaryFraction, or use position: rope",
            )
        )
    if model.position == "rope" and model.rotary_dims % 2:
        problems.append(
            Problem(
                f"{path}.rotaryFraction",
                f"rotates {model.head_dim * rotary_fraction:g} of "
                f"{model.head_dim} head dims; RoPE needs an even whole number",
                "choose a fraction that gives an even count of dims",
            )
        )
    if model.position == "rope" and abs(model.rotary_dims - model.head_dim * rotary_fraction) > 1e-9:
        problems.append(
            Problem(
                f"{path}.rotaryFraction",
                f"{rotary_fraction} of {model.head_dim} head dims is not a whole number",
                "choose a fraction that gives an even count of dims",
            )
        )
    if model.position == "alibi" and model.position_ids == "perDocument":
        problems.append(
            Problem(
                f"{path}.positionIds",
                "perDocument resets RoPE positions; ALiBi has none (its bias depends only on the query-key distance)",
                "use position: rope, or positionIds: sequence (training.docMasking keeps ALiBi within documents)",
            )
        )
    if max_seq_len % 8:
        problems.append(Problem(f"{path}.maxSeqLen", f"must be a multiple of 8, got {max_seq_len}"))
    if model.parameter_count() > MAX_PARAMETERS:
        problems.append(
            Problem(
                path,
                f"builds {model.parameter_count():.3g} parameters: beyond any real run (at most "
                f"{MAX_PARAMETERS:.0e}; the largest dense models published have ~5e11)",
                "check dim, layers, ffnHidden and vocabSize for a typo",
            )
        )
    if model.norm == "rmsnorm" and "norm_bias" in explicit_fields(raw) and model.norm_bias:
        problems.append(Problem(f"{path}.normBias", "rmsnorm has no bias", "drop normBias, or use norm: layernorm"))


def _check_averages(run: TrainingRun, problems: list[Problem]) -> None:
    """``phases[].average.last`` needs that many checkpoints of the phase: saved (everyTokens) and kept (keep)."""
    checkpoint, start = run.spec.checkpoint, 0
    for index, phase in enumerate(run.spec.phases):
        begin, start = start, start + phase.tokens
        if phase.average is None:
            continue
        path, before = f"spec.phases[{index}].average.last", phase.average.last - 1  # the phase end is the last
        every = checkpoint.every_tokens
        saved = (start - 1) // every - begin // every if every else 0  # multiples of everyTokens inside the phase
        if saved < before:
            problems.append(
                Problem(
                    path,
                    f"{phase.average.last} averages the phase's end with its {before} checkpoints before it, but the "
                    f"phase saves {saved} before its end (spec.checkpoint.everyTokens: {every})",
                    f"set spec.checkpoint.everyTokens to at most {phase.tokens // (before + 1)}, or average fewer",
                )
            )
        if checkpoint.keep < before:
            problems.append(
                Problem(
                    path,
                    f"{phase.average.last} needs the phase's last {before} checkpoints, but spec.checkpoint.keep is "
                    f"{checkpoint.keep}: retention deletes the older ones first",
                    f"set spec.checkpoint.keep to at least {before}, or average fewer",
                )
            )


def _check_evaluations(run: TrainingRun, problems: list[Problem]) -> None:
    """``phases[].eval.heldOut.source`` must name a source no phase trains on (weight 0 throughout), or the loss
    would be measured on tokens the model has seen."""
    sources, phases = run.spec.data.sources, run.spec.phases
    seq_len, evaluation = None, None  # as inherited (resolve.py): unset takes the previous phase's
    for index, phase in enumerate(phases):
        seq_len = phase.seq_len or seq_len
        evaluation = phase.eval if phase.eval is not None else evaluation
        needle = evaluation.needle if evaluation is not None else None
        if needle is not None and seq_len is not None and seq_len < 2 * (needle.key_tokens + 3) + 8:
            problems.append(
                Problem(
                    f"spec.phases[{index}].eval.needle.keyTokens",
                    f"a needle of {needle.key_tokens} tokens (plus a 3-token marker, twice: hidden and asked) leaves "
                    f"no haystack in seqLen {seq_len}",
                    "use fewer keyTokens, or evaluate the needle in a phase with a longer seqLen",
                )
            )
        held_out = phase.eval.held_out if phase.eval is not None else None
        if held_out is None:
            continue
        path = f"spec.phases[{index}].eval.heldOut.source"
        if held_out.source not in sources:
            problems.append(Problem(path, f"{held_out.source!r} names no source", f"use one of {', '.join(sources)}"))
            continue
        trained = [p.name for p in phases if p.data and p.data.weights and p.data.weights.get(held_out.source)]
        if sources[held_out.source].weight > 0 or trained:
            where = f"phase {trained[0]!r}" if trained else f"spec.data.sources.{held_out.source}.weight"
            problems.append(
                Problem(
                    path,
                    f"source {held_out.source!r} is trained on ({where} gives it a weight above 0): its loss would "
                    "not be a held-out loss",
                    "add a source for evaluation only, with weight: 0 and no phase weight, and name it here",
                )
            )


def _check_url(url: str, path: str, problems: list[Problem]) -> None:
    """The URL's scheme must be one fsspec knows (the storage library itself may still need installing)."""
    import fsspec

    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in fsspec.available_protocols():
        problems.append(
            Problem(
                path,
                f"unknown storage scheme {scheme!r} in {url!r}",
                "use a local path or an fsspec URL such as s3://bucket/dir, gs://bucket/dir",
            )
        )


def _check_label(name: str, path: str, problems: list[Problem]) -> None:
    if len(name) > 63 or not DNS_LABEL.fullmatch(name):  # fullmatch: '$' would let a trailing newline through
        fixed = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "run"
        problems.append(
            Problem(
                path,
                f"{name!r} is not a DNS-1123 label (lowercase letters, digits and '-', at most 63)",
                f"e.g. {fixed!r}",
            )
        )


def _check_sources(run: TrainingRun, problems: list[Problem]) -> None:
    sources = run.spec.data.sources
    if not sources:
        problems.append(Problem("spec.data.sources", "is empty", "add at least one source: {path: ..., weight: 1}"))
        return
    for name, source in sources.items():
        path = f"spec.data.sources.{name}"
        _check_label(name, path, problems)
        if not source.path.strip():
            problems.append(Problem(f"{path}.path", "is empty", "give a folder, file, glob or URL"))
        if source.path.startswith("builtin:") and source.path not in BUILTIN_CORPORA:
            problems.append(
                Problem(
                    f"{path}.path",
                    f"unknown generated corpus {source.path!r}",
                    f"use one of {', '.join(BUILTIN_CORPORA)}",
                )
            )
    check_weights_sum({name: s.weight for name, s in sources.items()}, "spec.data.sources[*].weight", problems)
    cache = run.spec.data.cache
    if cache is not None and cache.storage_class and cache.medium:
        problems.append(Problem("spec.data.cache.medium", "is set with storageClass", "drop one of them"))
    if cache is not None and resource_quantity_value(cache.size_limit) < 1 << 20:
        problems.append(Problem("spec.data.cache.sizeLimit", f"{cache.size_limit} is below 1Mi", "e.g. 200Gi"))


def _check_tokenizer(run: TrainingRun, problems: list[Problem]) -> None:
    tokenizer = run.spec.tokenizer
    if (tokenizer.path is None) == (tokenizer.train is None):
        problems.append(
            Problem(
                "spec.tokenizer",
                "set exactly one of path and train",
                "path: a tokenizers JSON file, or train: {vocabSize: N}",
            )
        )


CHAT_FORMATS = ("chat", "preference")
_CUSTOM_ROLES = ("system", "user", "assistant", "special_tokens")


def check_post_training(run: TrainingRun, problems: list[Problem]) -> None:
    """sft and dpo phases against their sources, the chat template and where a dpo phase's reference comes from.

    What a source holds is known here only from its declared format; a shard set's content (text, chat,
    preference: its manifest) is checked when the trainer opens it."""
    spec = run.spec
    template = spec.tokenizer.chat_template
    content = {n: source_content(s) for n, s in spec.data.sources.items()}
    chat_sources = [n for n, c in content.items() if c in CHAT_FORMATS]
    if chat_sources and template is None:
        problems.append(
            Problem(
                "spec.tokenizer.chatTemplate",
                f"is unset, but sources {', '.join(chat_sources)} are chat or preference JSONL",
                "add chatTemplate: {format: chatml} (or zephyr, llama3, custom)",
            )
        )
    if template is not None:
        custom = [f for f in _CUSTOM_ROLES if getattr(template, f) is not None]
        if template.format == "custom":
            missing = [f for f in ("system", "user", "assistant") if getattr(template, f) is None]
            if missing:
                problems.append(
                    Problem(
                        f"spec.tokenizer.chatTemplate.{missing[0]}",
                        "is required with format custom",
                        "give prefix and suffix for system, user and assistant",
                    )
                )
        elif custom:
            problems.append(
                Problem(
                    f"spec.tokenizer.chatTemplate.{_camel(custom[0])}",
                    f"only applies to format custom; this template's is {template.format}",
                    "drop it, or set format: custom",
                )
            )
    if template is not None and spec.tokenizer.train is not None and not problems_for(problems, "spec.tokenizer"):
        _check_trained_vocab(template, spec.tokenizer.train.vocab_size, problems)
    default_weights = {n: s.weight for n, s in spec.data.sources.items()}
    kind, weights = "pretrain", default_weights
    saw_training_phase = False
    for index, phase in enumerate(spec.phases):
        path = f"spec.phases[{index}]"
        kind = phase.kind or kind
        if phase.data is not None and phase.data.weights is not None:
            weights = phase.data.weights
        used = [n for n, w in weights.items() if w > 0 and n in spec.data.sources]
        formats = {n: content[n] for n in used}
        if kind == "dpo":
            wrong = [n for n in used if formats[n] not in ("preference", "tokens", "auto")]
            if wrong:
                problems.append(
                    Problem(
                        f"{path}.data.weights",
                        f"a dpo phase trains on preference pairs only, but weights sources {', '.join(wrong)} "
                        f"({', '.join(sorted({formats[n] for n in wrong}))})",
                        "give the dpo phase weights on preference sources only (format: preference, or their "
                        "shard sets)",
                    )
                )
            if not saw_training_phase and spec.model.init is None:
                problems.append(
                    Problem(
                        f"{path}.kind",
                        "dpo as the first phase starts from random weights: there is no trained policy, and no "
                        "reference to anchor it to",
                        "start from a trained model (spec.model.init: {from: checkpoint, path: ...}), or put the "
                        "pretrain/sft phases before it",
                    )
                )
            if phase.distill is not None:
                problems.append(Problem(f"{path}.distill", "does not apply to dpo phases", "drop distill"))
            cp = phase.parallelism.context_parallel if phase.parallelism is not None else None
            if (cp if cp is not None else spec.parallelism.context_parallel) > 1:
                problems.append(
                    Problem(
                        f"{path}.parallelism.contextParallel",
                        "dpo phases do not split sequences (a pair's log-probabilities are summed over whole "
                        "responses)",
                        "use contextParallel: 1 (pairs fit in one rank's sequence)",
                    )
                )
        else:
            pairs = [n for n in used if formats[n] == "preference"]
            if pairs:
                problems.append(
                    Problem(
                        f"{path}.data.weights",
                        f"sources {', '.join(pairs)} are preference pairs, which only dpo phases train on; this "
                        f"phase's kind is {kind}",
                        "set kind: dpo, or give these sources weight 0 in this phase",
                    )
                )
        saw_training_phase = True


# The special tokens every trained tokenizer has (trainer/data/tokenizer.py SPECIAL_TOKENS): with 256 byte tokens and
# a template's own special tokens, the least vocabSize a trained tokenizer can have.
TRAINED_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def _check_trained_vocab(template, vocab_size: int, problems: list[Problem]) -> None:
    from ..chat_template import ChatFormatError, chat_format

    try:
        fmt = chat_format(template)
    except (ChatFormatError, KeyError, AttributeError):
        return  # the template's own problems are reported above
    least = 256 + len({*TRAINED_SPECIAL_TOKENS, *fmt.special_tokens})
    if vocab_size < least:
        problems.append(
            Problem(
                "spec.tokenizer.train.vocabSize",
                f"{vocab_size} leaves no room for the {fmt.name} chat template's special tokens (256 bytes, EOS, "
                f"PAD and {len(fmt.special_tokens)} template tokens need {least})",
                f"use at least {least}",
            )
        )


def problems_for(problems: list[Problem], prefix: str) -> bool:
    return any(p.path.startswith(prefix) for p in problems)


def source_content(source) -> str:
    """What a source holds as far as the manifest says: chat, preference, or its declared format (a shard set's own
    content is read from its manifest when the trainer opens it)."""
    if source.format in CHAT_FORMATS:
        return source.format
    return BUILTIN_CONTENT.get(source.path, source.format)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _check_resources(resources, path: str, problems: list[Problem]) -> None:
    explicit = explicit_fields(resources)
    if (
        resources.gpus_per_node > 0
        and resources.processes_per_node not in (None, resources.gpus_per_node)
        and "processes_per_node" in explicit
    ):
        problems.append(
            Problem(
                f"{path}.processesPerNode",
                f"{resources.processes_per_node} differs from gpusPerNode "
                f"({resources.gpus_per_node}); each GPU needs one process",
                "drop processesPerNode on GPU nodes",
            )
        )


def check_tokenizer_vocab(run: TrainingRun, model: ModelSpec, problems: list[Problem]) -> None:
    train = run.spec.tokenizer.train
    if train is not None and train.vocab_size > resolved_value(model.vocab_size, "vocabSize"):
        problems.append(
            Problem(
                "spec.tokenizer.train.vocabSize",
                f"{train.vocab_size} exceeds the model's vocabSize {model.vocab_size}",
                f"lower it, or set spec.model.vocabSize: {train.vocab_size}",
            )
        )


def phase_layout(
    phase: ResolvedPhase, problems: list[Problem] | None = None, path: str = "spec.parallelism"
) -> ParallelLayout | None:
    """The phase's parallel layout on its world size; None (and a problem reported) when the degrees do not fit."""
    report = problems.append if problems is not None else (lambda p: None)
    cp, tp = phase.parallelism.context_parallel, phase.parallelism.tensor_parallel
    if cp > 1 and phase.seq_len % (2 * cp * tp):  # 2·cp load-balancing chunks, each rank's part split over tp
        report(
            Problem(
                f"spec.phases[{phase.index}].seqLen",
                f"{phase.seq_len} is not a multiple of 2 x contextParallel x tensorParallel ({2 * cp * tp}): context "
                "parallelism cuts each sequence into 2 x contextParallel equal chunks (two per rank, for balanced "
                "causal attention)",
                f"choose a seqLen that is a multiple of {2 * cp * tp}, or a smaller contextParallel",
            )
        )
    if cp > 1 and phase.parallelism.data_parallel_replicate > 1:
        report(
            Problem(
                f"{path}.dataParallelReplicate",
                "HSDP replicas are not supported with contextParallel > 1 (FSDP shards over fsdp x contextParallel)",
                "set dataParallelReplicate: 1 and let fsdp take the ranks",
            )
        )
        return None
    try:
        return ParallelLayout.of_phase(phase)
    except LayoutError as exc:
        report(Problem(f"{path}.{exc.field}", exc.message, exc.fix))
        return None


def data_parallel_degree(
    phase: ResolvedPhase, problems: list[Problem] | None = None, path: str = "spec.parallelism"
) -> int | None:
    """Ranks that split the batch (FSDP shards x HSDP replicas) for this phase's world size."""
    layout = phase_layout(phase, problems, path)
    return layout.dp if layout is not None else None


def check_phase_topology(phase: ResolvedPhase, raw_phase, model: ModelSpec, problems: list[Problem]) -> None:
    """Whether the phase's batches split into micro-batches on its world size, and its TP degree fits the model."""
    tp = phase.parallelism.tensor_parallel
    base = f"spec.phases[{phase.index}]"
    par_path = f"{base}.parallelism" if raw_phase.parallelism is not None else "spec.parallelism"
    if tp > 1 and (resolved_value(model.heads, "heads") % tp or resolved_value(model.kv_heads, "kvHeads") % tp):
        problems.append(
            Problem(
                f"{par_path}.tensorParallel",
                f"{tp} does not divide heads ({model.heads}) and kvHeads ({model.kv_heads})",
                "choose a degree that divides both",
            )
        )
    if tp > 1 and model.padded_vocab % tp:
        problems.append(
            Problem(
                f"{par_path}.tensorParallel",
                f"{tp} does not divide the padded vocabulary ({model.padded_vocab}): the output head and the loss "
                "split the vocabulary rows between the tensor-parallel ranks",
                f"set spec.model.padVocabMultiple to a multiple of {tp}",
            )
        )
    if tp > 1 and phase.seq_len % tp:
        problems.append(
            Problem(
                f"{base}.seqLen",
                f"{phase.seq_len} is not divisible by tensorParallel ({tp}): sequence parallelism splits each "
                "sequence between the tensor-parallel ranks",
                f"choose a seqLen that is a multiple of {tp}",
            )
        )
    layout = phase_layout(phase, problems, par_path)
    if layout is None:
        return
    for j, (_, size) in enumerate(phase.ramp):
        try:
            layout.split(size // phase.seq_len, phase.micro_batch_size)
        except BatchSplitError as exc:
            problems.append(
                Problem(
                    f"{base}.batch" + (f".ramp[{j}].size" if len(phase.ramp) > 1 else ""),
                    exc.reason(phase.seq_len),
                    exc.fix(phase.seq_len),
                )
            )


def check_training_devices(training, phases: list[ResolvedPhase], problems: list[Problem]) -> None:
    """Training switches that only exist on GPUs, refused here rather than at the first step of a CPU phase."""
    split = [phase for phase in phases if phase.parallelism.tensor_parallel > 1]
    if training.float8 and split:
        problems.append(
            Problem(
                "spec.training.float8",
                f"is not supported with tensor parallelism yet (phase {split[0].name!r} has tensorParallel "
                f"{split[0].parallelism.tensor_parallel})",
                "set float8: false, or train those phases with tensorParallel: 1",
            )
        )
    cpu = [phase for phase in phases if phase.resources.gpus_per_node == 0]
    if not cpu:
        return
    where = f"phase {cpu[0].name!r} runs on CPU (gpusPerNode: 0)"
    if training.float8:
        problems.append(Problem("spec.training.float8", f"needs GPUs (Hopper or newer): {where}", "set float8: false"))
    if training.optimizer.implementation == "fused":
        problems.append(
            Problem(
                "spec.training.optimizer.implementation",
                f"fused AdamW needs GPUs: {where}",
                "use implementation: auto (fused on GPU, foreach on CPU)",
            )
        )


def kubernetes_problems(run: TrainingRun) -> list[Problem]:
    """What a manifest needs on Kubernetes beyond a local run (the operator checks these; `stagerun run` does not)."""
    problems = []
    name = run.metadata.name
    # (A name that is no DNS-1123 label at all is reported by check_run already.)
    if DNS_LABEL.fullmatch(name) and (len(name) > KUBERNETES_MAX_RUN_NAME or not KUBERNETES_RUN_NAME.fullmatch(name)):
        fixed = (f"run-{name}" if name[:1].isdigit() else name)[:KUBERNETES_MAX_RUN_NAME].rstrip("-")
        problems.append(
            Problem(
                "metadata.name",
                f"{name!r} cannot name a run on Kubernetes: it must start with a letter (its Service is a DNS-1035 "
                f"label on clusters before v1.34) and have at most {KUBERNETES_MAX_RUN_NAME} characters (its pods "
                "are <name>-a<attempt>-<index>)",
                f"e.g. {fixed!r}",
            )
        )
    spec = run.spec
    if not spec.image:
        problems.append(
            Problem(
                "spec.image", "is required on Kubernetes", "set the trainer image, e.g. ghcr.io/example/stagerun:0.1"
            )
        )
    if not spec.checkpoint.path:
        problems.append(
            Problem(
                "spec.checkpoint.path",
                "is required on Kubernetes: pods are replaced on every restart, "
                "so checkpoints must live in shared storage",
                "an s3://, gs:// URL, or a path with volumeClaim",
            )
        )
    elif "://" not in spec.checkpoint.path and spec.checkpoint.volume_claim is None:
        problems.append(
            Problem(
                "spec.checkpoint.path",
                f"{spec.checkpoint.path!r} is a local path but no volumeClaim "
                "is mounted there: every restarted pod would start from scratch",
                "set spec.checkpoint.volumeClaim, or use an object-store URL",
            )
        )
    return problems
