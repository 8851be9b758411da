"""Direct preference optimisation (DPO, Rafailov et al. 2023) in a ``kind: dpo`` phase: the loss of a step and the
frozen reference model beside the policy.

Per pair k of the global batch, with pi and ref the summed log-probabilities of a response's target tokens under the
policy and the reference, ``loss_k = -log sigmoid(beta x ((pi_c - ref_c) - (pi_r - ref_r)))``; the step's objective
is the mean over the global batch's pairs, plus ``nllWeight`` x the mean negative log-likelihood of the chosen
responses' tokens (Llama 3's 0.2; TRL's ``loss_type=["sigmoid", "sft"]`` with ``loss_weights``, its former
``rpo_alpha``). Both means are over the *global* batch: each rank's sums are divided by the global pair and chosen-
token counts before backward, so the result is the same however the batch is split over ranks and micro-batches.

The loader packs pairs into rows (trainer/data/loader.py): ``pair_ids`` [m, L] is 2k at the target positions of the
row's k-th pair's chosen response, 2k+1 at its rejected one's, -1 elsewhere. Sequence sums are one scatter-add.

The reference is built and sharded like the policy (the distillation teachers' machinery, distill.py), kept in eval
mode without gradients. Its weights: ``dpo.reference.checkpoint`` when set; else the policy's weights at the phase's
start, copied from the policy when the phase starts in this process, or loaded when a gang resumes mid-phase: from
the run's checkpoint at the phase's start tokens (the previous phase's last, which retention always keeps) or, for
a run's first phase, from ``spec.model.init`` (or the seeded init the run started from).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from stagerun.core.spec import ModelSpec, ResolvedPhase
from stagerun.core.spec.fields import Problem, SpecError
from stagerun.core.spec.run import DpoSpec

from .checkpoint import CheckpointInfo, CheckpointManager, ModelOptimizerState
from .distill import architecture_differences, committed_checkpoint

if TYPE_CHECKING:
    from .model import Transformer

log = logging.getLogger("stagerun.trainer")

# The float64 sums a DPO step adds to the step's metrics vector (step.py), in this order; each is a sum over pairs
# (or chosen tokens, or target tokens), divided on the host only when read.
DPO_LOSS, CHOSEN_REWARD, REJECTED_REWARD, ACCURACY, NLL, CHOSEN_TOKENS, PAIRS, TARGET_TOKENS = range(8)
DPO_SUMS = 8


class ReferenceUnavailable(SpecError):
    """A dpo phase's reference weights cannot be found or do not fit: no rerun fixes it (a SpecError: permanent,
    failure_advice.py), the message names the field and the fix."""

    def __init__(self, phase: ResolvedPhase, message: str, fix: str) -> None:
        field = f"spec.phases[{phase.index}].dpo.reference"
        super().__init__([Problem(field, message, fix)], field)


class PairSums(NamedTuple):
    logprobs: torch.Tensor  # [S, 2]: summed log-probabilities of (chosen, rejected) per pair slot
    present: torch.Tensor  # bool [S]: the slots that hold a pair (the rest are zeros)


def sequence_logprobs(token_logprobs: torch.Tensor, pair_ids: torch.Tensor) -> PairSums:
    """Summed log-probabilities of a micro-batch's pairs from the per-token ones [m, L] and ``pair_ids`` [m, L]
    (numbered per row); pairs are ordered row by row, then as numbered in their row.

    Only device ops, so the host never reads ``pair_ids`` back: each row's pair count is its highest id (2k + 1 for
    k + 1 pairs), the rows' offsets their running sum, and the output has a slot for as many pairs as could fit
    (each needs at least one target token per response: m x L / 2), of which the first ``present`` are pairs."""
    ids = pair_ids.long()
    per_row = torch.div(ids.amax(dim=1) + 2, 2, rounding_mode="floor")  # a row of -1 only: 0 pairs
    first = torch.cumsum(per_row, 0) - per_row
    slots = ids.numel() // 2
    # Positions outside any response go to one extra slot, dropped below.
    index = torch.where(ids >= 0, 2 * first[:, None] + ids, 2 * slots)
    sums = token_logprobs.new_zeros(2 * slots + 1)
    sums = sums.scatter_add(0, index.reshape(-1), token_logprobs.reshape(-1))
    present = torch.arange(slots, device=ids.device) < per_row.sum()
    return PairSums(sums[:-1].view(slots, 2), present)


def chosen_token_mask(pair_ids: torch.Tensor) -> torch.Tensor:
    """Where ``pair_ids`` marks a chosen response's target (even ids)."""
    return (pair_ids >= 0) & (pair_ids % 2 == 0)


