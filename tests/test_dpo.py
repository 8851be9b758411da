"""Post-training in the step (issue 18): DPO against TRL, SFT masking, the optimizer reset, the dpo reference.

- The DPO loss and the policy's gradients equal TRL 1.16's DPOTrainer (its own ``compute_loss`` on a Hugging Face
  export of the same tiny model, reference and pairs), with and without the NLL term (TRL's ``sft`` loss type), and
  so do the reward metrics; stagerun's pairs are packed several to a row and split over micro-batches.
- A few DPO steps on CPU raise the reward margin and accuracy.
- SFT: masked targets change nothing, a response target does; packed conversations do not see each other.
- ``optimizer.reset`` zeroes the state at a fresh phase start only; the reference is the phase-start weights, also
  after a mid-phase resume, and a missing one is a permanent error naming spec.phases[i].dpo.reference.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stagerun.core.spec.model import ModelSpec, architecture_fields
from stagerun.core.spec.presets import resolve_model
from stagerun.core.spec.run import DpoSpec, ReferenceSpec, TrainingSpec
from stagerun.trainer.batch import DeviceMicroBatch, StepBatch, document_positions
from stagerun.trainer.checkpoint import CheckpointManager, ModelOptimizerState
from stagerun.trainer.dpo import References, ReferenceUnavailable, sequence_logprobs
from stagerun.trainer.failure_advice import classify
from stagerun.trainer.losses import IGNORE_INDEX, LossConfig, target_logprobs
from stagerun.trainer.model import Transformer, init_weights
from stagerun.trainer.step import dpo_step, reset_optimizer_state, train_step
from stagerun.trainer.trainer import Trainer

VOCAB = 128  # a multiple of the vocabulary padding: no padded rows, so HF and stagerun normalise over the same ids
EOS = 1
SPEC = dict(vocab_size=VOCAB, dim=32, layers=2, heads=4, kv_heads=2, ffn_hidden=64, max_seq_len=64)


def make_spec(**changes) -> ModelSpec:
    spec = resolve_model(ModelSpec(**{**SPEC, **changes}))
    assert spec.padded_vocab == VOCAB
    return spec


def random_model(spec: ModelSpec, seed: int) -> Transformer:
    """The stagerun init with the norm weights moved off 1, so every parameter matters to the comparison."""
    model = Transformer(spec)
    init_weights(model, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def make_pairs(count: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of different lengths, never EOS."""
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(2, VOCAB, size=n).tolist()

    return [(ids(3 + i % 3), ids(2 + i % 4), ids(4 - i % 3)) for i in range(count)]


