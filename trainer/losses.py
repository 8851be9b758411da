"""Language-model losses as *sums* over non-ignored tokens, fused with the LM head and computed in chunks.

Sums, not means: with gradient accumulation and data parallelism the right normaliser is the number of target
tokens in the whole global batch (micro-batches and ranks hold different counts once documents are masked), so the
caller divides ``total`` by the global count and backwards that. Each term is returned separately for logging.

- ce: cross-entropy of the targets.
- z: PaLM's z-loss, weight * log^2 Z with Z the softmax normaliser (logsumexp of the logits): keeps log Z near 0
  so the logits do not drift (PaLM 1e-4; StableLM 2 found it neutral, so it is optional).
- distillation (AFM): with the teacher's top-1 tokens, the objective mixes the label cross-entropy with the
  cross-entropy of the teacher's prediction, ``(1 - w) ce(label) + w ce(teacher)``.
- max_z: Baichuan 2's max-z loss, weight * max_v(logit)^2 per token: stops a few logits from growing without
  bound, which destabilised inference with a large vocabulary (Baichuan 2: 2e-4).

``target_logprobs`` is the per-token variant (each target's log-probability, not a sum) that preference losses
need (dpo.py sums it per response), fused and chunked the same way.

Memory: the logits of the whole micro-batch are never materialised. ``lm_losses`` takes the final hidden states
[N, D] and the head weight [V, D] and walks ``chunk_tokens`` tokens at a time: logits of one chunk in float32,
their logsumexp, max and target logits, then the chunk is freed. Backward recomputes each chunk's logits (one more
head matmul per chunk) and applies the analytic gradient; the alternative, computing the gradients during forward
and keeping them (Liger's fused linear cross-entropy), saves that matmul but holds dW for the whole head in float32
from forward to backward (2.1 GB for Llama 3 8B's head at tp 1), at the start of backward where activation memory
peaks. The head is ~6% of an 8B model's FLOPs, so the recompute costs ~2% of a step.

Everything is computed in float32 even from bf16 weights: a bf16 logsumexp over 100k+ entries loses the precision
the loss differences live in.

Tensor parallelism (loss parallel): the head is split by vocabulary rows, each rank holds V/tp rows starting at
``tp_rank * V/tp``; the per-token max, sum of exponentials and target logits are combined over the TP group (two
small all-reduces per chunk, three with max-z), so no rank ever gathers the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossConfig:
    """What the loss computes: the auxiliary weights, the distillation mix and the chunk size."""

    z_loss_weight: float = 0.0
    max_z_loss_weight: float = 0.0
    distill_weight: float = 0.0  # the teacher's share of the target when teacher tokens are given
    chunk_tokens: int = 4096  # spec.training.lossChunkTokens
    ignore_index: int = IGNORE_INDEX


class LossTerms(NamedTuple):
    ce_sum: torch.Tensor  # float32 scalar: cross-entropy of the labels summed over non-ignored tokens
    z_sum: torch.Tensor  # float32 scalar: z-loss, weight applied (exactly 0 when the weight is 0)
    max_z_sum: torch.Tensor  # float32 scalar: max-z loss, weight applied (exactly 0 when the weight is 0)
    # A field may shadow tuple.count at run time; mypy rejects it, and the name is what callers and tests use.
    count: torch.Tensor  # type: ignore[assignment]  # int64 scalar: non-ignored target tokens
    total: torch.Tensor  # the objective: divide by the global count, then backward
    distill_sum: torch.Tensor | None = None  # float32 scalar: cross-entropy of the teacher's top-1 (when distilling)


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows of the head: ``mesh`` is the TP mesh (None without tensor parallelism)."""

    mesh: DeviceMesh | None = None
    offset: int = 0  # global vocabulary id of the first local row

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group() if self.mesh is not None else None

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from this rank's [..., V_local] (an all-gather under tensor parallelism)."""
        if self.mesh is None:
            return logits
        return DTensor.from_local(logits, self.mesh, [Shard(logits.ndim - 1)]).full_tensor()


# Indices into the summed terms the autograd function returns.
_CE, _LSE2, _MAX2, _DISTILL = range(4)