class DpoTerms(NamedTuple):
    objective: torch.Tensor  # float32 scalar: this micro-batch's share of the global objective; backward it
    sums: torch.Tensor  # float64 [DPO_SUMS]: the metrics sums (detached)


def dpo_terms(
    policy_tokens: torch.Tensor,
    reference_tokens: torch.Tensor,
    pair_ids: torch.Tensor,
    targets: torch.Tensor,
    dpo: DpoSpec,
    *,
    global_pairs: torch.Tensor | float,
    global_chosen_tokens: torch.Tensor | float | None,
    ignore_index: int = -100,
) -> DpoTerms:
    """One micro-batch's DPO terms from per-token log-probabilities [m, L] of the policy (with grad) and the
    reference (without), ``pair_ids`` and ``targets`` [m, L]. ``global_pairs`` / ``global_chosen_tokens``: the
    whole global batch's counts (the latter only needed when ``dpo.nll_weight`` is set)."""
    policy, present = sequence_logprobs(policy_tokens, pair_ids)
    reference, _ = sequence_logprobs(reference_tokens.detach(), pair_ids)
    ratios = policy - reference  # [S, 2]: log pi/ref of chosen, rejected
    logits = dpo.beta * (ratios[:, 0] - ratios[:, 1])
    losses = torch.where(present, -F.logsigmoid(logits), 0.0)  # empty slots would each add log 2
    objective = losses.sum() / global_pairs
    chosen = chosen_token_mask(pair_ids)
    nll_sum = -(policy_tokens * chosen).sum()
    if dpo.nll_weight:
        assert global_chosen_tokens is not None, "the NLL term needs the global batch's chosen-token count"
        objective = objective + dpo.nll_weight * nll_sum / global_chosen_tokens
    rewards = dpo.beta * ratios.detach()
    sums = torch.stack(
        [
            losses.detach().sum(),
            rewards[:, 0].sum(),
            rewards[:, 1].sum(),
            ((rewards[:, 0] > rewards[:, 1]) & present).sum(),
            nll_sum.detach(),
            chosen.sum(),
            present.sum(),
            (targets != ignore_index).sum(),
        ]
    ).double()
    return DpoTerms(objective, sums)


def local_pairs(pair_ids: torch.Tensor) -> torch.Tensor:
    """The pairs in a micro-batch, counted on the device (int64 scalar)."""
    return torch.div(pair_ids.long().amax(dim=1) + 2, 2, rounding_mode="floor").sum()


class DpoValues(NamedTuple):
    """A DPO step's metrics, means over the global batch (TRL's names in brackets)."""

    loss: float  # mean -log sigmoid(beta x margin of log-ratios) over the pairs (the DPO loss without the NLL term)
    chosen_reward: float  # mean beta x (pi_c - ref_c)  [rewards/chosen]
    rejected_reward: float  # mean beta x (pi_r - ref_r)  [rewards/rejected]
    reward_margin: float  # chosen_reward - rejected_reward  [rewards/margins]
    reward_accuracy: float  # fraction of pairs with reward_c > reward_r  [rewards/accuracies]
    nll: float  # mean negative log-likelihood of the chosen responses' tokens
    pairs: int  # pairs in the global batch
    objective: float  # what was minimised: loss + nllWeight x nll