class CpuTopo:
    """One process: what the step needs of distributed.Topology (nothing to reduce)."""

    device = torch.device("cpu")
    tp_size = 1
    layout = SimpleNamespace(cp=1, loss=1)
    is_main = True

    @staticmethod
    def all_reduce_loss_(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def pack(rows: list[list[tuple[list[int], list[int], list[int]]]], length: int) -> DeviceMicroBatch:
    """Pairs packed into rows as the dpo loader does: per pair, prompt+chosen+EOS then prompt+rejected+EOS, each its
    own document; targets only at the response tokens (the EOS separator is no target); pair_ids 2k / 2k+1."""
    m = len(rows)
    inputs = np.zeros((m, length), np.int64)
    targets = np.full((m, length), IGNORE_INDEX, np.int64)
    doc_ids = np.zeros((m, length), np.int32)
    pair_ids = np.full((m, length), -1, np.int32)
    for r, pairs in enumerate(rows):
        pos, doc = 0, 0
        for k, (prompt, chosen, rejected) in enumerate(pairs):
            for side, response in enumerate((chosen, rejected)):
                seq = prompt + response + [EOS]
                assert pos + len(seq) <= length, "row too short for its pairs"
                inputs[r, pos : pos + len(seq)] = seq
                doc_ids[r, pos : pos + len(seq)] = doc
                # The target at position i is token i + 1: the response tokens are targets of the positions before.
                first = pos + len(prompt) - 1
                targets[r, first : first + len(response)] = response
                pair_ids[r, first : first + len(response)] = 2 * k + side
                pos, doc = pos + len(seq), doc + 1
        doc_ids[r, pos:] = np.arange(doc, doc + length - pos)  # padding: one-token documents, no targets
    return DeviceMicroBatch(
        inputs=torch.from_numpy(inputs),
        targets=torch.from_numpy(targets),
        doc_ids=torch.from_numpy(doc_ids),
        positions=torch.from_numpy(document_positions(doc_ids)),
        pair_ids=torch.from_numpy(pair_ids),
    )


def dpo_batch(micro_batches: list[DeviceMicroBatch], global_pairs: int | None) -> StepBatch:
    local = sum(int((mb.targets != IGNORE_INDEX).sum()) for mb in micro_batches)
    return StepBatch(micro_batches, local, checksum=0.0, kind="dpo", global_pairs=global_pairs)


class GradCapture:
    """An optimizer stand-in that keeps the gradients the step produced (instead of applying them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.param_groups, self.grads = model, [{}], {}

    def step(self) -> None:
        self.grads = {name: p.grad.clone() for name, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


# ------------------------------------------------------------------------------------------ the fused log-probs


def test_target_logprobs_match_log_softmax_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (3, 10))
    targets[0, :4] = IGNORE_INDEX
    upstream = torch.randn(3, 10)
    ours = target_logprobs(hidden, weight, targets, chunk_tokens=7)  # chunks that straddle rows
    (ours * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = torch.where(targets != IGNORE_INDEX, full, 0.0)
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=1e-5)
    assert (ours[0, :4] == 0).all()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(grads[0], hidden.grad, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=2e-6, rtol=1e-5)


def test_sequence_logprobs_sum_each_response_with_pairs_numbered_per_row():
    mb = pack([make_pairs(2, 1), make_pairs(1, 2), []], 40)
    token = torch.arange(1, 121, dtype=torch.float32).reshape(3, 40)
    sums, present = sequence_logprobs(token, mb.pair_ids)
    assert present.tolist()[:4] == [True, True, True, False] and not present[3:].any()
    expected = []
    for r in range(3):
        for k in range(int(mb.pair_ids[r].max() + 1) // 2):
            expected.append([token[r][mb.pair_ids[r] == 2 * k + s].sum().item() for s in (0, 1)])
    assert sums[:3].tolist() == expected and (sums[3:] == 0).all()


# ------------------------------------------------------------------------------------------ against TRL 1.16


def _tokenizer():
    """A word-level tokenizer whose ids are the model's (``t<i>``): DPOTrainer needs one to start."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0", unk_token="t0")


def _hf(model: Transformer, spec: ModelSpec, folder: Path):
    from transformers import AutoModelForCausalLM

    from stagerun.trainer.hf.export import export_model

    export_model(model, spec, folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)


@pytest.mark.parametrize("nll_weight", [0.0, 0.2])
def test_dpo_loss_gradients_and_rewards_match_trl(nll_weight, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    import datasets
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from stagerun.trainer.hf.tensors import hf_entries

    spec, beta = make_spec(), 0.3
    policy, reference = random_model(spec, 1), random_model(spec, 2)
    pairs = make_pairs(5)

    # TRL: its trainer on the exported weights, its collator, its loss.
    monkeypatch.setenv("WANDB_DISABLED", "true")
    hf_policy, hf_reference = _hf(policy, spec, tmp_path / "policy"), _hf(reference, spec, tmp_path / "ref")
    words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    dataset = datasets.Dataset.from_list(
        [{"prompt": words(p), "chosen": words(c), "rejected": words(r)} for p, c, r in pairs]
    )
    loss_type, weights = (["sigmoid", "sft"], [1.0, nll_weight]) if nll_weight else (["sigmoid"], None)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=loss_type,
        loss_weights=weights,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=len(pairs),
        bf16=False,
        max_length=None,
    )
    trl = DPOTrainer(
        model=hf_policy, ref_model=hf_reference, args=args, train_dataset=dataset, processing_class=_tokenizer()
    )
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    inputs = DataCollatorForPreference(pad_token_id=0)(examples)
    trl.model.train()
    trl_loss = trl.compute_loss(trl.model, inputs)
    trl_loss.backward()
    metrics = {k: v[-1] for k, v in trl._metrics["train"].items()}

    # stagerun: the same pairs packed two and three to a row, over two micro-batches of one row each.
    micro_batches = [pack([pairs[:2]], 64), pack([pairs[2:]], 64)]
    capture = GradCapture(policy)
    result = dpo_step(
        policy,
        reference.eval(),
        capture,
        dpo_batch(micro_batches, global_pairs=None),  # the pair count all-reduced on the device
        lr=0.0,
        topo=CpuTopo(),
        training=TrainingSpec(),
        dpo=DpoSpec(beta=beta, nll_weight=nll_weight),
        grad_clip=0.0,
    )
    values, dpo = result.resolve(), result.dpo
    assert dpo is not None and dpo.pairs == len(pairs)
    assert values.loss == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert dpo.chosen_reward == pytest.approx(metrics["rewards/chosen"], rel=1e-4, abs=1e-6)
    assert dpo.rejected_reward == pytest.approx(metrics["rewards/rejected"], rel=1e-4, abs=1e-6)
    assert dpo.reward_margin == pytest.approx(metrics["rewards/margins"], rel=1e-4, abs=1e-6)
    assert dpo.reward_accuracy == pytest.approx(metrics["rewards/accuracies"])
    assert 0 < dpo.reward_accuracy < 1  # the comparison covers both outcomes
    hf_params = dict(hf_policy.named_parameters())
    for entry in hf_entries(spec):
        theirs, ours = hf_params[entry.hf].grad, capture.grads[entry.src]
        assert theirs is not None and ours.abs().max() > 0, entry.hf
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=2e-4, msg=lambda m, name=entry.hf: f"{name}: {m}")


