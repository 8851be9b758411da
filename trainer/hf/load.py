"""Start a run from Hugging Face weights: ``spec.model.init: {from: hf, path: DIR_OR_FSSPEC_URL}``.

``build_model`` (train.py) calls :func:`load_hf_weights` on every rank instead of the random init, with the model
already parallelised: each parameter's full tensor is read from the safetensors files and each rank keeps its
own shard (``distribute_tensor(..., src_data_rank=None)``, as ``init_weights`` does), so the load works for any
FSDP / tensor-parallel layout. The HF config is checked against ``spec.model`` first, and every mismatch is
reported with the field to change.

Decisions (docs/huggingface.md):
- vocab: config.json's ``vocab_size`` may be smaller than ``padded_vocab`` (a release with an unpadded vocab):
  the missing rows of the embedding and the head are zero. It may not be smaller than ``spec.model.vocabSize``
  (token ids without a trained embedding) nor larger than ``padded_vocab``.
- NormHead: an exported head is already normalised; it is stored as it is (NormHead normalises again in forward,
  which changes nothing). A tied NormHead model is exported untied; loading it back into a tied spec checks that
  ``lm_head`` is the row-normalised embedding.
- Tensors the stagerun model has no place for must be zero (Llama's ``o_proj.bias`` when ``attention_bias``,
  StableLM's LayerNorm biases when ``normBias: false``); anything else left over is an error.
- ``max_position_embeddings`` is not checked: continued pretraining may lengthen the context.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from stagerun.core import storage
from stagerun.core.spec.fields import Problem

from .mapping import (
    INIT_PATH,
    NORMHEAD,
    ZEROS,
    Entry,
    HFMismatchError,
    check_hf_config,
    field,
    hf_entries,
    hf_tied,
    hf_vocab_size,
)

__all__ = ["HFMismatchError", "SafetensorsFolder", "check_hf_folder", "hf_tensors", "load_hf_weights", "read_config"]

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Non-persistent buffers some older exports still carry: recomputed by both sides, never weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")


def read_config(path: str) -> dict:
    """config.json of a Hugging Face model folder (local path or fsspec URL)."""
    fs, root = storage.resolve(path)
    try:
        return storage.read_json(fs, storage.join(root, CONFIG))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} has no {CONFIG}: {INIT_PATH} must be a Hugging Face model folder "
            "(config.json and model.safetensors)"
        ) from None


def check_hf_folder(spec, path: str) -> dict:
    """Read ``path``'s config.json and raise HFMismatchError (every mismatching field) unless it fits ``spec``."""
    config = read_config(path)
    problems = check_hf_config(spec, config)
    if problems:
        raise HFMismatchError(problems, f"{path}/{CONFIG}")
    return config


