"""One optimizer step: gradient accumulation over this rank's micro-batches, clipping, the optimizer's update.

The step never waits for the device: the global token count is known on the host (``StepBatch.global_tokens``) or
all-reduced on the device, the gradient norm stays a device tensor through clipping, and the step's metrics (loss
sums, checksum) are summed over the ranks in one float64 all-reduce that nobody reads back until a caller asks
(``StepResult.resolve``: one ``.tolist()``). So the host runs ahead and queues the next step's kernels while the
device still works on this one; the trainer reads the metrics only on steps it logs or checkpoints.

``dpo_step`` is the same step for a ``kind: dpo`` phase (dpo.py): the policy's per-token log-probabilities with
gradients, the frozen reference's without, the DPO objective normalised by the global pair count, and its sums in
the same single all-reduce. ``kind: sft`` phases run ``train_step`` as they are: the loader already sets every
target outside an assistant turn to IGNORE_INDEX, so the token divisor counts loss tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor

from stagerun.core.spec.optimizer import ResolvedOptimizer
from stagerun.core.spec.run import DpoSpec, TrainingSpec

from . import dpo as dpo_loss
from .batch import StepBatch
from .data.loader import MicroBatch
from .distill import teacher_targets
from .distributed import Topology, check_sequence_parallel
from .losses import LossConfig

# The float64 metrics vector: sums over the loss group up to _CHECKSUM, then the (already global) norm and count;
# a DPO step appends its dpo.DPO_SUMS sums (summed in the same all-reduce) from _DPO on.
_CE, _Z, _MAX_Z, _DISTILL, _CHECKSUM, _GRAD_NORM, _TOKENS, _DPO = range(8)


class StepValues(NamedTuple):
    loss: float  # mean cross-entropy over the global batch
    z_loss: float  # mean weighted z-loss term (0 when disabled)
    max_z_loss: float  # mean weighted max-z term (0 when disabled)
    distill_loss: float  # mean cross-entropy of the teacher's top-1 predictions (0 when not distilling)
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # target tokens in the global batch
    batch_checksum: float  # sum over the global batch of token x (position + 1): the same however it is split


@dataclass
class StepResult:
    """A step's metrics, still on the device. Reading any of them is one host sync, made once and cached."""

    values: torch.Tensor  # float64 [7] on the device, laid out as _CE ... _TOKENS; a DPO step's: [7 + DPO_SUMS]
    nll_weight: float | None = None  # a DPO step's dpo.nllWeight (the objective's mix); None: not a DPO step
    _host: StepValues | None = field(default=None, repr=False)
    _dpo: dpo_loss.DpoValues | None = field(default=None, repr=False)

    def resolve(self) -> StepValues:
        if self._host is None:
            v = self.values.tolist()
            if self.nll_weight is not None:
                self._dpo = dpo_loss.resolve_sums(v[_DPO:], self.nll_weight)
                self._host = _dpo_step_values(v, self._dpo)
                return self._host
            per_token = 1.0 / v[_TOKENS] if v[_TOKENS] else math.nan
            self._host = StepValues(
                loss=v[_CE] * per_token,
                z_loss=v[_Z] * per_token,
                max_z_loss=v[_MAX_Z] * per_token,
                distill_loss=v[_DISTILL] * per_token,
                grad_norm=v[_GRAD_NORM],
                tokens=int(v[_TOKENS]),
                batch_checksum=v[_CHECKSUM],
            )
        return self._host

    @property
    def loss(self) -> float:
        return self.resolve().loss

    @property
    def z_loss(self) -> float:
        return self.resolve().z_loss

    @property
    def max_z_loss(self) -> float:
        return self.resolve().max_z_loss

    @property
    def distill_loss(self) -> float:
        return self.resolve().distill_loss

    @property
    def grad_norm(self) -> float:
        return self.resolve().grad_norm

    @property
    def tokens(self) -> int:
        return self.resolve().tokens

    @property
    def batch_checksum(self) -> float:
        return self.resolve().batch_checksum

    @property
    def dpo(self) -> dpo_loss.DpoValues | None:
        """A DPO step's means (read with the other values: the same single host read); None for other steps."""
        self.resolve()
        return self._dpo


