"""torchrun worker for tests/test_context_parallel.py: the real train_step on a context-parallel (x FSDP) layout for
a few steps, against a single-process reference trained on the same global batches.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/_cp_worker.py OUT.json \
        --cp C [--dp D] [--tp T]

Every rank trains the reference (a plain Transformer, one process, the whole global batch in one micro-batch) and
the distributed model, which runs train_step on this rank's share: its data-parallel slice of the sequences, cut
by StepBatch.from_micro_batches(context=...) into this cp rank's two chunks of every sequence. Rank 0 writes, per
case and step, the relative differences of the loss and gradient norm, the token counts and batch checksums, and
after the last step the largest relative difference of every parameter.
"""

from __future__ import annotations

import numpy as np
import torch
from _gloo import finish, layout_args, start
from torch.distributed.tensor import DTensor

from stagerun.core.spec.model import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.core.spec.run import TrainingSpec
from stagerun.trainer import distributed as D
from stagerun.trainer.batch import StepBatch, batch_checksum
from stagerun.trainer.data.loader import MicroBatch
from stagerun.trainer.losses import LossConfig
from stagerun.trainer.model import Transformer, init_weights
from stagerun.trainer.model.attention import Attention
from stagerun.trainer.model.positions import document_positions
from stagerun.trainer.model.transformer import canonical_name
from stagerun.trainer.step import build_optimizer, train_step

SEQUENCES, SEQ_LEN, MICRO_BATCH, LR, STEPS = 8, 32, 2, 3e-3, 5
# The tiny preset is grouped-query (4 heads, 2 KV heads): only the KV heads are gathered. ``known``: the global
# token count is given (StepBatch.global_tokens, the pretraining loader's case), else counted over dp x cp.
CASES = {
    "causal": dict(model=dict(tied_embeddings=False), training=dict(z_loss=1e-3), known=False),
    "docmask-perdocument": dict(
        model=dict(position_ids="perDocument", qk_norm=True),
        training=dict(doc_masking=True, loss_chunk_tokens=5),
        known=True,
    ),
    "alibi-docmask": dict(model=dict(position="alibi"), training=dict(doc_masking=True), known=False),
    # Selective activation checkpointing (the GPU default) recomputes the block, K/V gather included, in backward.
    "docmask-selective-ac": dict(model=dict(), training=dict(doc_masking=True), known=True, ac="selective"),
}


def global_batch(vocab: int, step: int) -> list[MicroBatch]:
    """One step's global batch as single-sequence micro-batches: 2-4 documents a sequence, a few ignored targets."""
    rng = np.random.default_rng(step)
    sequences = []
    for row in range(SEQUENCES):
        tokens = rng.integers(0, vocab, size=SEQ_LEN + 1)
        targets = tokens[1:].copy()
        targets[: row % 3] = -100  # the token count differs per rank: the counted path is exercised
        doc_ids = np.zeros(SEQ_LEN, dtype=np.int32)
        for boundary in sorted(rng.choice(np.arange(1, SEQ_LEN), size=1 + row % 3, replace=False)):
            doc_ids[boundary:] += 1  # documents cross the chunk boundaries at random places
        sequences.append(MicroBatch(tokens[None, :-1], targets[None], doc_ids[None], ["a"]))
    return sequences


def stack(parts: list[MicroBatch]) -> MicroBatch:
    return MicroBatch(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("inputs", "targets", "doc_ids")), [])


def reference_run(spec, training: TrainingSpec) -> tuple[list[dict], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """STEPS steps of the whole global batch on one process, as train_step computes them; the parameters after
    the last step and the first step's clipped gradients."""
    model = Transformer(spec)
    init_weights(model, 0)
    optimizer = build_optimizer(model, training, torch.device("cpu"))
    config = LossConfig(training.z_loss, training.max_z_loss, 0.0, training.loss_chunk_tokens)
    history = []
    for step in range(STEPS):
        batch = stack(global_batch(spec.vocab_size, step))
        for group in optimizer.param_groups:
            group["lr"] = LR
        doc_ids = torch.from_numpy(batch.doc_ids)
        terms = model(
            torch.from_numpy(batch.inputs),
            doc_ids if training.doc_masking else None,
            targets=torch.from_numpy(batch.targets),
            loss=config,
            positions=document_positions(doc_ids),
        )
        count = terms.count.item()
        (terms.total / count).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip).item()
        if step == 0:
            first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(
            dict(loss=terms.ce_sum.item() / count, grad_norm=norm, tokens=count, checksum=batch_checksum([batch]))
        )
    return history, {name: p.detach().clone() for name, p in model.named_parameters()}, first_grads


def relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def run_case(case: dict, topo: D.Topology) -> dict:
    spec = resolve_model(ModelSpec(preset="tiny", **case["model"]))
    training = TrainingSpec(grad_clip=1.0, **case["training"])  # the clipping is active: norms are ~2-4
    expected, expected_params, expected_grads = reference_run(spec, training)

    with torch.device("meta"):
        model = Transformer(spec)
    if topo.tp_size > 1:
        D.apply_tensor_parallel(model, topo)
    D.apply_context_parallel(model, topo)
    D.apply_activation_checkpointing(model, case.get("ac", "none"))
    D.apply_fsdp(model, topo, None)
    model.to_empty(device="cpu")
    init_weights(model, 0)
    optimizer = build_optimizer(model, training, topo.device)
    grads: dict[str, torch.Tensor] = {}
    update = optimizer.step

    def recording_update(*args, **kwargs):  # the first step's clipped gradients, just before the update
        if not grads:
            for name, p in model.named_parameters():
                grads[canonical_name(name)] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
        return update(*args, **kwargs)

    optimizer.step = recording_update  # type: ignore[method-assign]
    steps = []
    for step in range(STEPS):
        sequences = global_batch(spec.vocab_size, step)
        per_rank = SEQUENCES // topo.dp_size
        mine = sequences[topo.dp_rank * per_rank : (topo.dp_rank + 1) * per_rank]
        micro = [stack(mine[i : i + MICRO_BATCH]) for i in range(0, len(mine), MICRO_BATCH)]
        batch = StepBatch.from_micro_batches(
            micro,
            topo.device,
            doc_masking=training.doc_masking,
            global_tokens=expected[step]["tokens"] if case["known"] else None,
            context=topo.context_shard,
        )
        assert all(mb.inputs.shape[1] == SEQ_LEN // topo.layout.cp for mb in batch.micro_batches)
        values = train_step(model, optimizer, batch, lr=LR, topo=topo, training=training).resolve()
        want = expected[step]
        steps.append(
            dict(
                loss_rel=relative(values.loss, want["loss"]),
                grad_norm_rel=relative(values.grad_norm, want["grad_norm"]),
                tokens=[values.tokens, want["tokens"]],
                checksum=[values.batch_checksum, want["checksum"]],
                loss=[values.loss, want["loss"]],
            )
        )
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        params[canonical_name(name)] = relative(full.detach(), expected_params[canonical_name(name)])
    grad_rel = {name: relative(grads[name], expected_grads[name]) for name in expected_grads}
    return dict(
        steps=steps,
        param_rel=params,
        grad_rel=grad_rel,
        same_params=sorted(params) == sorted(expected_params),
        flex_rel=flex_against_dense(model, batch, training.doc_masking),
    )


@torch.no_grad()
def flex_against_dense(model: Transformer, batch: StepBatch, doc_masking: bool) -> float:
    """The CUDA kernel choice (FlexAttention with a BlockMask over local queries x all keys), forced on CPU where
    it runs forward only, against the dense SDPA mask: the logits of this rank's shard."""
    mb = batch.micro_batches[0]
    attentions = [m for m in model.modules() if isinstance(m, Attention)]

    def logits(flex: bool) -> torch.Tensor:
        for attention in attentions:
            attention.use_flex = flex
        return model(mb.inputs, mb.doc_ids if doc_masking else None, positions=mb.positions)

    dense, flex = logits(False), logits(True)
    for attention in attentions:
        attention.use_flex = None
    return relative(flex, dense)


def main() -> None:
    args = layout_args(cp=2)
    topo = start(args)
    results = {name: run_case(case, topo) for name, case in CASES.items()}
    finish(args.out, results)


if __name__ == "__main__":
    main()
