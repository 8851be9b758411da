"""The optimizer step's pieces: global gradient-norm clipping, the optimizer, the batch fingerprint, the result.

The whole step on real process groups (losses, norm and gradients against a single process; no host reads; one
metrics all-reduce) is in tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stagerun.core.spec.run import OptimizerSpec, TrainingSpec
from stagerun.trainer.batch import batch_checksum
from stagerun.trainer.data.loader import MicroBatch
from stagerun.trainer.step import StepResult, build_optimizer, clip_grad_norm


def model_with_grads(scale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    model(torch.randn(5, 8)).pow(2).sum().mul(scale).backward()
    return model


@pytest.mark.parametrize("scale,max_norm", [(1.0, 0.5), (1e-3, 1.0), (10.0, float("inf"))])
def test_clip_grad_norm_matches_torch(scale, max_norm):
    ours, reference = model_with_grads(scale), model_with_grads(scale)
    norm = clip_grad_norm(ours.parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    if max_norm < norm.item():
        clipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in ours.parameters()))
        assert clipped.item() == pytest.approx(max_norm, rel=1e-5)


def test_weight_decay_skips_norms_and_biases():
    model = model_with_grads(1.0)
    optimizer = build_optimizer(model, TrainingSpec(), torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])


def test_batch_checksum_is_independent_of_the_split():
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 512, size=(8, 16))
    whole = [MicroBatch(inputs, inputs, np.zeros_like(inputs, dtype=np.int32), ["a"] * 8)]
    parts = [
        MicroBatch(inputs[i : i + 2], inputs[i : i + 2], np.zeros((2, 16), np.int32), ["a"] * 2) for i in range(0, 8, 2)
    ]
    assert batch_checksum(whole) == batch_checksum(parts[:2]) + batch_checksum(parts[2:])
    swapped = inputs.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    if swapped[0, 0] != inputs[0, 0]:
        assert batch_checksum([MicroBatch(swapped, swapped, whole[0].doc_ids, whole[0].sources)]) != batch_checksum(
            whole
        )


def test_optimizer_implementation_fused_or_foreach():
    model = model_with_grads(1.0)
    auto = build_optimizer(model, TrainingSpec(), torch.device("cpu"))
    assert auto.defaults["foreach"] is True and not auto.defaults["fused"]  # auto on CPU: foreach
    fused = TrainingSpec(optimizer=OptimizerSpec(implementation="fused"))
    with pytest.raises(ValueError, match=r"spec\.training\.optimizer\.implementation"):
        build_optimizer(model, fused, torch.device("cpu"))


def test_step_result_reads_the_device_once(monkeypatch):
    values = torch.tensor([12.0, 0.5, 0.25, 0.0, 99.0, 1.5, 4.0], dtype=torch.float64)
    result = StepResult(values)
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or original(t))
    assert (result.loss, result.z_loss, result.max_z_loss, result.distill_loss) == (3.0, 0.125, 0.0625, 0.0)
    assert (result.grad_norm, result.tokens, result.batch_checksum) == (1.5, 4, 99.0)
    assert len(reads) == 1
    assert result.resolve() is result.resolve()