def _dpo_step_values(v: list[float], dpo: dpo_loss.DpoValues) -> StepValues:
    """A DPO step's values: ``loss`` is the objective (what the trainer checks for divergence and logs as loss),
    ``tokens`` its target tokens (chosen and rejected responses)."""
    return StepValues(
        loss=dpo.objective,
        z_loss=0.0,
        max_z_loss=0.0,
        distill_loss=0.0,
        grad_norm=v[_GRAD_NORM],
        tokens=int(v[_DPO + dpo_loss.TARGET_TOKENS]),
        batch_checksum=v[_CHECKSUM],
    )


class RMSpropMomentum(torch.optim.RMSprop):
    """torch's RMSprop with heavy-ball momentum (not centered), plus decoupled weight decay (AFM).

    Before each update p <- p - lr x decoupled_weight_decay x p, as AdamW decays. torch's own RMSprop
    ``weight_decay`` adds wd x p to the gradient (L2: coupled, so divided by the root of the squared-gradient
    average like the gradient is); it is kept at 0 and the decay lives in the group's ``decoupled_weight_decay``.
    """

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            decay = group["decoupled_weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if decay and params:
                torch._foreach_mul_(params, 1.0 - group["lr"] * decay)
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, training: TrainingSpec, device: torch.device) -> torch.optim.Optimizer:
    """``spec.training.optimizer``, with weight decay on matrices only (norm weights and biases are not decayed).

    AdamW: fused (one kernel for all parameters) on CUDA, foreach (multi-tensor kernels) elsewhere; torch's fused
    AdamW does not take DTensor parameters (every trainer parameter, under FSDP2) on CPU, so asking for it there
    fails. rmspropMomentum: :class:`RMSpropMomentum`, foreach. Each group's ``decay`` says whether weight decay
    applies to it (:func:`apply_phase_optimizer` sets the phase's values at each phase start).
    """
    fused = training.uses_fused_adamw(device.type == "cuda")
    if fused and device.type != "cuda":
        raise ValueError(
            "spec.training.optimizer.implementation: fused AdamW needs CUDA devices (torch's fused kernel does not "
            "take the sharded parameters on CPU); use auto or foreach on CPU"
        )
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    opt = training.optimizer
    if opt.type == "rmspropMomentum":
        return RMSpropMomentum(
            [
                {"params": decay, "decoupled_weight_decay": opt.weight_decay, "decay": True},
                {"params": no_decay, "decoupled_weight_decay": 0.0, "decay": False},
            ],
            lr=0.0,
            alpha=opt.beta2,
            eps=opt.eps,
            weight_decay=0.0,
            momentum=opt.momentum,
            centered=False,
            foreach=True,
        )
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt.weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False},
        ],
        lr=0.0,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        fused=fused,
        foreach=not fused,
    )


def apply_phase_optimizer(optimizer: torch.optim.Optimizer, settings: ResolvedOptimizer) -> None:
    """Set a phase's optimizer settings on every param group (in-process, at the phase's first step; after a
    resume too, as a loaded checkpoint restores the groups' values from when it was saved). A group without a
    ``decay`` key (an optimizer built elsewhere) counts as decayed."""
    for group in optimizer.param_groups:
        weight_decay = settings.weight_decay if group.get("decay", True) else 0.0
        group["eps"] = settings.eps
        if isinstance(optimizer, RMSpropMomentum):
            group["alpha"], group["momentum"] = settings.beta2, settings.momentum
            group["decoupled_weight_decay"] = weight_decay
        else:
            group["betas"] = (settings.beta1, settings.beta2)
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global L2 gradient norm (a device tensor), then clip the gradients to ``max_norm`` (inf: measure only).

    Under FSDP2 and tensor parallelism every gradient is a DTensor on the one (dp x tp) mesh (norms replicated
    over tp, see distributed.apply_tensor_parallel), so torch's norm combines them and ``full_tensor`` is its
    all-reduce. Clipping scales by the norm tensor on the device: no host sync.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _device_scalar(value: float, device: torch.device) -> torch.Tensor:
    """A float64 [1] tensor holding ``value``: a fill kernel, unlike torch.tensor(), which copies from host memory
    and on CUDA waits for the stream."""
    return torch.full((1,), float(value), dtype=torch.float64, device=device)


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """``phases[].optimizer.reset``: every moment and step count set to zero in place (the tensors stay allocated
    and sharded as they were, so a checkpoint's layout does not change). For AdamW and RMSprop zeros *are* the fresh
    state: the step count restarts bias correction and warm-up, the moments are rebuilt from the next gradients."""
    with torch.no_grad():
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()