def test_a_dpo_step_result_reads_the_device_once(monkeypatch):
    from stagerun.trainer.step import StepResult

    # ce, z, max-z, distill, checksum, norm, tokens; then dpo loss, chosen, rejected, accuracy, nll, chosen
    # tokens, pairs, target tokens (summed over 4 pairs)
    values = [0, 0, 0, 0, 99.0, 1.5, 30, 2.0, 0.8, -0.4, 3, 12.0, 16, 4, 30]
    result = StepResult(torch.tensor(values, dtype=torch.float64), nll_weight=0.5)
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or original(t))
    dpo = result.dpo
    assert dpo is not None and (dpo.loss, dpo.chosen_reward, dpo.rejected_reward) == (0.5, 0.2, -0.1)
    assert dpo.reward_margin == pytest.approx(0.3) and (dpo.reward_accuracy, dpo.nll, dpo.pairs) == (0.75, 0.75, 4)
    assert result.loss == 0.5 + 0.5 * 0.75 and result.tokens == 30 and result.grad_norm == 1.5
    assert len(reads) == 1
    assert StepResult(torch.zeros(7, dtype=torch.float64)).dpo is None


# ------------------------------------------------------------------------------------------ DPO trains


def test_a_few_dpo_steps_raise_the_margin_and_the_accuracy():
    spec = make_spec()
    policy = random_model(spec, 3)
    reference = random_model(spec, 3).eval()  # the policy at the phase start
    pairs = make_pairs(6, seed=4)
    batch = dpo_batch([pack([pairs[:3]], 64), pack([pairs[3:]], 64)], global_pairs=len(pairs))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)
    dpo, training = DpoSpec(beta=0.1, nll_weight=0.2), TrainingSpec()
    history = []
    for _ in range(8):
        result = dpo_step(policy, reference, optimizer, batch, lr=3e-3, topo=CpuTopo(), training=training, dpo=dpo)
        history.append(result.dpo)
    first, last = history[0], history[-1]
    assert first.reward_margin == pytest.approx(0.0, abs=1e-6) and first.reward_accuracy == 0.0  # policy == ref
    assert first.loss == pytest.approx(np.log(2.0), rel=1e-5)
    assert last.reward_margin > 0.5 and last.reward_accuracy == 1.0
    assert last.loss < first.loss
    assert all(b.reward_margin > a.reward_margin for a, b in zip(history[1:], history[2:]))


