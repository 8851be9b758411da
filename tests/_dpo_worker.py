"""torchrun worker for tests/test_dpo.py: the real dpo_step on an FSDP x TP layout against a single process, and
the step's host reads and collectives counted.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/_dpo_worker.py OUT.json --dp D --tp T

Every rank runs the single-process step (plain Transformers, the same init) on the whole global batch; the
distributed policy and reference (built and sharded alike, as train.py builds them) run dpo_step on this rank's
rows. Rank 0 writes, per case, the largest relative differences of the loss, the DPO metrics, the gradient norm and
every clipped gradient, plus the counts, and whether the reference models copied or loaded on the sharded layout
hold the policy's phase-start weights. The model and counting helpers are _tp_worker.py's.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.distributed as dist
from _gloo import finish, layout_args, start
from _tp_worker import Counting, distributed_model, relative
from test_dpo import CpuTopo, GradCapture, dpo_batch, make_pairs, make_spec, pack
from torch.distributed.tensor import DTensor

from stagerun.core.spec.model import architecture_fields
from stagerun.core.spec.run import DpoSpec, TrainingSpec
from stagerun.trainer import distributed as D
from stagerun.trainer.batch import StepBatch
from stagerun.trainer.checkpoint import CheckpointManager, ModelOptimizerState
from stagerun.trainer.dpo import References
from stagerun.trainer.model import Transformer, init_weights
from stagerun.trainer.step import build_optimizer, dpo_step

ROWS, PAIRS_PER_ROW, ROW_LEN, LR = 4, 2, 48, 1e-3
CASES = {"dpo": DpoSpec(beta=0.2), "dpo+nll": DpoSpec(beta=0.2, nll_weight=0.2)}


def rows() -> list[list]:
    pairs = make_pairs(ROWS * PAIRS_PER_ROW, seed=5)
    return [pairs[r * PAIRS_PER_ROW : (r + 1) * PAIRS_PER_ROW] for r in range(ROWS)]


def batch(row_pairs: list[list], global_pairs: int | None) -> StepBatch:
    return dpo_batch([pack([pairs], ROW_LEN) for pairs in row_pairs], global_pairs)  # one row per micro-batch


def single_process(dpo: DpoSpec, training: TrainingSpec):
    spec = make_spec()
    policy, reference = Transformer(spec), Transformer(spec)
    init_weights(policy, 0)
    init_weights(reference, 1)
    capture = GradCapture(policy)
    result = dpo_step(
        policy, reference.eval(), capture, batch(rows(), None), lr=LR, topo=CpuTopo(), training=training, dpo=dpo
    )
    return result, capture.grads


def run_case(dpo: DpoSpec, topo, known_pairs: bool) -> dict:
    training = TrainingSpec(grad_clip=0.5)  # small: the clipping is active
    expected, expected_grads = single_process(dpo, training)
    spec = make_spec()
    policy, reference = distributed_model(spec, topo, 0), distributed_model(spec, topo, 1)
    reference.eval().requires_grad_(False)
    optimizer = build_optimizer(policy, training, topo.device)
    grads: dict[str, torch.Tensor] = {}
    step = optimizer.step

    def recording_step(*args, **kwargs):  # the clipped gradients, just before the update
        for name, p in policy.named_parameters():
            grads[name] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
        return step(*args, **kwargs)

    optimizer.step = recording_step  # type: ignore[method-assign]
    per_rank = ROWS // topo.dp_size
    mine = rows()[topo.dp_rank * per_rank : (topo.dp_rank + 1) * per_rank]
    local = batch(mine, ROWS * PAIRS_PER_ROW if known_pairs else None)
    with Counting(topo) as counts:
        result = dpo_step(policy, reference, optimizer, local, lr=LR, topo=topo, training=training, dpo=dpo)
    dist.barrier()
    values, expected_values = result.resolve(), expected.resolve()
    assert result.dpo is not None and expected.dpo is not None
    ours, theirs = result.dpo._asdict(), expected.dpo._asdict()
    out = {f"{k}_rel": relative(ours[k], theirs[k]) for k in theirs if theirs[k] and k != "reward_accuracy"}
    # A mean reward can sit near 0 (a difference of two response log-probabilities of ~ -30): relative to the
    # rewards' scale, not to itself, or float32 rounding of the sums reads as a large relative error.
    scale = max(abs(theirs["chosen_reward"]), abs(theirs["rejected_reward"]))
    for k in ("chosen_reward", "rejected_reward", "reward_margin"):
        out[f"{k}_rel"] = abs(ours[k] - theirs[k]) / scale
    out["accuracy"] = [ours["reward_accuracy"], theirs["reward_accuracy"]]
    out["loss_rel"] = relative(values.loss, expected_values.loss)
    out["tokens"] = [values.tokens, expected_values.tokens]
    out["grad_norm"] = [values.grad_norm, expected_values.grad_norm]
    out["grad_rel"] = {k: relative(grads[k], expected_grads[k]) for k in expected_grads}
    out["same_params"] = sorted(grads) == sorted(expected_grads)
    out["reads"], out["all_reduces"] = counts.reads, counts.all_reduces
    out["finite"] = all(math.isfinite(v) for v in ours.values())
    return out


def reference_copies(topo, root: str) -> dict:
    """dpo.References on sharded models: a fresh phase copies the policy's shards, a mid-phase resume loads the
    phase-start checkpoint (DCP, collective), each the same full tensors as the policy it was taken from."""
    spec = make_spec()
    policy = distributed_model(spec, topo, 0)
    start = {k: v.full_tensor().clone() for k, v in policy.state_dict().items()}
    manager = CheckpointManager(root, keep=1)
    meta = {"tokens": 4096, "phase_index": 0, "model": architecture_fields(spec)}
    manager.save(4, {"train": ModelOptimizerState(policy, None)}, meta, phase_boundary=True)

    def build(s):
        with torch.device("meta"):
            model = Transformer(s)
        if topo.tp_size > 1:
            D.apply_tensor_parallel(model, topo)
        D.apply_fsdp(model, topo, None)
        return model.to_empty(device="cpu")  # uninitialised: the copy or the load must fill every shard

    phase = SimpleNamespace(index=1, name="dpo", kind="dpo", dpo=DpoSpec(), start_tokens=4096)
    fresh = References(spec, build, manager, 0).for_phase(phase, policy, fresh=True, first_tokens=4096)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # the policy trains on: a copy must not share its storage
    resumed = References(spec, build, manager, 0).for_phase(phase, policy, fresh=False, first_tokens=4096)
    out = {}
    for name, model in (("fresh", fresh), ("resumed", resumed)):
        state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        out[name] = sorted(state) == sorted(start) and all(torch.equal(state[k], start[k]) for k in start)
    return out


def main() -> None:
    args = layout_args()
    topo = start(args)
    results = {}
    for name, dpo in CASES.items():
        for known in (True, False):
            results[f"{name}/{'known' if known else 'counted'}"] = run_case(dpo, topo, known)
    root = [f"{args.out}.ckpt"]
    dist.broadcast_object_list(root)  # rank 0's path: every rank writes its shards into the same checkpoint
    references = reference_copies(topo, root[0])
    finish(args.out, {"steps": results, "references": references})


if __name__ == "__main__":
    main()