def _global_tokens(batch: StepBatch, topo: Topology) -> torch.Tensor:
    if batch.global_tokens is not None:
        return _device_scalar(batch.global_tokens, topo.device)
    return topo.all_reduce_loss_(_device_scalar(batch.local_tokens, topo.device))


def train_step(
    model,
    optimizer,
    batch: StepBatch | Sequence[MicroBatch],
    *,
    lr: float,
    topo: Topology,
    training: TrainingSpec,
    teacher=None,
    distill_weight: float = 0.0,
    vocab_size: int | None = None,
    grad_clip: float | None = None,
) -> StepResult:
    """One step over ``batch`` (a StepBatch, or the loader's micro-batches, moved here). Collectives: the token
    count when ``batch.global_tokens`` is unset, FSDP's, the gradient norm's and one for the metrics.

    ``grad_clip``: the phase's (ResolvedOptimizer.grad_clip); unset: ``training.grad_clip``. 0 disables."""
    if not isinstance(batch, StepBatch):
        batch = StepBatch.from_micro_batches(batch, topo.device, doc_masking=training.doc_masking)
    for group in optimizer.param_groups:
        group["lr"] = lr
    tokens = _global_tokens(batch, topo)
    divisor = tokens.float()  # the loss is float32: dividing by a float64 tensor would promote the whole backward
    config = LossConfig(training.z_loss, training.max_z_loss, distill_weight, training.loss_chunk_tokens)
    sums = torch.zeros(4, dtype=torch.float64, device=topo.device)
    for mb in batch.micro_batches:
        if topo.tp_size > 1:
            check_sequence_parallel(mb.inputs.shape[1], topo.tp_size)
        teacher_tokens = None
        if teacher is not None:
            assert vocab_size is not None, "distillation needs the student's vocab_size"
            teacher_tokens = teacher_targets(teacher, mb.inputs, mb.doc_ids, vocab_size, mb.positions)
        terms = model(
            mb.inputs,
            mb.doc_ids,
            targets=mb.targets,
            loss=config,
            teacher_tokens=teacher_tokens,
            positions=mb.positions,
        )
        # Dividing by the *global* token count (and summing gradients across ranks) gives the exact mean
        # over the global batch, however it is split into ranks and micro-batches.
        (terms.total / divisor).backward()
        distill_sum = terms.distill_sum if terms.distill_sum is not None else torch.zeros_like(terms.ce_sum)
        sums += torch.stack([terms.ce_sum, terms.z_sum, terms.max_z_sum, distill_sum]).detach().double()
        del terms
    grad_norm = _update(model, optimizer, training, grad_clip)
    summed = topo.all_reduce_loss_(torch.cat([sums, _device_scalar(batch.checksum, topo.device)]))
    return StepResult(torch.cat([summed, grad_norm.detach().double().reshape(1), tokens]))