# ------------------------------------------------------------------------------------------ SFT masking


def _sft_batch(stream: np.ndarray, mask: np.ndarray, doc_ids: np.ndarray) -> DeviceMicroBatch:
    """inputs/targets the way the sft loader builds them from a stored stream and its loss mask: the target of
    position i is token i + 1 where that token carries the mask bit, else IGNORE_INDEX."""
    inputs, following = stream[:, :-1], stream[:, 1:]
    targets = np.where(mask[:, 1:], following, IGNORE_INDEX)
    ids = doc_ids[:, :-1]
    return DeviceMicroBatch(
        torch.from_numpy(inputs),
        torch.from_numpy(targets),
        torch.from_numpy(ids),
        torch.from_numpy(document_positions(ids)),
    )


def _sft_loss_and_grads(spec: ModelSpec, mb: DeviceMicroBatch) -> tuple[float, int, dict[str, torch.Tensor]]:
    model = random_model(spec, 5)
    capture = GradCapture(model)
    batch = StepBatch([mb], local_tokens=int((mb.targets != IGNORE_INDEX).sum()), checksum=0.0)  # count on device
    result = train_step(model, capture, batch, lr=0.0, topo=CpuTopo(), training=TrainingSpec(), grad_clip=0.0)
    return result.loss, result.tokens, capture.grads


def test_sft_masked_targets_change_nothing_and_a_response_target_does():
    spec = make_spec()
    rng = np.random.default_rng(7)
    stream = rng.integers(2, VOCAB, size=(2, 33))
    mask = np.zeros((2, 33), bool)
    mask[:, 10:18] = mask[:, 25:31] = True  # two assistant turns per row
    doc_ids = np.zeros((2, 33), np.int32)
    loss, tokens, grads = _sft_loss_and_grads(spec, _sft_batch(stream, mask, doc_ids))
    assert tokens == 2 * (8 + 6)  # the divisor counts loss tokens only
    prompt_changed = stream.copy()
    prompt_changed[:, 20:25] = rng.integers(2, VOCAB, size=(2, 5))
    prompt_changed[:, 0] = (prompt_changed[:, 0] + 1) % VOCAB  # position 0 is nobody's target
    # Only the *targets* differ: keep the inputs, as the question is whether masked labels leak into the loss.
    a = _sft_batch(stream, mask, doc_ids)
    b = _sft_batch(prompt_changed, mask, doc_ids)
    b = DeviceMicroBatch(a.inputs, b.targets, a.doc_ids, a.positions)
    loss_b, _, grads_b = _sft_loss_and_grads(spec, b)
    assert loss_b == loss
    assert all(torch.equal(grads[k], grads_b[k]) for k in grads)
    response_changed = stream.copy()
    response_changed[0, 12] = (response_changed[0, 12] + 1) % VOCAB
    c = _sft_batch(response_changed, mask, doc_ids)
    loss_c, _, grads_c = _sft_loss_and_grads(spec, DeviceMicroBatch(a.inputs, c.targets, a.doc_ids, a.positions))
    assert loss_c != loss and not torch.equal(grads["output.weight"], grads_c["output.weight"])
    # And the loss is the mean cross-entropy over the response targets alone.
    model = random_model(spec, 5)
    with torch.no_grad():
        logits = model(a.inputs, a.doc_ids)
    kept = a.targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[kept], a.targets[kept])
    assert loss == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("position_ids", ["sequence", "perDocument"])
