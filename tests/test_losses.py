"""Loss sums: cross-entropy, PaLM z-loss, Baichuan 2 max-z loss, distillation; fused with the head and chunked.

``lm_losses(hidden, weight, ...)`` computes the losses of the logits ``hidden @ weight.T``. With ``weight`` the
identity the logits are ``hidden`` itself, so the definitions are checked on given logits; the fused, chunked
computation is checked against plain F.cross_entropy on the full logits, values and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stagerun.trainer.losses import LossConfig, LossTerms, lm_losses


def compute_losses(logits, targets, *, chunk_tokens=4096, teacher_tokens=None, **weights) -> LossTerms:
    """The losses of given ``logits`` [..., V]: hidden = logits, head = identity."""
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
    config = LossConfig(chunk_tokens=chunk_tokens, **weights)
    return lm_losses(logits, eye, targets, config, teacher_tokens=teacher_tokens)


def batch(seed=0, vocab=37, ignore_some=True):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, vocab, generator=generator) * 4
    targets = torch.randint(0, vocab, (3, 5), generator=generator)
    if ignore_some:
        targets[0, :2] = -100
        targets[2, 4] = -100
    return logits, targets


def test_ce_sum_equals_torch_cross_entropy_sum():
    logits, targets = batch(ignore_some=False)
    terms = compute_losses(logits, targets)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(terms.ce_sum, expected)
    assert terms.count.item() == 15
    torch.testing.assert_close(terms.total, terms.ce_sum)


def test_ignored_targets_are_excluded_from_sum_and_count():
    logits, targets = batch()
    weights = dict(z_loss_weight=1e-4, max_z_loss_weight=2e-4)
    terms = compute_losses(logits, targets, **weights)
    keep = targets != -100
    assert terms.count.item() == keep.sum().item() == 12
    expected = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    torch.testing.assert_close(terms.ce_sum, expected)
    # Changing the logits of ignored positions changes nothing.
    shifted = logits.clone()
    shifted[~keep] += 100.0
    for a, b in zip(compute_losses(shifted, targets, **weights), terms):
        torch.testing.assert_close(a, b)
    # A custom ignore index.
    other = targets.masked_fill(~keep, 5000)
    torch.testing.assert_close(lm_losses(logits, torch.eye(37), other, LossConfig(ignore_index=5000)).ce_sum, expected)


def test_z_loss_is_weight_times_sum_of_log_z_squared():
    logits, targets = batch()
    terms = compute_losses(logits, targets, z_loss_weight=1e-4)
    by_hand = 0.0
    for b in range(3):
        for t in range(5):
            if targets[b, t] != -100:
                by_hand += torch.log(torch.exp(logits[b, t].double()).sum()).item() ** 2
    assert terms.z_sum.item() == pytest.approx(1e-4 * by_hand, rel=1e-5)
    assert terms.max_z_sum.item() == 0.0
    torch.testing.assert_close(terms.total, terms.ce_sum + terms.z_sum)


def test_max_z_loss_is_weight_times_sum_of_max_logit_squared():
    logits, targets = batch()
    terms = compute_losses(logits, targets, max_z_loss_weight=2e-4)
    by_hand = sum(logits[b, t].max().item() ** 2 for b in range(3) for t in range(5) if targets[b, t] != -100)
    assert terms.max_z_sum.item() == pytest.approx(2e-4 * by_hand, rel=1e-5)
    assert terms.z_sum.item() == 0.0
    torch.testing.assert_close(terms.total, terms.ce_sum + terms.max_z_sum)


def test_bf16_logits_give_float32_terms():
    logits, targets = batch()
    weights = dict(z_loss_weight=1e-4, max_z_loss_weight=2e-4)
    terms = compute_losses(logits.bfloat16(), targets, **weights)
    for name in ("ce_sum", "z_sum", "max_z_sum", "total"):
        assert getattr(terms, name).dtype == torch.float32, name
    # Same result as float32 math on the bf16-rounded logits.
    reference = compute_losses(logits.bfloat16().float(), targets, **weights)
    for a, b in zip(terms, reference):
        torch.testing.assert_close(a, b)


def test_zero_weights_give_exact_zeros():
    logits, targets = batch()
    terms = compute_losses(logits, targets)
    assert isinstance(terms, LossTerms)
    assert terms.z_sum.item() == 0.0 and terms.max_z_sum.item() == 0.0
    assert torch.equal(terms.total, terms.ce_sum)


def test_all_targets_ignored_gives_zero_not_nan():
    logits, targets = batch()
    terms = compute_losses(logits, torch.full_like(targets, -100), z_loss_weight=1e-4, max_z_loss_weight=2e-4)
    assert terms.count.item() == 0
    assert terms.total.item() == 0.0


def test_gradients_flow_through_every_term():
    logits, targets = batch()
    for weights in (dict(), dict(z_loss_weight=1e-2), dict(max_z_loss_weight=1e-2)):
        leaf = logits.clone().bfloat16().requires_grad_(True)
        terms = compute_losses(leaf, targets, **weights)
        (terms.total / terms.count).backward()
        assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16
        assert leaf.grad[targets != -100].abs().sum() > 0
        assert leaf.grad[targets == -100].abs().sum() == 0  # ignored positions get no gradient
    # The auxiliary terms push the normaliser / the max logit down.
    leaf = logits.clone().requires_grad_(True)
    compute_losses(leaf, targets, z_loss_weight=1.0).z_sum.backward()
    log_z = torch.logsumexp(logits, -1)
    keep = targets != -100
    expected = (2 * log_z[..., None] * logits.softmax(-1)) * keep[..., None]
    torch.testing.assert_close(leaf.grad, expected)


def test_distillation_objective_is_the_soft_target_cross_entropy():
    """AFM: target = w x one-hot(teacher top-1) + (1 - w) x one-hot(label), checked against the definition."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 0] = -100  # ignored positions stay ignored for both targets
    teacher = torch.randint(0, 11, (2, 5))
    weight = 0.9
    terms = compute_losses(logits, labels, teacher_tokens=teacher, distill_weight=weight)
    keep = labels != -100
    target = weight * torch.nn.functional.one_hot(teacher, 11).float()
    target += (1 - weight) * torch.nn.functional.one_hot(labels.clamp(min=0), 11).float()
    expected = -(target * torch.log_softmax(logits, dim=-1)).sum(-1)[keep].sum()
    torch.testing.assert_close(terms.total, expected)
    torch.testing.assert_close(
        terms.ce_sum,
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ),
    )
    assert terms.distill_sum is not None and terms.distill_sum > 0
    terms.total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    soft = logits.detach().clone().requires_grad_(True)
    (-(target * torch.log_softmax(soft, dim=-1)).sum(-1)[keep].sum()).backward()
    torch.testing.assert_close(logits.grad, soft.grad)