def _all_reduce(tensor: torch.Tensor, shard: VocabShard, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if shard.group is not None:
        dist.all_reduce(tensor, op=op, group=shard.group)
    return tensor


def _local_logit(logits: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The logit of ``ids`` where this rank holds that row, else 0: summed over the TP ranks, the logit."""
    local = ids - shard.offset
    held = (local >= 0) & (local < logits.shape[1])
    value = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(held, value, 0.0)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # The matmul runs in the compute dtype (as the unfused head did); only its result is upcast.
    return (hidden @ weight.T).float()


def _argmax(logits: torch.Tensor, local_max: torch.Tensor, row_max: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Global vocabulary id of each row's max (the lowest id on ties, as torch.argmax picks)."""
    index = logits.argmax(dim=1) + shard.offset
    if shard.group is None:
        return index
    candidate = torch.where(local_max == row_max, index, torch.iinfo(index.dtype).max)
    return _all_reduce(candidate, shard, dist.ReduceOp.MIN)


class _ChunkStats(NamedTuple):
    row_max: torch.Tensor  # [C] max logit over the whole vocabulary
    argmax: torch.Tensor | None  # [C] its global id (only for max-z)
    lse: torch.Tensor  # [C] logsumexp over the whole vocabulary
    target_logit: torch.Tensor  # [C]
    teacher_logit: torch.Tensor | None  # [C]


def _chunk_stats(
    logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, shard: VocabShard, want_max: bool
) -> _ChunkStats:
    """Per-row statistics of one chunk's logits [C, V_local], combined over the TP ranks; consumes ``logits``."""
    local_max = logits.amax(dim=1)
    row_max = _all_reduce(local_max.clone(), shard, dist.ReduceOp.MAX)
    argmax = _argmax(logits, local_max, row_max, shard) if want_max else None
    # One all-reduce for the per-row sums: target logit, teacher logit, sum of exponentials.
    parts = [_local_logit(logits, targets, shard)]
    if teacher is not None:
        parts.append(_local_logit(logits, teacher, shard))
    parts.append(logits.sub_(row_max[:, None]).exp_().sum(dim=1))  # in place: one chunk-sized buffer
    summed = _all_reduce(torch.stack(parts), shard)
    teacher_logit = summed[1] if teacher is not None else None
    return _ChunkStats(row_max, argmax, row_max + summed[-1].log(), summed[0], teacher_logit)


class _FusedLinearLosses(torch.autograd.Function):
    """Summed loss terms of ``hidden @ weight.T`` without holding more than one chunk of logits.

    Returns float32 [4]: the sums over kept rows of ce, lse^2, max^2 and the teacher's ce (weights applied by the
    caller, so each term's gradient arrives on its own and any mix of them backpropagates exactly).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher, chunk, shard, want_max):
        keep = targets != IGNORE_INDEX
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        row_max = torch.empty(n, dtype=torch.float32, device=hidden.device)
        argmax = torch.zeros(n, dtype=torch.int64, device=hidden.device)
        sums = torch.zeros(4, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            kept = keep[rows]
            chunk_teacher = teacher[rows] if teacher is not None else None
            stats = _chunk_stats(_chunk_logits(hidden[rows], weight), targets[rows], chunk_teacher, shard, want_max)
            lse[rows], row_max[rows] = stats.lse, stats.row_max
            if stats.argmax is not None:
                argmax[rows] = stats.argmax
            kept_lse = torch.where(kept, stats.lse, 0.0)
            sums[_CE] += torch.where(kept, kept_lse - stats.target_logit, 0.0).sum()
            sums[_LSE2] += kept_lse.square().sum()
            sums[_MAX2] += torch.where(kept, stats.row_max, 0.0).square().sum()
            if stats.teacher_logit is not None:
                sums[_DISTILL] += torch.where(kept, kept_lse - stats.teacher_logit, 0.0).sum()
        # Saved per row: lse, max and argmax (12 bytes), so backward recomputes the logits without communicating.
        ctx.save_for_backward(hidden, weight, targets, teacher, lse, row_max, argmax)
        ctx.chunk, ctx.shard, ctx.want_max = chunk, shard, want_max
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        hidden, weight, targets, teacher, lse, row_max, argmax = ctx.saved_tensors
        shard: VocabShard = ctx.shard
        keep = (targets != IGNORE_INDEX).float()
        g_ce, g_lse2, g_max2, g_distill = grad_sums.float()
        n, chunk = hidden.shape[0], ctx.chunk
        grad_hidden = torch.empty_like(hidden)
        grad_weight: torch.Tensor | None = None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            kept = keep[rows]
            # d/dz of ce and distill: softmax - one-hot; of lse^2: 2 lse softmax; of max^2: 2 max one-hot(argmax).
            scale = g_ce + (g_distill if teacher is not None else 0.0) + 2.0 * g_lse2 * lse[rows]
            grad = _chunk_logits(hidden[rows], weight).sub_(lse[rows][:, None]).exp_().mul_((scale * kept)[:, None])
            _add_one_hot(grad, targets[rows], -g_ce * kept, shard)
            if teacher is not None:
                _add_one_hot(grad, teacher[rows], -g_distill * kept, shard)
            if ctx.want_max:
                _add_one_hot(grad, argmax[rows], 2.0 * g_max2 * row_max[rows] * kept, shard)
            grad = grad.to(hidden.dtype)
            grad_hidden[rows] = grad @ weight
            chunk_weight = grad.T @ hidden[rows]
            if n <= chunk:
                grad_weight = chunk_weight
            else:
                # Summed in float32: in bf16 every chunk's addition would round the running sum again.
                if grad_weight is None:
                    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                grad_weight += chunk_weight
        if grad_weight is None:  # no tokens at all
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def _add_one_hot(grad: torch.Tensor, ids: torch.Tensor, value: torch.Tensor, shard: VocabShard) -> None:
    """grad[i, ids[i]] += value[i] for the rows of ``ids`` this rank holds."""
    local = ids - shard.offset
    held = (local >= 0) & (local < grad.shape[1])
    grad.scatter_add_(1, local.clamp(0, grad.shape[1] - 1)[:, None], torch.where(held, value, 0.0)[:, None])


def lm_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    config: LossConfig = LossConfig(),
    *,
    teacher_tokens: torch.Tensor | None = None,
    shard: VocabShard = VocabShard(),
) -> LossTerms:
    """Loss sums of the head ``weight`` [V_local, D] applied to ``hidden`` [..., D], against ``targets`` [...].

    Targets equal to ``config.ignore_index`` are skipped; ``teacher_tokens`` (same shape, global vocabulary ids)
    turns on distillation. Under tensor parallelism ``weight`` holds this rank's rows (``shard``), ``hidden`` is the
    full (replicated) input, and the returned gradient of ``hidden`` is this rank's partial sum.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    if config.ignore_index != IGNORE_INDEX:
        flat_targets = flat_targets.masked_fill(flat_targets == config.ignore_index, IGNORE_INDEX)
    keep = flat_targets != IGNORE_INDEX
    teacher = None
    if teacher_tokens is not None:
        teacher = torch.where(keep, teacher_tokens.reshape(-1), IGNORE_INDEX)
    want_max = config.max_z_loss_weight != 0.0
    sums = _FusedLinearLosses.apply(flat, weight, flat_targets, teacher, config.chunk_tokens, shard, want_max)
    zero = sums.new_zeros(())
    # Copies, not views of ``sums``: FSDP hooks the root's outputs for backward, and an in-place op on a view of
    # an output would silently drop that hook.
    ce_sum = sums[_CE].clone()
    z_sum = config.z_loss_weight * sums[_LSE2] if config.z_loss_weight else zero
    max_z_sum = config.max_z_loss_weight * sums[_MAX2] if want_max else zero
    objective, distill_sum = ce_sum, None
    if teacher is not None:
        # AFM's target w x one-hot(teacher top-1) + (1 - w) x one-hot(label): cross-entropy is linear in the
        # target distribution, so it is the same mix of the two cross-entropies.
        distill_sum = sums[_DISTILL].clone()
        objective = (1.0 - config.distill_weight) * ce_sum + config.distill_weight * distill_sum
    return LossTerms(
        ce_sum=ce_sum,
        z_sum=z_sum,
        max_z_sum=max_z_sum,
        count=keep.sum(),
        total=objective + z_sum + max_z_sum,
        distill_sum=distill_sum,
    )


class _FusedTargetLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, one chunk of logits at a time (0 at ignored rows).

    The preference losses (dpo.py) need each token's log-probability, not a sum, so the output is [N]; the backward
    recomputes each chunk's logits like :class:`_FusedLinearLosses` and applies d logp / dz = one-hot - softmax.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, shard, shape):
        keep = targets != IGNORE_INDEX
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # Allocated in the caller's shape and filled through a flat view: the output is a tensor of its own, not a
        # view (FSDP2 warns when a wrapped module returns a view, as a later in-place op on it would skip its hook).
        shaped = torch.zeros(shape, dtype=torch.float32, device=hidden.device)
        logprobs = shaped.view(-1)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            stats = _chunk_stats(_chunk_logits(hidden[rows], weight), targets[rows], None, shard, False)
            lse[rows] = stats.lse
            logprobs[rows] = torch.where(keep[rows], stats.target_logit - stats.lse, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.shard = chunk, shard
        return shaped

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, lse = ctx.saved_tensors
        shard: VocabShard = ctx.shard
        # Ignored rows get no gradient whatever the caller sends back for them (their output is a constant 0).
        scale = torch.where(targets != IGNORE_INDEX, grad_logprobs.reshape(-1).float(), 0.0)
        n, chunk = hidden.shape[0], ctx.chunk
        grad_hidden = torch.empty_like(hidden)
        grad_weight: torch.Tensor | None = None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            g = scale[rows]
            grad = _chunk_logits(hidden[rows], weight).sub_(lse[rows][:, None]).exp_().mul_(-g[:, None])
            _add_one_hot(grad, targets[rows], g, shard)
            grad = grad.to(hidden.dtype)
            grad_hidden[rows] = grad @ weight
            chunk_weight = grad.T @ hidden[rows]
            if n <= chunk:
                grad_weight = chunk_weight
            else:  # float32 running sum, as in _FusedLinearLosses
                if grad_weight is None:
                    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                grad_weight += chunk_weight
        if grad_weight is None:
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = LossConfig.chunk_tokens,
    shard: VocabShard = VocabShard(),
) -> torch.Tensor:
    """float32 log-probability of each target under the head ``weight`` [V_local, D] applied to ``hidden`` [..., D]:
    shaped like ``targets``, 0 where a target is IGNORE_INDEX. Fused and chunked like :func:`lm_losses` (the logits
    are never held whole); under tensor parallelism the per-row max, target logit and normaliser are combined over
    ``shard``'s group, so every TP rank returns the same values and its partial gradient of ``hidden``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _FusedTargetLogprobs.apply(flat, weight, targets.reshape(-1), chunk_tokens, shard, tuple(targets.shape))