def test_packed_conversations_do_not_attend_to_each_other(position_ids):
    spec = make_spec(position_ids=position_ids)
    model = random_model(spec, 6).eval()
    rng = np.random.default_rng(8)
    first, second = rng.integers(2, VOCAB, size=11), rng.integers(2, VOCAB, size=9)
    packed = np.concatenate([first, second])[None]
    doc_ids = np.array([[0] * 11 + [1] * 9], np.int32)
    alone = second[None]
    config = LossConfig()

    def logprobs(tokens: np.ndarray, docs: np.ndarray) -> torch.Tensor:
        inputs = torch.from_numpy(tokens[:, :-1])
        targets = torch.from_numpy(tokens[:, 1:]).clone()
        ids = torch.from_numpy(docs[:, :-1])
        with torch.no_grad():
            return model(
                inputs,
                ids,
                targets=targets,
                loss=config,
                positions=torch.from_numpy(document_positions(docs[:, :-1])),
                logprobs=True,
            )

    together = logprobs(packed, doc_ids)[0, 11:]  # conversation 2's tokens predicting its next tokens
    separate = logprobs(alone, np.zeros((1, 9), np.int32))[0]
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)
    # Without the document mask the second conversation does see the first: the check can fail.
    with torch.no_grad():
        plain = model(
            torch.from_numpy(packed[:, :-1]),
            None,
            targets=torch.from_numpy(packed[:, 1:]).clone(),
            loss=config,
            logprobs=True,
        )
    assert not torch.allclose(plain[0, 11:], separate, atol=1e-3)


# ------------------------------------------------------------------------------------------ optimizer reset


def _trained_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _phase(
    index: int,
    start_tokens: int,
    *,
    first_tokens: int | None = None,
    reset: bool = True,
    kind: str = "sft",
    dpo: DpoSpec | None = None,
):
    """A phase stand-in; ``first_tokens``: where its first step starts (past ``start_tokens`` when the previous
    phase's last step overshot its budget; core.plan.phase_first_tokens computes it for a real run)."""
    from stagerun.core.spec.optimizer import ResolvedOptimizer

    return SimpleNamespace(
        index=index,
        name=f"p{index}",
        start_tokens=start_tokens,
        first_tokens=start_tokens if first_tokens is None else first_tokens,
        reset_optimizer=reset,
        kind=kind,
        dpo=dpo,
        optimizer=ResolvedOptimizer("adamw", 0.9, 0.95, 0.0, 1e-8, 0.1, 1.0),
        rope=None,
    )


def _start_phase(optimizer, tokens: int, phase, monkeypatch) -> None:
    import stagerun.trainer.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "phase_first_tokens", lambda run, phase: phase.first_tokens)
    trainer = SimpleNamespace(optimizer=optimizer, tokens=tokens, topo=CpuTopo(), references=None, model=None, run=None)
    Trainer._start_phase(trainer, SimpleNamespace(phase=phase))  # type: ignore[arg-type]