class SafetensorsFolder:
    """The tensors of a local HF folder: ``model.safetensors`` or shards listed by ``model.safetensors.index.json``,
    read one tensor at a time (memory-mapped)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        folder = Path(folder)
        if (folder / INDEX).exists():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / WEIGHTS).exists():
            files, weight_map = [WEIGHTS], None
        else:
            raise FileNotFoundError(
                f"{folder} has neither {WEIGHTS} nor {INDEX} (pytorch_model.bin is not read: "
                "convert it with transformers' save_pretrained(safe_serialization=True))"
            )
        self._handles = {name: safe_open(str(folder / name), framework="pt") for name in files}
        self.where = {}
        for name, handle in self._handles.items():
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    self.where[key] = name

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


def _expected_entries(spec, config: dict) -> list[Entry]:
    """The export entries of ``spec``, adapted to what this HF model holds (tied or not)."""
    entries = hf_entries(spec)
    if hf_tied(config):  # no lm_head.weight needed (an untied spec was refused by check_hf_config)
        entries = [e for e in entries if e.hf != "lm_head.weight"]
    return entries


def hf_tensors(spec, config: dict, weights: SafetensorsFolder) -> Iterator[tuple[str, torch.Tensor]]:
    """(stagerun parameter FQN, full float tensor) for every parameter of ``spec``'s model, from HF weights.

    Checks shapes, the zero tensors, the NormHead of a tied model and that no HF tensor is left unused; raises
    HFMismatchError naming the field."""
    entries = _expected_entries(spec, config)
    hf_vocab = hf_vocab_size(config)
    source = f"{INIT_PATH} weights"
    missing = [e.hf for e in entries if e.hf not in weights]
    if missing:
        raise HFMismatchError(
            [
                Problem(
                    INIT_PATH,
                    f"the safetensors lack {', '.join(missing[:5])}"
                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
                    "the folder does not hold the model its config.json describes",
                )
            ],
            source,
        )
    wanted = {e.hf for e in entries}
    if hf_tied(config):
        wanted.add("lm_head.weight")  # a tied model may still store it; it is the embedding
    extra = [n for n in weights.names() if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise HFMismatchError(
            [
                Problem(
                    INIT_PATH,
                    f"the safetensors hold tensors this spec has no place for: "
                    f"{', '.join(sorted(extra)[:5])}" + (" ..." if len(extra) > 5 else ""),
                    "check spec.model against the model's config.json",
                )
            ],
            source,
        )
    embedding: torch.Tensor | None = None
    for entry in entries:
        tensor = weights.get(entry.hf)
        shape = entry.shape
        if entry.src in _VOCAB_ROWS or entry.hf == "lm_head.weight":
            shape = (hf_vocab, *shape[1:])
        if tuple(tensor.shape) != shape:
            raise HFMismatchError(
                [
                    Problem(
                        INIT_PATH,
                        f"{entry.hf} has shape {list(tensor.shape)}, expected {list(shape)} from config.json",
                        "the folder's files are inconsistent",
                    )
                ],
                source,
            )
        if entry.kind == ZEROS:
            if torch.count_nonzero(tensor):
                raise HFMismatchError(
                    [
                        Problem(
                            field(entry.field) if entry.field else INIT_PATH,
                            f"{entry.hf} is not zero, and stagerun's model has no such parameter"
                            + (
                                " (set normBias: true to load LayerNorm biases)"
                                if entry.field == "norm_bias"
                                else " (stagerun has no output-projection bias)"
                            ),
                            "set normBias: true"
                            if entry.field == "norm_bias"
                            else "load a model without an o_proj bias",
                        )
                    ],
                    source,
                )
            continue
        tensor = tensor.to(torch.float32)
        if entry.src in _VOCAB_ROWS and hf_vocab < spec.padded_vocab:
            padded = torch.zeros(entry.shape, dtype=torch.float32)
            padded[:hf_vocab] = tensor
            tensor = padded
        if entry.kind == NORMHEAD and entry.src == "tok_embeddings.weight":
            # A tied NormHead model, exported untied: the head must be the normalised embedding.
            assert embedding is not None, "hf_entries lists the embedding before the head"
            expected = F.normalize(embedding, dim=-1)
            if not torch.allclose(expected, tensor, rtol=1e-2, atol=1e-2 * float(expected.abs().max())):
                raise HFMismatchError(
                    [
                        Problem(
                            field("tied_embeddings"),
                            "true here, but lm_head.weight is not the "
                            "row-normalised embedding (the model is not a tied NormHead export)",
                            "set tiedEmbeddings: false",
                        )
                    ],
                    source,
                )
            continue
        if entry.kind == NORMHEAD:
            norms = tensor.norm(dim=-1)
            live = norms > 0
            if live.any() and not torch.allclose(norms[live], torch.ones_like(norms[live]), atol=1e-2):
                log.warning(
                    "%s: lm_head rows are not unit-norm; NormHead (spec.model.normHead) normalises them in "
                    "forward, so the loaded model's logits differ from the Hugging Face model's",
                    source,
                )
        if entry.src == "tok_embeddings.weight":
            embedding = tensor
            if spec.norm_head and spec.tied_embeddings and hf_tied(config):
                log.warning(
                    "%s: a tied model loaded into a tied NormHead spec: stagerun normalises the head rows in "
                    "forward, the Hugging Face model does not, so their logits differ",
                    source,
                )
        assert entry.src is not None, "only ZEROS entries have no source, and they are skipped above"
        yield entry.src, tensor


@contextlib.contextmanager
def _local_folder(path: str, device: torch.device) -> Iterator[Path]:
    """``path`` itself when local; else a local copy (made by local rank 0 of each node, shared by its ranks)."""
    import torch.distributed as dist

    fs, root = storage.resolve(path)
    if storage.is_local(fs):
        yield Path(root)
        return
    distributed = dist.is_available() and dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    tag = hashlib.sha256(f"{path}/{os.getppid() if distributed else os.getpid()}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"stagerun-hf-{tag}"
    error = None
    if local_rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            names = [CONFIG, INDEX] if fs.exists(storage.join(root, INDEX)) else [CONFIG]
            if INDEX in names:
                index = json.loads(fs.cat_file(storage.join(root, INDEX)))
                names += sorted(set(index["weight_map"].values()))
            else:
                names.append(WEIGHTS)
            for name in names:
                log.info("copying %s/%s to %s", path, name, folder)
                fs.get(storage.join(root, name), str(folder / name))
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = exc
    if distributed:  # every rank learns whether each node's copy succeeded (also the barrier before reading)
        flag = torch.tensor([0 if error is None else 1], device=device)
        dist.all_reduce(flag)
        if error is None and int(flag.item()):
            raise RuntimeError(f"copying {path} failed on another node: see that rank's log")
    if error is not None:
        raise error
    try:
        yield folder
    except BaseException:
        # No barrier on the way out of a failure: the other ranks may not reach it (they fail alike, or hang
        # in the next collective, which torchrun then ends).
        if local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if distributed:  # every rank of the node has read its tensors before the copy goes
        dist.barrier()
    if local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, spec, path: str) -> None:
    """Overwrite every parameter of ``model`` (built from the resolved ``spec``) with the HF model at ``path``.

    Collective when the model is sharded (all ranks call it). Raises HFMismatchError listing every
    ``spec.model.<field>`` that differs from config.json, before any tensor is read.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from ..model.transformer import canonical_name

    config = check_hf_folder(spec, path)
    params = {canonical_name(name): p for name, p in model.named_parameters()}
    device = next(iter(params.values())).device
    done = set()
    with _local_folder(path, device) as folder:
        weights = SafetensorsFolder(folder)
        for fqn, full in hf_tensors(spec, config, weights):
            if fqn not in params:
                raise RuntimeError(f"the model has no parameter {fqn}: was it built from this spec?")
            param = params[fqn]
            full = full.to(dtype=param.dtype)
            if isinstance(param, DTensor):
                full = full.to(param.device)
                local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(local.to_local())
            else:
                param.copy_(full.to(param.device))
            done.add(fqn)
    left = sorted(set(params) - done)
    if left:
        raise RuntimeError(f"{path}: no Hugging Face tensor for {', '.join(left)} (stagerun/HF mapping incomplete)")
    log.info("loaded %d tensors from %s (%s)", len(done), path, config.get("architectures", ["?"])[0])
