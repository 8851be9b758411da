"""Export a stagerun checkpoint (or an in-memory model) as a Hugging Face model folder.

    export_checkpoint("runs/demo", "hf/demo", dtype="bf16")     # run dir, checkpoint root, or step-XXXXXXXX folder
    export_model(model, spec, "hf/demo", tokenizer="runs/demo/tokenizer.json")

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n``
shards plus ``model.safetensors.index.json`` above ``max_shard_size``) and the tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``), so that ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load it with no custom code (see :mod:`.mapping` for what maps to what).

A DCP checkpoint is read in this one process, whatever the world size that wrote it: DCP's metadata gives every
tensor's global shape, so each tensor is loaded whole (``dcp.load(..., no_dist=True)``). Tensors are read block by
block and written shard by shard, so memory holds about one shard plus one transformer block, never the optimizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stagerun.core import storage
from stagerun.core.spec.model import ModelSpec

from .mapping import ZEROS, Entry, export_tensor, hf_architecture, hf_config, hf_entries

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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
APP_STATE_PREFIX = "train.model."  # train.py saves {"train": ModelOptimizerState}: the model is under train.model
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")  # as data/tokenizer.py
PAD_TOKEN = "<|pad|>"


class ExportError(ValueError):
    """The export cannot be made as asked (no checkpoint, no tokenizer, a non-empty output folder, ...)."""


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


# ---------------------------------------------------------------------------------------------------- sizes

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Bytes from ``5GB`` (10^9, as transformers reads it), ``500MiB`` (2^20), ``2M`` or a plain integer."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ExportError(f"cannot read {value!r} as a size: write e.g. 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(number * base**power)


# ---------------------------------------------------------------------------------------------------- sources


class StateDictSource:
    """stagerun tensors from a state dict or a live model (FSDP/TP DTensors are gathered: call it on every rank)."""

    def __init__(self, tensors: dict[str, torch.Tensor] | torch.nn.Module):
        from torch.distributed.tensor import DTensor

        from ..model.transformer import canonical_name

        if isinstance(tensors, torch.nn.Module):
            tensors = dict(tensors.state_dict())
        self.tensors = {}
        for name, value in tensors.items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            self.tensors[canonical_name(name)] = value.detach()
        self.url = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self.tensors[n] for n in names}


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    with warnings.catch_warnings():  # DCP warns that it assumes a single process: here that is the point
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*(unavailable|uninitialized)")
        yield


class CheckpointSource:
    """stagerun model tensors of a committed DCP checkpoint (any fsspec URL), read whole in this process."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from ..checkpoint import FsspecReader

        self.url = url
        self.storage_options = dict(storage_options or {})
        metadata = FsspecReader(url, **self.storage_options).read_metadata()
        from ..model.transformer import canonical_name

        self.meta: dict[str, Any] = {}
        self.keys: dict[str, str] = {}  # canonical parameter name -> the key DCP stored it under
        for key, item in metadata.state_dict_metadata.items():
            if key.startswith(APP_STATE_PREFIX) and isinstance(item, TensorStorageMetadata):
                name = canonical_name(key[len(APP_STATE_PREFIX) :])
                self.meta[name], self.keys[name] = item, key
        if not self.meta:
            raise ExportError(
                f"checkpoint {url} holds no model tensors under {APP_STATE_PREFIX!r}: is it a stagerun "
                "training checkpoint?"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.size) for k, v in self.meta.items()}

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        from ..checkpoint import FsspecReader

        names = list(names)
        state = {}
        for name in names:
            item = self.meta[name]
            state[self.keys[name]] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        with _quiet_dcp():
            dcp.load(state, storage_reader=FsspecReader(self.url, **self.storage_options), no_dist=True)
        return {name: state[self.keys[name]] for name in names}


# ---------------------------------------------------------------------------------------------------- weights


def _check_source(spec: ModelSpec, entries: list[Entry], source) -> None:
    shapes = source.shapes()
    expected = {e.src: e.shape for e in entries if e.src is not None}
    problems = []
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"{name} is missing")
        elif shapes[name] != shape:
            problems.append(f"{name} has shape {list(shapes[name])}, the spec builds {list(shape)}")
    extra = sorted(set(shapes) - set(expected))
    problems += [f"{name} is not a parameter of the spec's model" for name in extra]
    if problems:
        where = source.url or "the state dict"
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ExportError(
            f"{where} does not hold the model that spec.model describes: {shown}. Export with the "
            "manifest the checkpoint was trained with (--manifest), or the checkpoint's own meta.json"
        )


