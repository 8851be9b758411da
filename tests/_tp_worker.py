"""torchrun worker for tests/test_tensor_parallel.py: the real train_step on a TP x FSDP layout against a
single-process reference, and the step's host syncs and collectives counted.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/_tp_worker.py OUT.json --dp D --tp T

Every rank builds the reference (a plain Transformer, no parallelism, the same init) and runs it on the whole
global batch; the distributed model runs train_step on this rank's share. Rank 0 writes, per case, the largest
relative differences of the loss terms, the gradient norm and every (clipped) gradient, plus the counts.
"""

from __future__ import annotations

import math
import traceback

import numpy as np
import torch
import torch.distributed as dist
from _gloo import finish, layout_args, start
from torch.distributed.tensor import DTensor

from stagerun.core.spec.model import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.core.spec.run import TrainingSpec
from stagerun.trainer import distributed as D
from stagerun.trainer.batch import StepBatch
from stagerun.trainer.data.loader import MicroBatch
from stagerun.trainer.losses import LossConfig
from stagerun.trainer.model import Transformer, init_weights
from stagerun.trainer.model.positions import document_positions
from stagerun.trainer.step import build_optimizer, train_step

SEQUENCES, SEQ_LEN, MICRO_BATCH, LR = 8, 16, 2, 1e-3
CASES = {
    "untied-rope": dict(model=dict(tied_embeddings=False), training=dict(z_loss=1e-3, max_z_loss=1e-3)),
    "tied-normhead-docmask": dict(
        model=dict(tied_embeddings=True, norm_head=True), training=dict(doc_masking=True, loss_chunk_tokens=5)
    ),
    # Per-head query/key norms (replicated weights under TP) and per-document RoPE positions without the mask.
    "qknorm-docpositions": dict(model=dict(qk_norm=True, position_ids="perDocument"), training=dict(z_loss=1e-3)),
    "alibi-normhead-distill": dict(
        model=dict(tied_embeddings=False, norm_head=True, position="alibi"), training=dict(max_z_loss=1e-3), distill=0.3
    ),
}


def global_batch(vocab: int) -> list[MicroBatch]:
    """The global batch as single-sequence micro-batches: tokens, shifted targets (some ignored), 2-3 documents."""
    rng = np.random.default_rng(0)
    sequences = []
    for row in range(SEQUENCES):
        tokens = rng.integers(0, vocab, size=SEQ_LEN + 1)
        targets = tokens[1:].copy()
        targets[: row % 3] = -100  # a few ignored targets: the token count differs per rank
        doc_ids = np.zeros(SEQ_LEN, dtype=np.int32)
        doc_ids[5 + row % 4 :] = 1
        doc_ids[11:] = 2
        sequences.append(MicroBatch(tokens[None, :-1], targets[None], doc_ids[None], ["a"]))
    return sequences


def stack(parts: list[MicroBatch]) -> MicroBatch:
    return MicroBatch(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("inputs", "targets", "doc_ids")), [])


def distributed_model(spec, topo: D.Topology, seed: int) -> Transformer:
    with torch.device("meta"):
        model = Transformer(spec)
    if topo.tp_size > 1:
        D.apply_tensor_parallel(model, topo)
    D.apply_fsdp(model, topo, None)
    model.to_empty(device="cpu")
    init_weights(model, seed)
    return model


def reference_step(spec, training: TrainingSpec, batch: MicroBatch, distill: float):
    """Loss terms, norm and clipped gradients of the whole global batch on one process."""
    model = Transformer(spec)
    init_weights(model, 0)
    teacher_tokens = None
    if distill:
        teacher = Transformer(spec)
        init_weights(teacher, 1)
        with torch.no_grad():
            teacher_tokens = teacher(torch.from_numpy(batch.inputs))[..., : spec.vocab_size].argmax(-1)
    config = LossConfig(training.z_loss, training.max_z_loss, distill, training.loss_chunk_tokens)
    doc_ids = torch.from_numpy(batch.doc_ids) if training.doc_masking else None
    terms = model(
        torch.from_numpy(batch.inputs),
        doc_ids,
        targets=torch.from_numpy(batch.targets),
        loss=config,
        teacher_tokens=teacher_tokens,
        positions=document_positions(torch.from_numpy(batch.doc_ids)),
    )
    count = terms.count.item()
    (terms.total / count).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip).item()
    values = dict(
        loss=terms.ce_sum.item() / count,
        z_loss=terms.z_sum.item() / count,
        max_z_loss=terms.max_z_sum.item() / count,
        distill_loss=terms.distill_sum.item() / count if terms.distill_sum is not None else 0.0,
        grad_norm=norm,
        tokens=count,
    )
    return values, {name: p.grad for name, p in model.named_parameters()}


