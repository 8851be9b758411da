"""Loss sums: cross-entropy, PaLM z-loss, Baichuan 2 max-z loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stagerun.trainer.losses import LossTerms, compute_losses


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
    terms = compute_losses(logits, targets, z_loss_weight=1e-4, max_z_loss_weight=2e-4)
    keep = targets != -100
    assert terms.count.item() == keep.sum().item() == 12
    expected = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    torch.testing.assert_close(terms.ce_sum, expected)
    # Changing the logits of ignored positions changes nothing.
    shifted = logits.clone()
    shifted[~keep] += 100.0
    for a, b in zip(compute_losses(shifted, targets, z_loss_weight=1e-4, max_z_loss_weight=2e-4), terms):
        torch.testing.assert_close(a, b)
    # A custom ignore index.
    other = targets.masked_fill(~keep, 5000)
    torch.testing.assert_close(compute_losses(logits, other, ignore_index=5000).ce_sum, expected)


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
    terms = compute_losses(logits.bfloat16(), targets, z_loss_weight=1e-4, max_z_loss_weight=2e-4)
    for name in ("ce_sum", "z_sum", "max_z_sum", "total"):
        assert getattr(terms, name).dtype == torch.float32, name
    # Same result as float32 math on the bf16-rounded logits.
    reference = compute_losses(logits.bfloat16().float(), targets, z_loss_weight=1e-4, max_z_loss_weight=2e-4)
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


def test_distillation_weight_zero_is_plain_cross_entropy_and_no_teacher_means_none():
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 7), torch.randint(0, 7, (3,))
    plain = compute_losses(logits, labels)
    assert plain.distill_sum is None
    zero = compute_losses(logits, labels, teacher_tokens=torch.randint(0, 7, (3,)), distill_weight=0.0)
    torch.testing.assert_close(zero.total, plain.total)