def test_distillation_weight_zero_is_plain_cross_entropy_and_no_teacher_means_none():
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 7), torch.randint(0, 7, (3,))
    plain = compute_losses(logits, labels)
    assert plain.distill_sum is None
    zero = compute_losses(logits, labels, teacher_tokens=torch.randint(0, 7, (3,)), distill_weight=0.0)
    torch.testing.assert_close(zero.total, plain.total)


# -- fused with the head, in chunks ----------------------------------------------------------------------------

N, D, V = 45, 24, 67  # N not a multiple of the chunk sizes below, V odd: no shape works by accident
WEIGHTS = dict(z_loss_weight=1e-2, max_z_loss_weight=2e-2, distill_weight=0.3)


def reference_terms(hidden, weight, targets, teacher, *, z_loss_weight, max_z_loss_weight, distill_weight):
    """The loss as the unfused head computed it: full float32 logits, F.cross_entropy, logsumexp, amax."""
    logits = (hidden @ weight.T).float()
    keep = targets != -100
    ce = F.cross_entropy(logits, targets, reduction="sum")
    distill = F.cross_entropy(logits, torch.where(keep, teacher, -100), reduction="sum")
    z = z_loss_weight * torch.logsumexp(logits, -1)[keep].square().sum()
    max_z = max_z_loss_weight * logits.amax(-1)[keep].square().sum()
    total = (1 - distill_weight) * ce + distill_weight * distill + z + max_z
    return dict(ce_sum=ce, z_sum=z, max_z_sum=max_z, distill_sum=distill, total=total)