class Counting:
    """Counts host reads of tensors and all-reduces while active (patching torch.Tensor and dist)."""

    READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")

    def __init__(self, topo: D.Topology) -> None:
        self.reads: dict[str, int] = {}
        self.groups = {"loss": topo.loss_mesh.get_group(), "tp": topo.tp_mesh.get_group()}
        self.all_reduces: dict[str, int] = {}

    def __enter__(self) -> Counting:
        self._saved = {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._wrap(name, original))
        self._all_reduce = dist.all_reduce

        def all_reduce(tensor, *args, group=None, **kwargs):
            name = next((k for k, g in self.groups.items() if g is group), f"other {group}")
            self.all_reduces[name] = self.all_reduces.get(name, 0) + 1
            return self._all_reduce(tensor, *args, group=group, **kwargs)

        dist.all_reduce = all_reduce
        return self

    def _wrap(self, name, original):
        def read(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]  # where the read happened, for the test's message
            # Not a sync: non-fused AdamW keeps its step count on the host and reads it there (on GPUs too).
            if caller.name != "_get_value" or not caller.filename.endswith("optim/optimizer.py"):
                where = f"{name} at {caller.filename}:{caller.lineno}"
                self.reads[where] = self.reads.get(where, 0) + 1
            return original(tensor, *args, **kwargs)

        return read

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        dist.all_reduce = self._all_reduce


def relative(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def run_case(name: str, case: dict, topo: D.Topology, known_tokens: bool) -> dict:
    spec = resolve_model(ModelSpec(preset="tiny", **case["model"]))
    training = TrainingSpec(grad_clip=0.5, **case["training"])  # small: the clipping is active
    distill = case.get("distill", 0.0)
    sequences = global_batch(spec.vocab_size)
    expected, expected_grads = reference_step(spec, training, stack(sequences), distill)

    model = distributed_model(spec, topo, 0)
    teacher = distributed_model(spec, topo, 1) if distill else None
    optimizer = build_optimizer(model, training, topo.device)
    grads: dict[str, torch.Tensor] = {}
    step = optimizer.step

    def recording_step(*args, **kwargs):  # the clipped gradients, just before the update
        for param_name, p in model.named_parameters():
            grad = p.grad
            grads[param_name] = grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()
        return step(*args, **kwargs)

    optimizer.step = recording_step  # type: ignore[method-assign]
    per_rank = SEQUENCES // topo.dp_size
    mine = sequences[topo.dp_rank * per_rank : (topo.dp_rank + 1) * per_rank]
    micro = [stack(mine[i : i + MICRO_BATCH]) for i in range(0, len(mine), MICRO_BATCH)]
    batch = StepBatch.from_micro_batches(
        micro, topo.device, doc_masking=training.doc_masking, global_tokens=expected["tokens"] if known_tokens else None
    )
    with Counting(topo) as counts:
        result = train_step(
            model,
            optimizer,
            batch,
            lr=LR,
            topo=topo,
            training=training,
            teacher=teacher,
            distill_weight=distill,
            vocab_size=spec.vocab_size,
        )
    dist.barrier()
    values = result.resolve()._asdict()
    out = {f"{key}_rel": relative(values[key], expected[key]) for key in expected if expected[key]}
    out["zero_terms"] = [key for key in expected if not expected[key] and values[key]]
    out["tokens"] = [values["tokens"], expected["tokens"]]
    out["grad_norm"] = [values["grad_norm"], expected["grad_norm"]]
    out["grad_rel"] = {k: relative(grads[k], expected_grads[k]) for k in expected_grads}
    out["same_params"] = sorted(grads) == sorted(expected_grads)
    out["reads"], out["all_reduces"] = counts.reads, counts.all_reduces
    out["finite"] = all(math.isfinite(v) for v in values.values())
    return out


def main() -> None:
    args = layout_args()
    topo = start(args)
    results = {}
    for name, case in CASES.items():
        for known_tokens in (True, False):
            results[f"{name}/{'known' if known_tokens else 'counted'}"] = run_case(name, case, topo, known_tokens)
    finish(args.out, results)


if __name__ == "__main__":
    main()