def test_optimizer_reset_zeroes_the_state_only_when_the_phase_starts_fresh(monkeypatch):
    model, optimizer = _trained_optimizer()
    before = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    kept = [
        (5000, _phase(1, start_tokens=4096)),  # a resume mid-phase
        (4096, _phase(1, start_tokens=4096, reset=False)),  # no reset asked
        (4000, _phase(1, start_tokens=4000, first_tokens=4096)),  # not a step of this run: its first is at 4096
    ]
    for tokens, phase in kept:
        _start_phase(optimizer, tokens=tokens, phase=phase, monkeypatch=monkeypatch)
        assert all(torch.equal(before[k], v) for k, v in optimizer.state[model.weight].items())
    # The phase's first step, past its start_tokens (the previous phase's last step overshot): reset.
    _start_phase(optimizer, tokens=4096, phase=_phase(1, start_tokens=4000, first_tokens=4096), monkeypatch=monkeypatch)
    state = optimizer.state[model.weight]
    assert state["step"].item() == 0 and state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0
    # Zeroed state is the fresh state: the next update equals a new optimizer's first one.
    fresh_model = torch.nn.Linear(4, 3)
    fresh_model.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    x = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (fresh_model, fresh)):
        m(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(model.weight, fresh_model.weight)


def test_reset_optimizer_state_zeroes_rmsprop_too():
    from stagerun.trainer.step import RMSpropMomentum

    model = torch.nn.Linear(4, 3)
    optimizer = RMSpropMomentum(
        [{"params": list(model.parameters()), "decoupled_weight_decay": 0.0}], lr=1e-2, momentum=0.9, foreach=True
    )
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    reset_optimizer_state(optimizer)
    assert all(float(v.abs().sum()) == 0 for s in optimizer.state.values() for v in s.values())


# ------------------------------------------------------------------------------------------ the reference


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save(manager: CheckpointManager, model, spec, step: int, tokens: int, phase_index: int, boundary: bool) -> None:
    meta = {"tokens": tokens, "phase_index": phase_index, "model": architecture_fields(spec)}  # as the trainer saves
    manager.save(step, {"train": ModelOptimizerState(model, None)}, meta, phase_boundary=boundary)


def test_the_reference_is_the_phase_start_weights_fresh_and_after_a_mid_phase_resume(tmp_path):
    spec = make_spec()
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep=1)
    policy = random_model(spec, 10)
    at_start = _params(policy)
    _save(manager, policy, spec, step=4, tokens=4096, phase_index=0, boundary=True)  # the sft phase's end
    # The budgets put the phase's start at 4,000 tokens; the sft phase's last whole step ran on to 4,096, where the
    # dpo phase's first step starts (core.plan.phase_first_tokens) and the phase-end checkpoint is.
    phase = _phase(1, start_tokens=4000, kind="dpo", dpo=DpoSpec())
    built = []
    build = lambda s: built.append(Transformer(s)) or built[-1]  # noqa: E731

    fresh = References(spec, build, manager, seed=0).for_phase(phase, policy, fresh=True, first_tokens=4096)
    assert all(torch.equal(v, at_start[k]) for k, v in fresh.state_dict().items())
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())

    with torch.no_grad():  # the phase trains on, then a mid-phase checkpoint is the newest: retention keep=1
        for p in policy.parameters():
            p.add_(0.5)
    _save(manager, policy, spec, step=6, tokens=6144, phase_index=1, boundary=False)
    assert [c.step for c in manager.committed()] == [4, 6]  # the phase end survives keep=1
    resumed = References(spec, build, manager, seed=0).for_phase(phase, policy, fresh=False, first_tokens=4096)
    assert all(torch.equal(v, at_start[k]) for k, v in resumed.state_dict().items())
    assert not torch.equal(policy.output.weight, resumed.output.weight)

    # A phase that goes on keeps its reference; another kind frees it.
    references = References(spec, build, manager, seed=0)
    first = references.for_phase(phase, policy, fresh=True, first_tokens=4096)
    assert references.for_phase(phase, policy, fresh=False, first_tokens=4096) is first
    sft = _phase(2, 8192, kind="sft")
    assert references.for_phase(sft, policy, fresh=True, first_tokens=8192) is None and references.model is None


def test_the_reference_from_its_own_checkpoint_or_the_runs_first_weights(tmp_path):
    spec = make_spec()
    other = CheckpointManager(str(tmp_path / "other"), keep=1)
    weights = random_model(spec, 11)
    _save(other, weights, spec, step=9, tokens=9000, phase_index=0, boundary=True)
    dpo = DpoSpec(reference=ReferenceSpec(checkpoint=str(tmp_path / "other")))
    own = CheckpointManager(str(tmp_path / "own"), keep=1)
    policy = random_model(spec, 12)
    ref = References(spec, Transformer, own, seed=0).for_phase(
        _phase(1, 0, kind="dpo", dpo=dpo), policy, fresh=True, first_tokens=0
    )
    assert all(torch.equal(v, weights.state_dict()[k]) for k, v in ref.state_dict().items())
    # The run's first phase resumed mid-way without spec.model.init: the seeded init it started from.
    seeded = Transformer(spec)
    init_weights(seeded, 3)
    ref = References(spec, Transformer, own, seed=3).for_phase(
        _phase(0, 0, kind="dpo", dpo=DpoSpec()), policy, fresh=False, first_tokens=0
    )
    assert all(torch.equal(v, seeded.state_dict()[k]) for k, v in ref.state_dict().items())