def head_problem(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=generator).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, D, generator=generator) * 0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[::7] = -100
    teacher = torch.randint(0, V, (N,), generator=generator)
    return hidden, weight, targets, teacher


def grads_of(objective, *leaves):
    return torch.autograd.grad(objective, leaves, retain_graph=True)  # several objectives share one forward


@pytest.mark.parametrize("chunk", [1, 8, N, 4096])
def test_fused_chunked_losses_and_gradients_equal_full_logits_cross_entropy(chunk):
    hidden, weight, targets, teacher = head_problem()
    ours = lm_losses(hidden, weight, targets, LossConfig(chunk_tokens=chunk, **WEIGHTS), teacher_tokens=teacher)
    reference = reference_terms(hidden, weight, targets, teacher, **WEIGHTS)
    for name, expected in reference.items():
        torch.testing.assert_close(getattr(ours, name), expected, rtol=1e-5, atol=1e-5, msg=name)
    assert ours.count.item() == (targets != -100).sum().item()
    # Each term's own gradient, and a mix of them (the objective over a token count, plus a logged term).
    for name in ("ce_sum", "z_sum", "max_z_sum", "distill_sum"):
        ours_grads = grads_of(getattr(ours, name), hidden, weight)
        expected_grads = grads_of(reference[name], hidden, weight)
        for a, b in zip(ours_grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    mixed_ours = grads_of(ours.total / ours.count + 0.5 * ours.ce_sum, hidden, weight)
    mixed_ref = grads_of(reference["total"] / ours.count + 0.5 * reference["ce_sum"], hidden, weight)
    for a, b in zip(mixed_ours, mixed_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunks_never_hold_more_than_chunk_tokens_of_logits(monkeypatch):
    """The logits are computed chunk by chunk, in forward and (recomputed) in backward."""
    import stagerun.trainer.losses as losses

    rows: list[int] = []
    original = losses._chunk_logits

    def recording(hidden, weight):
        rows.append(hidden.shape[0])
        return original(hidden, weight)

    monkeypatch.setattr(losses, "_chunk_logits", recording)
    hidden, weight, targets, teacher = head_problem()
    terms = lm_losses(hidden, weight, targets, LossConfig(chunk_tokens=16, **WEIGHTS), teacher_tokens=teacher)
    terms.total.backward()
    assert rows == [16, 16, 13] * 2


def test_bf16_head_matches_the_unfused_bf16_head():
    """bf16 weights: the matmul in bf16, then float32 (as the unfused head's bf16 logits upcast by the loss)."""
    hidden, weight, targets, teacher = head_problem(dtype=torch.bfloat16)
    ours = lm_losses(hidden, weight, targets, LossConfig(chunk_tokens=8, **WEIGHTS), teacher_tokens=teacher)
    reference = reference_terms(hidden, weight, targets, teacher, **WEIGHTS)
    for name, expected in reference.items():
        torch.testing.assert_close(getattr(ours, name), expected, rtol=1e-5, atol=1e-4, msg=name)
    ours_grads = grads_of(ours.total, hidden, weight)
    reference_grads = grads_of(reference["total"], hidden, weight)
    for a, b in zip(ours_grads, reference_grads):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bf16 rounding of the gradients