def _plan_shards(entries: list[Entry], element_size: int, max_shard_size: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = element_size * _numel(entry.shape)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def export_weights(
    spec: ModelSpec,
    source,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
) -> list[str]:
    """Write the safetensors file(s) (and the index when sharded) of ``spec``'s export into ``out``.

    ``source`` gives stagerun tensors by name (:class:`CheckpointSource`, :class:`StateDictSource`). Returns the
    file names written. ``progress``: a tqdm bar (None: only on a terminal).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    entries = hf_entries(spec)
    _check_source(spec, entries, source)
    element_size = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(entries, element_size, parse_size(max_shard_size))
    names = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    shard_of = {e.hf: i for i, shard in enumerate(shards) for e in shard}
    total = sum(element_size * _numel(e.shape) for e in entries)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="export",
        disable=(None if progress is None else not progress),
    )
    pending: dict[int, dict[str, torch.Tensor]] = {}
    units: dict[str, list[Entry]] = {}
    for entry in entries:
        units.setdefault(entry.unit, []).append(entry)
    try:
        for unit_entries in units.values():
            loaded = source.load(sorted({e.src for e in unit_entries if e.src is not None}))
            for entry in unit_entries:
                value = export_tensor(entry, None if entry.kind == ZEROS else loaded[entry.src])
                index = shard_of[entry.hf]
                pending.setdefault(index, {})[entry.hf] = value.to(dtype).contiguous()
                bar.update(element_size * value.numel())
                if len(pending[index]) == len(shards[index]):  # the shard is complete: write it, free it
                    save_file(pending.pop(index), str(out / names[index]), metadata={"format": "pt"})
            del loaded
    finally:
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {e.hf: names[shard_of[e.hf]] for e in entries}}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX]
    return names


# ---------------------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _TokenizerFiles:
    text: str  # tokenizer.json
    eos: str | None
    pad: str | None
    eos_id: int | None
    pad_id: int | None
    unused_ids: list[int]  # padded embedding rows no token maps to: never to be generated


def _read_tokenizer(tokenizer_path: str, spec: ModelSpec) -> _TokenizerFiles:
    from ..data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values(), default=-1) >= spec.padded_vocab:
        raise ExportError(
            f"{tokenizer_path}: the tokenizer has ids up to {max(vocab.values())} but the model has "
            f"{spec.padded_vocab} embedding rows: it is not this model's tokenizer (pass --tokenizer)"
        )
    eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
    pad = PAD_TOKEN if PAD_TOKEN in vocab else None
    unused = sorted(set(range(spec.padded_vocab)) - set(vocab.values()))
    return _TokenizerFiles(
        tokenizer.to_str(), eos, pad, vocab.get(eos) if eos else None, vocab.get(pad) if pad else None, unused
    )


def _write_tokenizer(tok: _TokenizerFiles, spec: ModelSpec, out: Path) -> list[str]:
    """tokenizer.json plus the two small files AutoTokenizer reads to build a PreTrainedTokenizerFast."""
    (out / "tokenizer.json").write_text(tok.text, encoding="utf-8")
    special = {k: v for k, v in (("eos_token", tok.eos), ("pad_token", tok.pad)) if v is not None}
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
) -> ExportResult:
    """Export an in-memory stagerun model (or its state dict) of the resolved ``spec``."""
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
) -> ExportResult:
    # Everything that can refuse the export does so before anything is written.
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    arch = hf_architecture(spec)
    entries = hf_entries(spec)
    _check_source(spec, entries, source)
    parse_size(max_shard_size)
    tok = _read_tokenizer(tokenizer, spec) if tokenizer is not None else None
    _prepare_out(out, overwrite)

    torch_dtype = DTYPES[dtype]
    files: list[str] = []
    notes = []
    if tok is not None:
        files += _write_tokenizer(tok, spec, out)
    else:
        notes.append("no tokenizer given: only the model files were written")
    eos_id, pad_id = (tok.eos_id, tok.pad_id) if tok else (None, None)
    # No BOS token exists: documents are packed with EOS between them, so EOS is also what starts a document.
    config = hf_config(
        spec, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=pad_id, dtype=_DTYPE_NAMES[torch_dtype]
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation: dict[str, Any] = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if tok is not None and tok.unused_ids:
        # The padded rows stay in the weights (vocab_size = padded vocab); generate() must never pick them.
        generation["suppress_tokens"] = tok.unused_ids
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files += ["config.json", "generation_config.json"]
    files += export_weights(spec, source, out, dtype=torch_dtype, max_shard_size=max_shard_size, progress=progress)
    parameters = sum(_numel(e.shape) for e in entries)
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
            prepared = storage.read_json(fs, storage.join(directory, "prepared.json"))
            if isinstance(prepared, dict) and prepared.get("tokenizerPath"):
                candidates.append(str(prepared["tokenizerPath"]))
        except (FileNotFoundError, ValueError):
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
) -> ExportResult:
    """Export the newest committed checkpoint of a run dir or checkpoint root, or one ``step-XXXXXXXX`` folder.

    The architecture comes from the checkpoint's meta.json, or from ``manifest`` (which must then agree with it).
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
    hf_architecture(spec)  # refuse before reading any tensor
    if tokenizer is None:
        tokenizer = _find_tokenizer(checkpoint.tokenizer_candidates)
        if tokenizer is None and require_tokenizer:
            raise ExportError(
                "no tokenizer.json found (looked at "
                + ", ".join(checkpoint.tokenizer_candidates)
                + "); pass the run's tokenizer with --tokenizer"
            )
    source = CheckpointSource(checkpoint.url)
    result = _export(
        spec,
        source,
        Path(out),
        tokenizer=tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
    )
    result.notes.insert(0, f"step {checkpoint.step}")
    return result