def resolve_sums(sums: list[float], nll_weight: float) -> DpoValues:
    """The means from the all-reduced sums (step.py reads them with the step's other values: one host sync)."""
    pairs = sums[PAIRS]
    per_pair = 1.0 / pairs if pairs else math.nan
    per_token = 1.0 / sums[CHOSEN_TOKENS] if sums[CHOSEN_TOKENS] else math.nan
    loss, nll = sums[DPO_LOSS] * per_pair, sums[NLL] * per_token
    chosen, rejected = sums[CHOSEN_REWARD] * per_pair, sums[REJECTED_REWARD] * per_pair
    return DpoValues(
        loss=loss,
        chosen_reward=chosen,
        rejected_reward=rejected,
        reward_margin=chosen - rejected,
        reward_accuracy=sums[ACCURACY] * per_pair,
        nll=nll,
        pairs=int(pairs),
        objective=loss + nll_weight * nll if nll_weight else loss,
    )


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class References:
    """The reference model of the current dpo phase, built at the phase's start and kept while consecutive dpo
    phases share it (the same ``reference.checkpoint``); a phase of another kind frees it.

    ``build``: builds an (uninitialised) model of a spec, parallelised like the policy (train.py passes the
    teachers' builder: eval-only, no activation checkpointing); ``manager``: the run's own checkpoints.
    """

    def __init__(
        self,
        policy_spec: ModelSpec,
        build: Callable[[ModelSpec], torch.nn.Module],
        manager: CheckpointManager,
        seed: int,
    ) -> None:
        self.spec, self._build, self.manager, self.seed = policy_spec, build, manager, seed
        self._key: tuple[str, int | str] | None = None
        self._model: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model

    def for_phase(
        self, phase: ResolvedPhase, policy: torch.nn.Module, *, fresh: bool, first_tokens: int
    ) -> torch.nn.Module | None:
        """The reference of ``phase`` (None outside dpo phases). Call at the phase's start, before its first step:
        ``fresh`` (the phase starts now, not mid-way after a resume) copies the policy's current weights.
        ``first_tokens``: the tokens seen before the phase's first step (core.plan.phase_first_tokens), where the
        checkpoint holding its starting weights is."""
        if phase.kind != "dpo" or phase.dpo is None:
            self._key = self._model = None
            return None
        url = phase.dpo.reference.checkpoint if phase.dpo.reference is not None else None
        key: tuple[str, int | str] = ("checkpoint", url) if url is not None else ("phase-start", phase.index)
        if key == self._key and self._model is not None:
            return self._model
        self._model = None  # the previous phase's reference goes before the next is built
        model = self._build(self.spec)
        if url is not None:
            self._load_checkpoint(model, phase, url)
        elif fresh:
            set_model_state_dict(model, get_model_state_dict(policy))
            log.warning("phase %s: reference = the policy's weights at the phase start", phase.name)
        else:
            self._load_phase_start(model, phase, first_tokens)
        self._model, self._key = _frozen(model), key
        return self._model

    def _load_checkpoint(self, model: torch.nn.Module, phase: ResolvedPhase, url: str) -> None:
        field = f"spec.phases[{phase.index}].dpo.reference.checkpoint"
        try:
            manager, info = committed_checkpoint(url, field, FileNotFoundError)
        except FileNotFoundError as exc:
            raise ReferenceUnavailable(
                phase, str(exc).removeprefix(f"{field}: "), "train that run first, or fix reference.checkpoint"
            ) from None
        self._load(model, phase, manager, info)

    def _load_phase_start(self, model: torch.nn.Module, phase: ResolvedPhase, first_tokens: int) -> None:
        at_start = [c for c in self.manager.committed() if c.tokens == first_tokens]
        if at_start:
            self._load(model, phase, self.manager, at_start[-1])
            return
        if first_tokens == 0:  # the run's first phase: it started from spec.model.init (or the seeded init)
            if self.spec.init is not None:
                from .model.initial_weights import load_initial_weights

                load_initial_weights(model, self.spec)
                log.warning("phase %s: reference = spec.model.init (%s)", phase.name, self.spec.init.path)
            else:
                from .model import init_weights

                init_weights(cast("Transformer", model), self.seed)
                log.warning("phase %s: reference = the seeded initial weights", phase.name)
            return
        raise ReferenceUnavailable(
            phase,
            f"the reference is the policy at the phase's start (token {first_tokens}), but no committed "
            f"checkpoint of that step is under {self.manager.url} (deleted by hand?)",
            "restore that checkpoint, or set reference.checkpoint to the weights the phase should stay close to",
        )

    def _load(self, model: torch.nn.Module, phase: ResolvedPhase, manager: CheckpointManager, info: CheckpointInfo):
        def check(meta: dict) -> None:  # before any tensor is read
            changed = architecture_differences(self.spec, meta)
            if changed is not None:
                raise ReferenceUnavailable(
                    phase,
                    f"checkpoint {info.path} holds another architecture than spec.model (fields that differ: "
                    f"{', '.join(changed)})",
                    "point reference.checkpoint at a run of the policy's architecture",
                )

        manager.load(info, {"train": ModelOptimizerState(model, None)}, check_meta=check)
        log.warning("phase %s: reference loaded from %s (step %d)", phase.name, info.path, info.step)
