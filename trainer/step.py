"""One optimizer step: gradient accumulation over this rank's micro-batches, clipping, AdamW update."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from stagerun.core.spec.run import TrainingSpec

from .distill import teacher_targets
from .distributed import Topology
from .losses import compute_losses

IGNORE_INDEX = -100


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean cross-entropy over the global batch
    z_loss: float  # mean weighted z-loss term (0 when disabled)
    max_z_loss: float  # mean weighted max-z term (0 when disabled)
    distill_loss: float  # mean cross-entropy of the teacher's top-1 predictions (0 when not distilling)
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # target tokens in the global batch
    batch_checksum: float  # sum over the global batch of token x (position + 1): the same however it is split


def batch_checksum(micro_batches) -> float:
    """A fingerprint of this rank's inputs whose sum over ranks identifies the global batch (resume checks)."""
    total = 0
    for mb in micro_batches:
        weights = np.arange(1, mb.inputs.shape[1] + 1, dtype=np.int64)
        total += int((mb.inputs * weights).sum())
    return float(total)


def build_optimizer(model: torch.nn.Module, training: TrainingSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    opt = training.optimizer
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.0,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        foreach=True,  # deterministic and fast on CPU and GPU; fused AdamW does not take DTensors on CPU
    )


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global L2 gradient norm, then clip to ``max_norm``: correct when parameters live on different meshes.

    Under tensor parallelism the split matrices are DTensors on the (dp, tp) mesh while norms and embeddings
    are sharded on dp only; torch's clip_grad_norm_ (and torchtitan's) cannot combine norms across meshes,
    so each mesh's partial norm is reduced on its own and the squares are summed.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            key = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(key, []).append(param)
    squares = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # reduces the partial norm over that mesh's ranks
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if math.isfinite(max_norm):
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def train_step(
    model,
    optimizer,
    micro_batches,
    *,
    lr: float,
    topo: Topology,
    training: TrainingSpec,
    teacher=None,
    distill_weight: float = 0.0,
    vocab_size: int | None = None,
) -> StepResult:
    for group in optimizer.param_groups:
        group["lr"] = lr
    local_tokens = sum(int((mb.targets != IGNORE_INDEX).sum()) for mb in micro_batches)
    (global_tokens,) = topo.sum_over_loss([local_tokens])
    checksum = batch_checksum(micro_batches)
    sums = torch.zeros(4, dtype=torch.float64, device=topo.device)
    for mb in micro_batches:
        inputs = torch.from_numpy(mb.inputs).to(topo.device, non_blocking=True)
        targets = torch.from_numpy(mb.targets).to(topo.device, non_blocking=True)
        doc_ids = torch.from_numpy(mb.doc_ids).to(topo.device, non_blocking=True) if training.doc_masking else None
        teacher_tokens = None
        if teacher is not None:
            assert vocab_size is not None, "distillation needs the student's vocab_size"
            teacher_tokens = teacher_targets(teacher, inputs, doc_ids, vocab_size)
        logits = model(inputs, doc_ids)
        terms = compute_losses(
            logits,
            targets,
            z_loss_weight=training.z_loss,
            max_z_loss_weight=training.max_z_loss,
            ignore_index=IGNORE_INDEX,
            teacher_tokens=teacher_tokens,
            distill_weight=distill_weight,
        )
        # Dividing by the *global* token count (and summing gradients across ranks) gives the exact mean
        # over the global batch, however it is split into ranks and micro-batches.
        (terms.total / global_tokens).backward()
        distill_sum = terms.distill_sum if terms.distill_sum is not None else torch.zeros_like(terms.ce_sum)
        sums += torch.stack(
            [terms.ce_sum.detach(), terms.z_sum.detach(), terms.max_z_sum.detach(), distill_sum.detach()]
        ).double()
        del logits, terms
    max_norm = training.grad_clip if training.grad_clip > 0 else math.inf
    grad_norm = clip_grad_norm(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ce, z, max_z, distill, checksum = topo.sum_over_loss(sums.tolist() + [checksum])
    return StepResult(
        ce / global_tokens,
        z / global_tokens,
        max_z / global_tokens,
        distill / global_tokens,
        float(grad_norm),
        int(global_tokens),
        checksum,
    )
