"""Export a stagerun checkpoint (or an in-memory model) as a Hugging Face model folder.

    export_checkpoint("runs/demo", "hf/demo", dtype="bf16")     # run dir, checkpoint root, or step-XXXXXXXX folder
    export_model(model, spec, "hf/demo", tokenizer="runs/demo/tokenizer.json")

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n``
shards plus ``model.safetensors.index.json`` above ``max_shard_size``) and the tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``), so that ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load it with no custom code (see :mod:`.mapping` for what maps to what).

A run with a chat template (spec.tokenizer.chatTemplate; its checkpoints' meta.json records it) exports it too:
tokenizer_config.json gets ``chat_template`` (the format's Jinja, so ``apply_chat_template`` gives the ids trained
on), its special tokens, and the end-of-turn token as ``eos_token``; generation_config.json's ``eos_token_id`` lists
the end-of-turn id before the document EOS, so ``generate`` stops at the end of a reply.

A DCP checkpoint is read in this one process, whatever the world size that wrote it: DCP's metadata gives every
tensor's global shape, so each tensor is loaded whole (``dcp.load(..., no_dist=True)``). Tensors are read block by
block and written shard by shard, so memory holds about one shard plus one transformer block, never the optimizer
(the sources and the safetensors files are :mod:`.weights`; this module writes the rest of the folder).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stagerun.core import storage
from stagerun.core.chat_template import ChatFormat, ChatFormatError
from stagerun.core.protocol import PreparedData, from_json_dict
from stagerun.core.spec.model import ModelSpec

from .mapping import hf_architecture, hf_config, hf_entries
from .rope import checkpoint_rope, spec_with_rope
from .weights import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPES,
    CheckpointSource,
    ExportError,
    StateDictSource,
    check_source,
    export_weights,
    numel,
    parse_size,
)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPES",
    "ExportError",
    "ExportResult",
    "CheckpointSource",
    "StateDictSource",
    "export_checkpoint",
    "export_model",
    "export_weights",
    "parse_size",
    "resolve_checkpoint",
    "spec_from_meta",
]

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")  # as data/tokenizer.py
PAD_TOKEN = "<|pad|>"


@dataclass
class ExportResult:
    out: Path
    architecture: str
    files: list[str]
    parameters: int  # elements written (padded rows and synthesised zero biases included)
    bytes: int
    checkpoint: str | None = None
    tokenizer: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _TokenizerFiles:
    text: str  # tokenizer.json
    eos: str | None
    pad: str | None
    eos_id: int | None
    pad_id: int | None
    unused_ids: list[int]  # padded embedding rows no token maps to: never to be generated
    chat: ChatFormat | None = None
    end_of_turn_id: int | None = None  # the chat format's end-of-turn token (generate() stops there)


def _read_tokenizer(tokenizer_path: str, spec: ModelSpec, chat: ChatFormat | None = None) -> _TokenizerFiles:
    from ..data.readers import DataError
    from ..data.tokenizer import check_chat_tokens, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    if chat is not None:
        try:  # the template's markers must be the single special ids the model was trained on
            check_chat_tokens(tokenizer, chat, tokenizer_path)
        except DataError as exc:
            raise ExportError(f"{exc}; or pass the run's own tokenizer with --tokenizer") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values(), default=-1) >= spec.padded_vocab:
        raise ExportError(
            f"{tokenizer_path}: the tokenizer has ids up to {max(vocab.values())} but the model has "
            f"{spec.padded_vocab} embedding rows: it is not this model's tokenizer (pass --tokenizer)"
        )
    eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
    pad = PAD_TOKEN if PAD_TOKEN in vocab else None
    unused = sorted(set(range(spec.padded_vocab)) - set(vocab.values()))
    end_of_turn = chat.end_of_turn if chat is not None else None
    return _TokenizerFiles(
        tokenizer.to_str(),
        eos,
        pad,
        vocab.get(eos) if eos else None,
        vocab.get(pad) if pad else None,
        unused,
        chat,
        vocab[end_of_turn] if end_of_turn is not None else None,
    )


def _write_tokenizer(tok: _TokenizerFiles, spec: ModelSpec, out: Path) -> list[str]:
    """tokenizer.json plus the two small files AutoTokenizer reads to build a PreTrainedTokenizerFast."""
    (out / "tokenizer.json").write_text(tok.text, encoding="utf-8")
    # A chat model's reply ends at the end-of-turn token: as eos_token, it is what pipelines and chat UIs stop at.
    eos = tok.chat.end_of_turn if tok.chat is not None and tok.chat.end_of_turn is not None else tok.eos
    special: dict[str, Any] = {k: v for k, v in (("eos_token", eos), ("pad_token", tok.pad)) if v is not None}
    if tok.chat is not None:
        special["additional_special_tokens"] = [t for t in tok.chat.special_tokens if t not in (eos, tok.pad)]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "bos_token": None,  # stagerun tokenizers add no BOS: documents are separated by EOS only
        "unk_token": None,  # byte-level BPE: every string encodes
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": spec.max_seq_len,
        "clean_up_tokenization_spaces": False,  # decode(encode(x)) == x
    }
    if tok.chat is not None:
        config["chat_template"] = tok.chat.jinja()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ---------------------------------------------------------------------------------------------------- folders

_OURS = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json)$"
)


def _prepare_out(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in out.iterdir()]
    if existing and not overwrite:
        raise ExportError(
            f"{out} is not empty ({', '.join(sorted(existing)[:5])}); choose another --out, or pass "
            "--overwrite to replace an earlier export there"
        )
    for name in existing:  # --overwrite: stale shards of an earlier export must not stay beside the new ones
        if _OURS.match(name):
            (out / name).unlink()


def export_model(
    model_or_state,
    spec: ModelSpec,
    out: str | Path,
    *,
    tokenizer: str | None = None,
    dtype: str = "fp32",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool | None = None,
    chat_template: ChatFormat | None = None,
) -> ExportResult:
    """Export an in-memory stagerun model (or its state dict) of the resolved ``spec``; ``chat_template``: the
    run's chat format (core.chat_template.chat_format(spec.tokenizer.chatTemplate)), written with the tokenizer."""
    source = (
        model_or_state
        if hasattr(model_or_state, "load") and hasattr(model_or_state, "shapes")
        else StateDictSource(model_or_state)
    )
    return _export(
        spec,
        source,
        Path(out),
        tokenizer=tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
        chat_template=chat_template,
    )