def test_a_missing_reference_is_a_permanent_error_naming_the_field(tmp_path):
    spec = make_spec()
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep=1)
    policy = random_model(spec, 13)
    _save(manager, policy, spec, step=6, tokens=6144, phase_index=1, boundary=False)  # the phase start is gone
    with pytest.raises(ReferenceUnavailable, match=r"spec\.phases\[1\]\.dpo\.reference") as error:
        References(spec, Transformer, manager, 0).for_phase(
            _phase(1, 4096, kind="dpo", dpo=DpoSpec()), policy, fresh=False, first_tokens=4096
        )
    assert "token 4096" in str(error.value) and classify(error.value) is not None
    missing = DpoSpec(reference=ReferenceSpec(checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(ReferenceUnavailable, match=r"spec\.phases\[2\]\.dpo\.reference.*nowhere"):
        References(spec, Transformer, manager, 0).for_phase(
            _phase(2, 0, kind="dpo", dpo=missing), policy, fresh=True, first_tokens=0
        )
    wider = random_model(make_spec(dim=64), 14)
    _save(CheckpointManager(str(tmp_path / "wide"), keep=1), wider, make_spec(dim=64), 1, 10, 0, True)
    other_arch = DpoSpec(reference=ReferenceSpec(checkpoint=str(tmp_path / "wide")))
    with pytest.raises(ReferenceUnavailable, match=r"another architecture.*dim"):
        References(spec, Transformer, manager, 0).for_phase(
            _phase(2, 0, kind="dpo", dpo=other_arch), policy, fresh=True, first_tokens=0
        )


# ------------------------------------------------------------------------------------------ over ranks

WORKER = Path(__file__).with_name("_dpo_worker.py")
# float32; the layouts change only the order of reductions (measured: see the report of each run), so 1e-5
# catches a missing all-reduce or a wrong normaliser (off by ~50%).
RTOL = 1e-5


def run_layout(tmp_path: Path, dp: int, tp: int) -> dict:
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / f"dp{dp}-tp{tp}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp * tp}",
        "--monitor-interval=0.1", str(WORKER), str(out), "--dp", str(dp), "--tp", str(tp),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=WORKER.parent)
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun {' '.join(cmd[3:])} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(out.read_text())


def check_matches_single_process(out: dict) -> None:
    assert out["references"] == {"fresh": True, "resumed": True}  # the sharded reference: copied, and loaded
    results = out["steps"]
    assert len(results) == 4
    for case, r in results.items():
        assert r["finite"], case
        assert r["tokens"][0] == r["tokens"][1] and r["accuracy"][0] == r["accuracy"][1], case
        for key, value in r.items():
            if key.endswith("_rel") and key != "grad_rel":
                assert value < RTOL, (case, key, value)
        assert r["same_params"], case
        worst = max(r["grad_rel"].items(), key=lambda item: item[1])
        assert worst[1] < 10 * RTOL, (case, worst)
        assert r["grad_norm"][1] > 0.5, case  # grad_clip 0.5: the gradients compared were really clipped
        assert r["reads"] == {}, (case, r["reads"])  # no host read inside the step
        # The metrics all-reduce, plus one for the counts the host does not know (the pairs unless given, the
        # chosen tokens with the NLL term); only with dp > 1: a one-rank loss group reduces nothing.
        counted = int(case.endswith("/counted") or "+nll" in case)
        assert r["all_reduces"].get("loss", 0) <= 1 + counted, (case, r["all_reduces"])
        assert set(r["all_reduces"]) <= {"loss", "tp"}, (case, r["all_reduces"])


def test_dpo_step_over_fsdp2_equals_a_single_process(tmp_path):
    out = run_layout(tmp_path, dp=2, tp=1)
    check_matches_single_process(out)
    assert out["steps"]["dpo/known"]["all_reduces"] == {"loss": 1}  # the metrics, all in one
    assert out["steps"]["dpo/counted"]["all_reduces"] == {"loss": 2}


def test_dpo_step_under_tensor_parallelism_equals_a_single_process(tmp_path):
    check_matches_single_process(run_layout(tmp_path, dp=1, tp=2))


# ------------------------------------------------------------------------------------------ metrics and dashboard


def _metrics_step(metrics, phase: str, post_training: dict[str, float] | None) -> None:
    metrics.step(
        phase=phase,
        phase_index=1,
        step=3,
        tokens=300,
        loss=0.6,
        z_loss=0.0,
        max_z_loss=0.0,
        grad_norm=1.0,
        lr=1e-5,
        batch_tokens=100,
        seq_len=50,
        step_seconds=1.0,
        data_seconds=0.1,
        flops_per_token=10,
        tokens_per_source={},
        post_training=post_training,
    )


def test_post_training_values_reach_the_metrics_line_and_the_gauges_and_leave_with_the_phase():
    from prometheus_client import generate_latest

    from stagerun.trainer.callback_api import StepRecord
    from stagerun.trainer.metrics import DPO_GAUGES, POST_TRAINING_GAUGES, TrainerMetrics

    record = StepRecord(
        step=3, tokens=300, phase="dpo", phase_index=1, loss=0.62, z_loss=0.0, max_z_loss=0.0, distill_loss=0.0,
        grad_norm=1.0, lr=1e-5, batch_tokens=100, seq_len=50, step_seconds=1.0, data_seconds=0.1,
        tokens_per_second=100.0, tokens_per_source={}, batch_checksum=1.0, dpo_loss=0.6, rewards_chosen=0.3,
        rewards_rejected=-0.2, rewards_margin=0.5, rewards_accuracy=0.75, dpo_nll=0.1, pairs=8,
        split_conversations=0, truncated_pairs=2,
    )  # fmt: skip
    line = record.to_dict()
    keys = ("dpoLoss", "rewardsChosen", "rewardsMargin", "rewardsAccuracy", "pairs", "truncatedPairs")
    assert {k: line[k] for k in keys} == {
        "dpoLoss": 0.6, "rewardsChosen": 0.3, "rewardsMargin": 0.5, "rewardsAccuracy": 0.75, "pairs": 8,
        "truncatedPairs": 2,
    }  # fmt: skip
    metrics = TrainerMetrics("r", "ns", 0, peak_flops_per_device=None, world_size=1)
    _metrics_step(metrics, "dpo", record.post_training_values())
    text = generate_latest(metrics.registry).decode()
    for name in POST_TRAINING_GAUGES:
        assert f'{name}{{namespace="ns",phase="dpo",rank="0",run="r"}}' in text, name
    assert 'stagerun_dpo_rewards_accuracy{namespace="ns",phase="dpo",rank="0",run="r"} 0.75' in text
    assert 'stagerun_truncated_pairs{namespace="ns",phase="dpo",rank="0",run="r"} 2.0' in text
    # A later sft phase: its packing count, and no stale reward under its label.
    sft = StepRecord(**{**record.__dict__, **{f: None for f in ("dpo_loss", "rewards_chosen", "rewards_rejected",
                     "rewards_margin", "rewards_accuracy", "dpo_nll", "pairs", "truncated_pairs")}})  # fmt: skip
    assert sft.post_training_values() == {"split_conversations": 0.0}
    _metrics_step(metrics, "sft", sft.post_training_values())
    text = generate_latest(metrics.registry).decode()
    assert not any(name in text for name in DPO_GAUGES) and "stagerun_split_conversations{" in text
    _metrics_step(metrics, "pretrain", None)
    assert not any(name in generate_latest(metrics.registry).decode() for name in POST_TRAINING_GAUGES)
    with pytest.raises(ValueError, match="stagerun_rewards"):
        _metrics_step(metrics, "dpo", {"rewards": 1.0})
    # A pretrain step has none of them, and its metrics line no such keys.
    plain = StepRecord(**{**sft.__dict__, "split_conversations": None})
    assert plain.post_training_values() is None and not {"dpoLoss", "splitConversations"} & set(plain.to_dict())


def test_the_dashboards_post_training_row_charts_every_post_training_gauge():
    import json

    from stagerun.trainer.metrics import POST_TRAINING_GAUGES

    dashboard = json.loads((Path(__file__).parents[1] / "charts/stagerun/dashboards/stagerun.json").read_text())
    rows = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"].startswith("Post-training")]
    assert len(rows) == 1 and rows[0]["collapsed"]  # folded away: only post-training runs have its series
    exprs = " ".join(t["expr"] for panel in rows[0]["panels"] for t in panel["targets"])
    charted = {name for name in POST_TRAINING_GAUGES if name in exprs}
    assert charted == set(POST_TRAINING_GAUGES)
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for row in rows for p in row["panels"]]
    assert len(ids) == len(set(ids))
