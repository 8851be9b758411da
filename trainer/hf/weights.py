"""The weights of a Hugging Face export: where stagerun tensors come from, and the safetensors files they go to.

A source gives stagerun tensors by name: :class:`StateDictSource` (a live model or a state dict) or
:class:`CheckpointSource` (a committed DCP checkpoint, read whole in this process). :func:`export_weights` maps them
to HF names and writes them shard by shard (see :mod:`.mapping` for what maps to what).
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from stagerun.core.spec.model import ModelSpec

from .mapping import ZEROS, Entry, export_tensor, hf_entries

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
APP_STATE_PREFIX = "train.model."  # train.py saves {"train": ModelOptimizerState}: the model is under train.model


class ExportError(ValueError):
    """The export cannot be made as asked (no checkpoint, no tokenizer, a non-empty output folder, ...)."""


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

        from ..compat import FsspecReader

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

        from ..compat import FsspecReader

        names = list(names)
        state = {}
        for name in names:
            item = self.meta[name]
            state[self.keys[name]] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        with _quiet_dcp():
            dcp.load(state, storage_reader=FsspecReader(self.url, **self.storage_options), no_dist=True)
        return {name: state[self.keys[name]] for name in names}


# ---------------------------------------------------------------------------------------------------- weights


def check_source(spec: ModelSpec, entries: list[Entry], source) -> None:
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
        nbytes = element_size * numel(entry.shape)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def numel(shape: tuple[int, ...]) -> int:
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
    check_source(spec, entries, source)
    element_size = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(entries, element_size, parse_size(max_shard_size))
    names = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    shard_of = {e.hf: i for i, shard in enumerate(shards) for e in shard}
    total = sum(element_size * numel(e.shape) for e in entries)
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
        weight_map = {e.hf: names[shard_of[e.hf]] for e in entries}
        (out / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
        return names + [INDEX]
    return names
