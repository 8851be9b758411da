"""torchrun worker for tests/test_evaluation.py: the evaluation functions on a sharded layout (FSDP, CP, TP) against
the same functions on a plain single-process model with the same weights.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/_eval_worker.py OUT.json \
        --cp C [--dp D] [--tp T]

Held-out loss: the sharded value against the reference's. Needle: haystacks whose answers are the reference
model's own greedy predictions (so the reference scores 1.0 by construction), and the same with one answer token
changed in every sample (0.0): the sharded predictor must score exactly those, sample by sample.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from _gloo import finish, layout_args, start

from stagerun.core.spec.model import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.core.spec.run import NeedleEvalSpec
from stagerun.trainer import distributed as D
from stagerun.trainer.evaluation import held_out_loss, model_predictor, needle_accuracy, needle_set
from stagerun.trainer.model import Transformer, init_weights

SEQ_LEN, KEY = 64, 5


def sharded_model(spec, topo: D.Topology) -> Transformer:
    with torch.device("meta"):
        model = Transformer(spec)
    if topo.tp_size > 1:
        D.apply_tensor_parallel(model, topo)
    if topo.layout.cp > 1:
        D.apply_context_parallel(model, topo)
    D.apply_fsdp(model, topo, None)
    model.to_empty(device="cpu")
    init_weights(model, 0)
    return model


@torch.no_grad()
def main() -> None:
    args = layout_args(cp=2)
    topo = start(args)
    spec = resolve_model(ModelSpec(preset="tiny", tied_embeddings=False))
    reference = Transformer(spec)
    init_weights(reference, 0)
    model = sharded_model(spec, topo)

    tokens = np.random.default_rng(7).integers(0, spec.vocab_size, size=7 * SEQ_LEN + 1)  # 7 rows: uneven over dp
    want_loss, want_count = held_out_loss(reference, tokens, SEQ_LEN, micro_batch=2, chunk=50)
    loss, count = held_out_loss(model, tokens, SEQ_LEN, topo, micro_batch=2, chunk=50)

    needles = needle_set(spec.vocab_size, SEQ_LEN, NeedleEvalSpec(samples=5, key_tokens=KEY))
    greedy = model_predictor(reference)(torch.from_numpy(needles.inputs), KEY).numpy()
    own = needles.targets.copy()
    own[:, -KEY:] = greedy  # the reference's own answers: it solves every sample
    solvable = dataclasses.replace(needles, targets=own)
    spoiled = own.copy()
    spoiled[:, -2] = (spoiled[:, -2] + 1) % spec.vocab_size  # one answer token wrong in every sample
    unsolvable = dataclasses.replace(needles, targets=spoiled)
    results = {
        "loss": [loss, want_loss],
        "count": [count, want_count],
        "reference_accuracy": needle_accuracy(model_predictor(reference), solvable, micro_batch=2),
        "accuracy": needle_accuracy(model_predictor(model, topo), solvable, topo, micro_batch=2),
        "spoiled_accuracy": needle_accuracy(model_predictor(model, topo), unsolvable, topo, micro_batch=2),
    }
    finish(args.out, results)


if __name__ == "__main__":
    main()