def _export(
    spec: ModelSpec,
    source,
    out: Path,
    *,
    tokenizer: str | None,
    dtype: str,
    max_shard_size,
    overwrite: bool,
    progress: bool | None,
    chat_template: ChatFormat | None = None,
) -> ExportResult:
    # Everything that can refuse the export does so before anything is written.
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    arch = hf_architecture(spec)
    entries = hf_entries(spec)
    check_source(spec, entries, source)
    parse_size(max_shard_size)
    tok = _read_tokenizer(tokenizer, spec, chat_template) if tokenizer is not None else None
    _prepare_out(out, overwrite)

    torch_dtype = DTYPES[dtype]
    files: list[str] = []
    notes = []
    if tok is not None:
        files += _write_tokenizer(tok, spec, out)
        if chat_template is not None:
            notes.append(f"chat template {chat_template.name}")
    else:
        notes.append("no tokenizer given: only the model files were written")
        if chat_template is not None:
            notes.append(f"chat template {chat_template.name} not written: it belongs in tokenizer_config.json")
    eos_id, pad_id = (tok.eos_id, tok.pad_id) if tok else (None, None)
    # No BOS token exists: documents are packed with EOS between them, so EOS is also what starts a document.
    config = hf_config(
        spec, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=pad_id, dtype=_DTYPE_NAMES[torch_dtype]
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation: dict[str, Any] = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if tok is not None and tok.end_of_turn_id is not None and tok.end_of_turn_id != eos_id:
        # generate() stops at any of these: the end of a reply, or a document's end (a base-model continuation).
        generation["eos_token_id"] = [tok.end_of_turn_id] + ([eos_id] if eos_id is not None else [])
    if tok is not None and tok.unused_ids:
        # The padded rows stay in the weights (vocab_size = padded vocab); generate() must never pick them.
        generation["suppress_tokens"] = tok.unused_ids
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files += ["config.json", "generation_config.json"]
    files += export_weights(spec, source, out, dtype=torch_dtype, max_shard_size=max_shard_size, progress=progress)
    parameters = sum(numel(e.shape) for e in entries)
    if spec.norm_head:
        notes.append(
            "NormHead baked into lm_head.weight" + (" (untied from the embedding)" if spec.tied_embeddings else "")
        )
    return ExportResult(
        out=out,
        architecture=arch,
        files=files,
        parameters=parameters,
        bytes=parameters * torch.empty((), dtype=torch_dtype).element_size(),
        checkpoint=source.url,
        tokenizer=tokenizer,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class ResolvedCheckpoint:
    url: str  # the step-XXXXXXXX folder
    step: int
    meta: dict[str, Any]
    tokenizer_candidates: tuple[str, ...]  # where the run's tokenizer may be, most specific first


def resolve_checkpoint(target: str) -> ResolvedCheckpoint:
    """The committed checkpoint a run dir, a checkpoint root or a ``step-XXXXXXXX`` folder designates (the newest
    committed one for the first two)."""
    from ..checkpoint import MARKER, META, CheckpointManager

    fs, path = storage.resolve(target)
    if not fs.exists(path):
        raise ExportError(
            f"{target} does not exist: give a run dir (runs/<name>), a checkpoint root, or a "
            "step-XXXXXXXX checkpoint folder"
        )
    name = path.rstrip("/").rsplit("/", 1)[-1]
    run_dir = None
    if re.fullmatch(r"step-\d+", name):
        folder, root = path, path.rstrip("/").rsplit("/", 1)[0]
        if not fs.exists(storage.join(folder, MARKER)):
            raise ExportError(
                f"{target} has no {MARKER} marker: it is not a committed checkpoint (a save that "
                "crashed?); export another step-XXXXXXXX folder"
            )
        step = int(name.split("-")[1])
    else:
        run_dir = path if fs.isdir(storage.join(path, "checkpoints")) else None
        root = storage.join(path, "checkpoints") if run_dir else path
        latest = CheckpointManager(storage.to_url(fs, root), keep=1).latest()
        if latest is None:
            raise ExportError(
                f"no committed checkpoint under {storage.to_url(fs, root)}; train (stagerun run) until "
                "one is saved, or point at a step-XXXXXXXX folder"
            )
        folder, step = storage.resolve(latest.path)[1], latest.step
    parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.strip("/") else None
    # Most specific first: the run dir's own tokenizer (prepared.json says which file the run used), the copy
    # `stagerun launch` publishes at <checkpoint root>/tokenizer.json, then the folders around the checkpoint.
    candidates: list[str] = []
    for directory in (run_dir, root, parent, folder):
        if directory is None:
            continue
        try:
            record = storage.read_json(fs, storage.join(directory, PreparedData.FILE))
            prepared = from_json_dict(PreparedData, record)
            if prepared.tokenizer_path:
                candidates.append(prepared.tokenizer_path)
        except (FileNotFoundError, ValueError):  # ValueError: damaged, or not a prepared.json
            pass
        candidates.append(storage.to_url(fs, storage.join(directory, "tokenizer.json")))
    try:
        meta = storage.read_json(fs, storage.join(folder, META))
    except FileNotFoundError:
        raise ExportError(f"{storage.to_url(fs, folder)} lacks {META}; the checkpoint is damaged") from None
    return ResolvedCheckpoint(storage.to_url(fs, folder), step, meta, tuple(dict.fromkeys(candidates)))


def spec_from_meta(model: dict[str, Any], where: str) -> ModelSpec:
    """The resolved ModelSpec from the manifest form stored in meta.json (``init`` is not part of it)."""
    from stagerun.core.spec.fields import Reader, SpecError
    from stagerun.core.spec.presets import resolve_model

    reader = Reader()
    spec = reader.read(ModelSpec, {k: v for k, v in model.items() if k != "init"}, "model")
    if spec is None or reader.problems:
        raise SpecError(reader.problems, where)
    return resolve_model(spec).replace(init=None)


def _manifest_model(manifest: str | Path) -> ModelSpec:
    from stagerun.core.spec import load_run

    return load_run(manifest).model.replace(init=None)


def _manifest_run(manifest: str | Path | None, meta: dict[str, Any]):
    """The manifest's resolved run, when it is needed for the RoPE (a checkpoint whose meta.json has none)."""
    from stagerun.core.spec import load_run

    return load_run(manifest) if manifest is not None and "rope" not in meta else None


def _find_tokenizer(candidates: Iterable[str]) -> str | None:
    for url in candidates:
        fs, path = storage.resolve(url)
        if fs.isfile(path):
            return url
    return None


def export_checkpoint(
    target: str,
    out: str | Path,
    *,
    dtype: str = "fp32",
    manifest: str | Path | None = None,
    tokenizer: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool | None = None,
    require_tokenizer: bool = True,
    average: int = 1,
    chat_template: ChatFormat | None = None,
) -> ExportResult:
    """Export the newest committed checkpoint of a run dir or checkpoint root, or one ``step-XXXXXXXX`` folder.

    The architecture comes from the checkpoint's meta.json, or from ``manifest`` (which must then agree with it).
    ``average`` > 1: export the mean weights of that many committed checkpoints of the chosen one's phase, ending
    with it (checkpoint_average.py). ``chat_template``: the format to write (default: the one the checkpoint's
    meta.json records, else the manifest's spec.tokenizer.chatTemplate; none for a run without one).
    """
    from stagerun.core.spec import to_manifest

    checkpoint = resolve_checkpoint(target)
    saved = checkpoint.meta.get("model")
    if manifest is not None:
        spec = _manifest_model(manifest)
        if saved:
            theirs = to_manifest(spec_from_meta(saved, f"{checkpoint.url}/meta.json"))
            ours = to_manifest(spec)
            changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k != "preset")
            if changed:
                raise ExportError(
                    f"{manifest} describes another model than checkpoint {checkpoint.url} was trained "
                    f"with (spec.model fields differ: {', '.join(changed)}); drop --manifest to use "
                    "the checkpoint's own meta.json"
                )
    elif saved:
        spec = spec_from_meta(saved, f"{checkpoint.url}/meta.json")
    else:
        raise ExportError(
            f"{checkpoint.url}/meta.json does not record the model; pass the run's manifest with --manifest"
        )
    # config.json states the RoPE of the checkpoint's phase (spec.phases[].rope), not only the model's first one.
    spec = spec_with_rope(spec, checkpoint_rope(checkpoint.meta, _manifest_run(manifest, checkpoint.meta)))
    hf_architecture(spec)  # refuse before reading any tensor
    if tokenizer is None:
        tokenizer = _find_tokenizer(checkpoint.tokenizer_candidates)
        if tokenizer is None and require_tokenizer:
            raise ExportError(
                "no tokenizer.json found (looked at "
                + ", ".join(checkpoint.tokenizer_candidates)
                + "); pass the run's tokenizer with --tokenizer"
            )
    if chat_template is None:
        chat_template = _run_chat_template(checkpoint, manifest)
    source, averaged = _source(checkpoint, average)
    result = _export(
        spec,
        source,
        Path(out),
        tokenizer=tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
        chat_template=chat_template,
    )
    result.notes.insert(0, f"step {checkpoint.step}" if not averaged else f"mean of steps {', '.join(averaged)}")
    return result


def _run_chat_template(checkpoint: ResolvedCheckpoint, manifest: str | Path | None) -> ChatFormat | None:
    """The chat format the run trained with: meta.json's record, else the manifest's (None: the run has none)."""
    recorded = checkpoint.meta.get("chatTemplate")
    if recorded is not None:
        try:
            return ChatFormat.from_json(recorded, f"{checkpoint.url}/meta.json: chatTemplate")
        except ChatFormatError as exc:
            raise ExportError(f"{exc}; the checkpoint is damaged, or pass --chat-template") from None
    if manifest is None:
        return None
    from stagerun.core.chat_template import chat_format
    from stagerun.core.spec import load_run

    template = load_run(manifest).tokenizer.chat_template
    return chat_format(template) if template is not None else None


def _source(checkpoint: ResolvedCheckpoint, average: int) -> tuple[Any, list[str]]:
    """The tensors to export: ``checkpoint``'s, or the mean over the ``average`` newest committed checkpoints of its
    phase up to it (all of the same model); and the averaged steps ([] without averaging)."""
    if average < 1:
        raise ExportError(f"--average {average}: give the number of checkpoints to average (1: no averaging)")
    if average == 1:
        return CheckpointSource(checkpoint.url), []
    from ..checkpoint import CheckpointManager
    from ..checkpoint_average import AveragedSource, checkpoints_to_average

    root = checkpoint.url.rstrip("/").rsplit("/", 1)[0]
    committed = CheckpointManager(root, keep=1_000_000).committed()
    newest = next(c for c in committed if c.step == checkpoint.step)
    chosen = checkpoints_to_average(committed, newest, average)
    if len(chosen) < average:
        raise ExportError(
            f"--average {average}: phase {newest.phase_index} of {root} has {len(chosen)} committed checkpoint(s) up "
            f"to step {checkpoint.step} (steps {', '.join(str(c.step) for c in chosen)}); average at most "
            f"{len(chosen)}, or keep more (spec.checkpoint.keep)"
        )
    for info in chosen:
        meta = resolve_checkpoint(info.path).meta
        if meta.get("model") and checkpoint.meta.get("model") and _comparable(meta) != _comparable(checkpoint.meta):
            raise ExportError(f"--average: {info.path} holds another model than {checkpoint.url}; average fewer")
    return AveragedSource([CheckpointSource(c.path) for c in chosen]), [str(c.step) for c in chosen]


def _comparable(meta: dict[str, Any]) -> dict[str, Any]:
    from stagerun.core.spec.model import comparable_model_fields

    return comparable_model_fields(meta["model"])
