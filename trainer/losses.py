"""Language-model losses as *sums* over non-ignored tokens.

Sums, not means: with gradient accumulation and data parallelism the right normaliser is the number of target
tokens in the whole global batch (micro-batches and ranks hold different counts once documents are masked), so the
caller all-reduces ``count``, divides ``total`` by it, and backwards that. Each term is returned separately for
logging.

- ce: cross-entropy of the targets.
- z: PaLM's z-loss, weight * log^2 Z with Z the softmax normaliser (logsumexp of the logits): keeps log Z near 0
  so the logits do not drift (PaLM 1e-4; StableLM 2 found it neutral, so it is optional).
- distillation (AFM): with the teacher's top-1 tokens, the objective mixes the label cross-entropy with the
  cross-entropy of the teacher's prediction, ``(1 - w) ce(label) + w ce(teacher)``.
- max_z: Baichuan 2's max-z loss, weight * max_v(logit)^2 per token: stops a few logits from growing without
  bound, which destabilised inference with a large vocabulary (Baichuan 2: 2e-4).

Everything is computed in float32 even from bf16 logits: a bf16 logsumexp over 100k+ entries loses the precision
the loss differences live in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossTerms(NamedTuple):
    ce_sum: torch.Tensor  # float32 scalar: cross-entropy of the labels summed over non-ignored tokens
    z_sum: torch.Tensor  # float32 scalar: z-loss, weight applied (exactly 0 when the weight is 0)
    max_z_sum: torch.Tensor  # float32 scalar: max-z loss, weight applied (exactly 0 when the weight is 0)
    # A field may shadow tuple.count at run time; mypy rejects it, and the name is what callers and tests use.
    count: torch.Tensor  # type: ignore[assignment]  # int64 scalar: non-ignored target tokens
    total: torch.Tensor  # the objective: divide by the global count, then backward
    distill_sum: torch.Tensor | None = None  # float32 scalar: cross-entropy of the teacher's top-1 (when distilling)


def compute_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    z_loss_weight: float = 0.0,
    max_z_loss_weight: float = 0.0,
    ignore_index: int = -100,
    teacher_tokens: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> LossTerms:
    """Loss sums for ``logits`` [..., V] against ``targets`` [...] (targets equal to ``ignore_index`` are skipped)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab).float()
    flat_targets = targets.reshape(-1)
    keep = flat_targets != ignore_index
    zero = flat.new_zeros(())

    ce_sum = F.cross_entropy(flat, flat_targets, ignore_index=ignore_index, reduction="sum")
    z_sum = max_z_sum = zero
    if z_loss_weight:
        log_z = torch.logsumexp(flat, dim=-1)
        z_sum = z_loss_weight * torch.where(keep, log_z.square(), zero).sum()
    if max_z_loss_weight:
        max_logit = flat.amax(dim=-1)
        max_z_sum = max_z_loss_weight * torch.where(keep, max_logit.square(), zero).sum()
    objective = ce_sum
    distill_sum = None
    if teacher_tokens is not None:
        # AFM's target w x one-hot(teacher top-1) + (1 - w) x one-hot(label): cross-entropy is linear in the
        # target distribution, so it is the same mix of the two cross-entropies.
        teacher_flat = torch.where(keep, teacher_tokens.reshape(-1), ignore_index)
        distill_sum = F.cross_entropy(flat, teacher_flat, ignore_index=ignore_index, reduction="sum")
        objective = (1.0 - distill_weight) * ce_sum + distill_weight * distill_sum
    return LossTerms(
        ce_sum=ce_sum,
        z_sum=z_sum,
        max_z_sum=max_z_sum,
        count=keep.sum(),
        total=objective + z_sum + max_z_sum,
        distill_sum=distill_sum,
    )