def _update(model, optimizer, training: TrainingSpec, grad_clip: float | None) -> torch.Tensor:
    """Clip (the phase's ``grad_clip``, else ``training.grad_clip``; 0 disables), step, clear the gradients."""
    clip = training.grad_clip if grad_clip is None else grad_clip
    max_norm = clip if clip > 0 else math.inf
    grad_norm = clip_grad_norm(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _pair_ids(mb) -> torch.Tensor:
    if mb.pair_ids is None:  # the loader sets them in every dpo phase: a batch without them is a wiring bug
        raise RuntimeError("a dpo step got a micro-batch without pair_ids (was it drawn for another phase?)")
    return mb.pair_ids


def _dpo_counts(batch: StepBatch, topo: Topology, with_chosen: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global batch's pair count (from the host when ``batch.global_pairs`` is known) and, ``with_chosen``, its
    chosen-response token count, as float32 device scalars; what the host does not know is summed over the loss
    group in one all-reduce on the device (no host sync)."""
    mbs = batch.micro_batches
    local: list[torch.Tensor] = []
    if batch.global_pairs is None:
        local.append(torch.stack([dpo_loss.local_pairs(_pair_ids(mb)) for mb in mbs]).sum())
    if with_chosen:
        local.append(torch.stack([dpo_loss.chosen_token_mask(_pair_ids(mb)).sum() for mb in mbs]).sum())
    summed = topo.all_reduce_loss_(torch.stack(local).double()) if local else None
    if batch.global_pairs is None:
        assert summed is not None
        pairs = summed[0].float()
    else:
        pairs = _device_scalar(batch.global_pairs, topo.device)[0].float()
    chosen = summed[-1].float() if with_chosen and summed is not None else None
    return pairs, chosen


def dpo_step(
    model,
    reference,
    optimizer,
    batch: StepBatch,
    *,
    lr: float,
    topo: Topology,
    training: TrainingSpec,
    dpo: DpoSpec,
    grad_clip: float | None = None,
) -> StepResult:
    """One DPO step over ``batch`` (its micro-batches carry ``pair_ids``): policy forward and backward, the frozen
    ``reference`` forward without gradients, then clipping and the update as in ``train_step``.

    Collectives: the pair count when ``batch.global_pairs`` is unset and the chosen-token count when the NLL term
    is on (both on the device, no host sync), FSDP's, the gradient norm's and one for all the metrics."""
    if topo.layout.cp > 1:
        # A response's log-probability would be split over the sequence shards; summing it needs the cp group.
        raise ValueError("kind: dpo phases do not support spec.phases[].parallelism.contextParallel > 1 (set it to 1)")
    for group in optimizer.param_groups:
        group["lr"] = lr
    global_pairs, chosen_tokens = _dpo_counts(batch, topo, with_chosen=bool(dpo.nll_weight))
    config = LossConfig(chunk_tokens=training.loss_chunk_tokens)
    sums = torch.zeros(dpo_loss.DPO_SUMS, dtype=torch.float64, device=topo.device)
    for mb in batch.micro_batches:
        if topo.tp_size > 1:
            check_sequence_parallel(mb.inputs.shape[1], topo.tp_size)
        kwargs = dict(targets=mb.targets, loss=config, positions=mb.positions, logprobs=True)
        with torch.no_grad():
            reference_tokens = reference(mb.inputs, mb.doc_ids, **kwargs)
        policy_tokens = model(mb.inputs, mb.doc_ids, **kwargs)
        terms = dpo_loss.dpo_terms(
            policy_tokens,
            reference_tokens,
            _pair_ids(mb),
            mb.targets,
            dpo,
            global_pairs=global_pairs,
            global_chosen_tokens=chosen_tokens,
        )
        terms.objective.backward()
        sums += terms.sums
        del terms, policy_tokens, reference_tokens
    grad_norm = _update(model, optimizer, training, grad_clip)
    zeros = torch.zeros(4, dtype=torch.float64, device=topo.device)  # ce, z, max-z, distill: not a DPO step's
    summed = topo.all_reduce_loss_(torch.cat([zeros, _device_scalar(batch.checksum, topo.device), sums]))
    norm = grad_norm.detach().double().reshape(1)
    tokens = summed[_GRAD_NORM + dpo_loss.TARGET_TOKENS :][:1]  # the DPO sums start where the norm will go
    values = torch.cat([summed[:_GRAD_NORM], norm, tokens, summed[_GRAD_NORM:]])
    return StepResult(values, nll_weight=dpo.nll_weight)
