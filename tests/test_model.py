"""The transformer: each architecture option does what it should, masking is right, init is sharding-independent."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stagerun.core.spec.model import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.trainer.model import (
    DocumentMask,
    NormHead,
    Transformer,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    dense_attention,
    document_block_mask,
    document_causal_mask,
    fill_local_shard,
    flex_document_attention,
    init_weights,
    rope_cos_sin,
    uses_flex,
)


def tiny(**changes) -> ModelSpec:
    return resolve_model(ModelSpec(preset="tiny", **changes))


def build(spec: ModelSpec, seed: int = 0) -> Transformer:
    model = Transformer(spec)
    init_weights(model, seed)
    return model


def tokens(batch=2, seq=24, vocab=512, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def packed_doc_ids(batch=2, seq=24) -> torch.Tensor:
    """Three documents per row with different boundaries per row."""
    ids = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        first, second = 5 + 2 * row, 14 + row
        ids[row, first:second] = 1
        ids[row, second:] = 2
    return ids


# -- positions -------------------------------------------------------------------------------------------------


def test_rope_is_identity_at_position_zero():
    x = torch.randn(1, 4, 3, 16)
    cos, sin = rope_cos_sin(4, 16, 10000.0, x.device, x.dtype)
    assert torch.equal(apply_rotary(x, cos, sin)[:, 0], x[:, 0])
    assert not torch.allclose(apply_rotary(x, cos, sin)[:, 1], x[:, 1])


def test_partial_rotary_rotates_leading_dims_only_in_hf_rotate_half_layout():
    head_dim, rotary, theta = 32, 8, 10000.0
    x = torch.randn(2, 6, 3, head_dim)
    cos, sin = rope_cos_sin(6, rotary, theta, x.device, x.dtype)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., rotary:], x[..., rotary:])  # the trailing 3/4 are untouched
    # Reference: dim i pairs with dim i + rotary/2 (non-interleaved halves), angle p * theta^(-2i/rotary).
    half = rotary // 2
    for p in range(6):
        for i in range(half):
            angle = p * theta ** (-2 * i / rotary)
            a, b = x[:, p, :, i], x[:, p, :, i + half]
            torch.testing.assert_close(out[:, p, :, i], a * math.cos(angle) - b * math.sin(angle))
            torch.testing.assert_close(out[:, p, :, i + half], b * math.cos(angle) + a * math.sin(angle))
    assert not torch.allclose(out[:, 1:, :, :rotary], x[:, 1:, :, :rotary])
    # Rotation preserves each pair's norm.
    torch.testing.assert_close(out[..., :rotary].norm(dim=-1), x[..., :rotary].norm(dim=-1))


def test_partial_rotary_model_runs_with_stablelm_options():
    spec = tiny(rotary_fraction=0.25, norm="layernorm", norm_bias=True, qkv_bias=True, kv_heads=4)
    assert spec.rotary_dims == 4  # head_dim 16
    assert build(spec)(tokens()).shape == (2, 24, 512)


# Reference ALiBi slopes written out from Press et al. (2022): for n heads a power of two, 2^(-8i/n), i = 1..n;
# otherwise the 2^floor(log2 n) power-of-two slopes, then the odd-indexed slopes of the 2n' sequence.
REFERENCE_SLOPES = {
    8: [2.0**-k for k in range(1, 9)],
    12: [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5],
    # Baichuan 2 13B: 40 heads = 32 slopes 2^(-i/4) then 8 slopes 2^(-(2j+1)/8).
    40: [2.0 ** (-i / 4) for i in range(1, 33)] + [2.0 ** (-(2 * j + 1) / 8) for j in range(8)],
}


@pytest.mark.parametrize("heads", sorted(REFERENCE_SLOPES))
def test_alibi_slopes_match_the_paper(heads):
    assert alibi_slopes(heads) == pytest.approx(REFERENCE_SLOPES[heads], rel=1e-12)


def test_alibi_bias_is_minus_slope_times_distance_and_causal():
    slopes = torch.tensor(REFERENCE_SLOPES[12])
    bias = alibi_bias(slopes, 7)
    for h in range(12):
        for i in range(7):
            for j in range(7):
                expected = -slopes[h].item() * (i - j) if j <= i else float("-inf")
                assert bias[h, i, j].item() == pytest.approx(expected)


def test_alibi_attention_matches_manual_softmax_and_head_offset_picks_slopes():
    spec = tiny(position="alibi", heads=4, kv_heads=4)
    attention = build(spec).layers[0].attention
    x = torch.randn(2, 9, spec.dim)

    def manual(slopes):
        q = attention.wq(x).view(2, 9, 4, 16).transpose(1, 2)
        k = attention.wk(x).view(2, 9, 4, 16).transpose(1, 2)
        v = attention.wv(x).view(2, 9, 4, 16).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(16) + alibi_bias(torch.tensor(slopes), 9)
        out = scores.softmax(-1) @ v
        return attention.wo(out.transpose(1, 2).reshape(2, 9, -1))

    torch.testing.assert_close(attention(x), manual(alibi_slopes(4)))
    # A tensor-parallel rank holding heads 4..7 of 8 must use those heads' slopes.
    attention.n_heads, attention.head_offset = 8, 4
    torch.testing.assert_close(attention(x), manual(alibi_slopes(8)[4:8]))


# -- heads and norms -------------------------------------------------------------------------------------------


def test_norm_head_rows_have_unit_norm_and_logits_ignore_row_scale():
    model = build(tiny(tied_embeddings=False, norm_head=True))
    assert isinstance(model.output, NormHead)
    effective = F.normalize(model.output.weight, dim=-1)
    torch.testing.assert_close(effective.norm(dim=-1), torch.ones(512))
    x = tokens()
    before = model(x)
    with torch.no_grad():
        model.output.weight[7] *= 5.0
    torch.testing.assert_close(model(x), before)
    plain = build(tiny(tied_embeddings=False, norm_head=False))
    assert type(plain.output) is nn.Linear


def test_tied_embeddings_share_one_parameter():
    tied, untied = build(tiny(tied_embeddings=True)), build(tiny(tied_embeddings=False))
    assert tied.output is None and isinstance(untied.output, nn.Linear)
    n_tied, n_untied = (sum(p.numel() for p in m.parameters()) for m in (tied, untied))
    assert n_untied - n_tied == 512 * 64
    x = tokens()
    logits = tied(x)
    logits[..., 3].sum().backward()  # the head's gradient lands on the embedding matrix
    assert tied.tok_embeddings.weight.grad[3].abs().sum() > 0
    # The head is the embedding matrix: changing one embedding row changes that vocab column's logits.
    with torch.no_grad():
        tied.tok_embeddings.weight[3] += 1.0
        changed = (tied(x) - logits).abs().amax(dim=(0, 1))
    assert changed[3] > 1e-3


@pytest.mark.parametrize(
    "changes",
    [
        dict(tied_embeddings=False),
        dict(tied_embeddings=True),
        dict(tied_embeddings=False, norm_head=True),
        dict(tied_embeddings=True, norm_head=True),
    ],
    ids=["untied", "tied", "normhead", "tied-normhead"],
)
def test_forward_with_targets_is_the_loss_of_the_logits(changes):
    """The fused, chunked loss inside forward equals F.cross_entropy (+ z, max-z) of the logits forward returns,
    and so do the gradients of every parameter (the head's, the tied embedding's, NormHead's raw rows)."""
    from stagerun.trainer.losses import LossConfig

    spec = tiny(**changes)
    model = build(spec)
    x, targets = tokens(), tokens(seed=1)
    targets[:, :3] = -100
    config = LossConfig(z_loss_weight=1e-3, max_z_loss_weight=1e-3, chunk_tokens=10)
    terms = model(x, targets=targets, loss=config)
    terms.total.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x).flatten(0, 1).float()
    flat, keep = targets.flatten(), targets.flatten() != -100
    ce = F.cross_entropy(logits, flat, reduction="sum")
    z = 1e-3 * torch.logsumexp(logits, -1)[keep].square().sum()
    max_z = 1e-3 * logits.amax(-1)[keep].square().sum()
    torch.testing.assert_close(terms.ce_sum, ce)
    torch.testing.assert_close(terms.z_sum, z)
    torch.testing.assert_close(terms.max_z_sum, max_z)
    (ce + z + max_z).backward()
    for name, p in model.named_parameters():
        # float32 sums over every token in two different orders: the absolute error scales with the gradient (an
        # embedding row summed over many positions reaches ~20 here, and differs by ~1e-5 between CPUs' kernels).
        scale = max(1.0, float(p.grad.abs().max()))
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=2e-6 * scale, msg=name)


def test_qkv_bias_adds_exactly_three_bias_vectors_per_layer():
    spec = tiny(qkv_bias=True)
    model = build(spec)
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 3 * spec.layers
    assert all(n.split(".")[-2] in ("wq", "wk", "wv") for n in biases)
    assert model.layers[0].attention.wo.bias is None
    assert not [n for n, _ in build(tiny()).named_parameters() if n.endswith(".bias")]


def test_layernorm_and_rmsnorm():
    rms = build(tiny(norm="rmsnorm"))
    ln = build(tiny(norm="layernorm", norm_bias=True))
    ln_nobias = build(tiny(norm="layernorm", norm_bias=False))
    assert isinstance(rms.norm, nn.RMSNorm) and isinstance(rms.layers[0].ffn_norm, nn.RMSNorm)
    assert isinstance(ln.norm, nn.LayerNorm) and ln.norm.bias is not None
    assert isinstance(ln_nobias.norm, nn.LayerNorm) and ln_nobias.norm.bias is None
    x = torch.randn(3, 64) * 3 + 1
    torch.testing.assert_close(rms.norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())
    torch.testing.assert_close(ln.norm(x), F.layer_norm(x, (64,), eps=1e-5))
    for model, spec in ((rms, tiny(norm="rmsnorm")), (ln, tiny(norm="layernorm", norm_bias=True))):
        assert sum(p.numel() for p in model.parameters()) == spec.parameter_count()


def test_vocab_is_padded():
    spec = tiny(vocab_size=500, pad_vocab_multiple=64, tied_embeddings=False)
    model = build(spec)
    assert spec.padded_vocab == 512
    assert model.tok_embeddings.weight.shape == (512, 64) and model.output.weight.shape == (512, 64)
    assert model(tokens(vocab=500)).shape[-1] == 512


# -- masking ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_causal_future_tokens_do_not_change_past_logits(position):
    model = build(tiny(position=position, heads=4, kv_heads=2))
    x = tokens()
    changed = x.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 512
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_document_attention_equals_block_diagonal_sdpa(alibi, kv_heads):
    torch.manual_seed(0)
    batch, heads, seq, dim = 2, 4, 48, 16
    q = torch.randn(batch, heads, seq, dim)
    k, v = torch.randn(batch, kv_heads, seq, dim), torch.randn(batch, kv_heads, seq, dim)
    doc_ids = packed_doc_ids(batch, seq)
    slopes = torch.tensor(alibi_slopes(heads)) if alibi else None
    with torch.no_grad():  # eager FlexAttention has no CPU backward
        flex = flex_document_attention(q, k, v, document_block_mask(doc_ids), slopes)
    mask = document_causal_mask(doc_ids)
    explicit = mask if not alibi else alibi_bias(slopes, seq)[None].masked_fill(~mask, float("-inf"))
    group = heads // kv_heads
    reference = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=explicit
    )
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_model_flex_path_equals_explicit_mask_path(position):
    model = build(tiny(position=position, heads=4, kv_heads=2))
    x, doc_ids = tokens(), packed_doc_ids()
    with torch.no_grad():
        explicit = model(x, doc_ids)
        for layer in model.layers:
            layer.attention.use_flex = True
        flex = model(x, doc_ids)
    torch.testing.assert_close(flex, explicit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("masking", ["causal", "documents", "alibi", "alibi+documents"])
def test_sdpa_gqa_without_copies_equals_the_repeated_kv_layout(masking):
    """enable_gqa reads kv head h // group for query head h, exactly as Hugging Face's repeat_kv copy did:
    outputs and gradients agree with SDPA on repeat_interleave'd K/V, on every dense path (CPU kernels)."""
    torch.manual_seed(0)
    batch, heads, kv_heads, seq, dim = 2, 8, 2, 24, 16
    q = torch.randn(batch, heads, seq, dim, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, dim, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, dim, requires_grad=True)
    mask = document_causal_mask(packed_doc_ids(batch, seq)) if "documents" in masking else None
    slopes = torch.tensor(alibi_slopes(heads)) if "alibi" in masking else None
    out = dense_attention(q, k, v, mask, slopes)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    k_rep, v_rep = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    if mask is None and slopes is None:
        reference = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
    else:
        bias = torch.zeros(1, 1, seq, seq) if slopes is None else alibi_bias(slopes, seq)[None]
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        allowed = causal if mask is None else mask & causal
        reference = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=bias.masked_fill(~allowed, -math.inf))
    expected = torch.autograd.grad(reference.square().sum(), (q, k, v))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_document_mask_is_built_once_per_forward_and_immutable(monkeypatch):
    """One mask per forward, outside the blocks, of the kind the rule picks (dense on CPU, flex when forced)."""
    import dataclasses

    assert uses_flex(torch.device("cuda")) and not uses_flex(torch.device("cpu"))
    model = build(tiny(heads=4, kv_heads=2))
    built = []
    real_build = DocumentMask.build.__func__
    monkeypatch.setattr(
        DocumentMask, "build", classmethod(lambda cls, ids, flex: built.append(flex) or real_build(cls, ids, flex))
    )
    x, doc_ids = tokens(), packed_doc_ids()
    with torch.no_grad():
        model(x, doc_ids)
        for layer in model.layers:
            layer.attention.use_flex = True
        model(x, doc_ids)
    assert built == [False, True]  # once per forward, not per layer
    mask = DocumentMask.build(doc_ids, flex=False)
    assert mask.block is None and torch.equal(mask.dense, document_causal_mask(doc_ids))
    with pytest.raises(dataclasses.FrozenInstanceError):
        mask.dense = None  # type: ignore[misc]


def test_documents_do_not_see_each_other():
    model = build(tiny())
    x, doc_ids = tokens(batch=1), packed_doc_ids(batch=1)  # doc 0: 0..4, doc 1: 5..13, doc 2: 14..23
    changed = x.clone()
    changed[0, 5:14] = (changed[0, 5:14] + 11) % 512  # rewrite document 1
    a, b = model(x, doc_ids), model(changed, doc_ids)
    torch.testing.assert_close(a[:, 14:], b[:, 14:])  # document 2 unaffected
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:14], b[:, 5:14])
    # Without doc_ids, document 2 does see document 1.
    assert not torch.allclose(model(x)[:, 14:], model(changed)[:, 14:])
    # One document spanning the row is plain causal attention.
    torch.testing.assert_close(model(x, torch.zeros_like(x)), model(x))


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa_spec, mha_spec = tiny(heads=4, kv_heads=2, qkv_bias=True), tiny(heads=4, kv_heads=4, qkv_bias=True)
    gqa, mha = build(gqa_spec, seed=1), build(mha_spec, seed=2)
    state = gqa.state_dict()
    for name, value in state.items():
        if ".wk." in name or ".wv." in name:  # [kv_heads * head_dim, ...] -> each kv head repeated for its group
            shape = value.shape
            value = value.reshape(2, 16, *shape[1:]).repeat_interleave(2, dim=0).reshape(64, *shape[1:])
        state[name] = value
    mha.load_state_dict(state)
    x, doc_ids = tokens(), packed_doc_ids()
    torch.testing.assert_close(gqa(x), mha(x))
    torch.testing.assert_close(gqa(x, doc_ids), mha(x, doc_ids))


# -- query/key normalisation -------------------------------------------------------------------------------------


def test_qk_norm_normalises_each_head_before_rope():
    spec = tiny(qk_norm=True)
    model = build(spec)
    attention = model.layers[0].attention
    assert tuple(attention.q_norm.weight.shape) == tuple(attention.k_norm.weight.shape) == (spec.head_dim,)
    assert sum(p.numel() for p in model.parameters()) == spec.parameter_count()
    assert spec.parameter_count() == tiny().parameter_count() + spec.layers * 2 * spec.head_dim
    with torch.no_grad():  # a learned, non-trivial gain, so the reference below checks where it is applied
        attention.q_norm.weight.copy_(torch.linspace(0.5, 1.5, spec.head_dim))
        attention.k_norm.weight.copy_(torch.linspace(1.5, 0.5, spec.head_dim))
    x = torch.randn(2, 12, spec.dim)
    # Reference (Qwen3's Qwen3Attention): RMSNorm over each head's dims, then RoPE, then causal attention.
    b, t, hd = 2, 12, spec.head_dim
    q = attention.wq(x).view(b, t, -1, hd)
    k = attention.wk(x).view(b, t, -1, hd)
    v = attention.wv(x).view(b, t, -1, hd)

    def rms(y, w):
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + spec.norm_eps) * w

    q, k = rms(q, attention.q_norm.weight), rms(k, attention.k_norm.weight)
    cos, sin = rope_cos_sin(t, spec.rotary_dims, spec.rope_theta, x.device, x.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    expected = attention.wo(out.transpose(1, 2).reshape(b, t, -1))
    torch.testing.assert_close(attention(x), expected)


def test_qk_norm_makes_attention_invariant_to_the_scale_of_a_query_head():
    x = tokens()
    for qk_norm in (True, False):
        model = build(tiny(qk_norm=qk_norm))
        before = model(x)
        with torch.no_grad():  # scale query head 1 of layer 0 (rows 16..31 of wq) by 8
            model.layers[0].attention.wq.weight[16:32] *= 8.0
        after = model(x)
        if qk_norm:  # RMSNorm removes the scale (up to its eps)
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        else:
            assert not torch.allclose(after, before, atol=1e-3)


# -- per-document positions ----------------------------------------------------------------------------------------


def test_document_positions_restart_at_each_document():
    from stagerun.trainer.model.positions import document_positions

    doc_ids = packed_doc_ids(batch=1)  # doc 0: 0..4, doc 1: 5..13, doc 2: 14..23
    expected = list(range(5)) + list(range(9)) + list(range(10))
    assert document_positions(doc_ids)[0].tolist() == expected
    assert document_positions(torch.zeros(2, 7, dtype=torch.long)).tolist() == [list(range(7))] * 2


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_per_document_positions_with_masking_compute_each_document_as_if_alone(kv_heads):
    # build() draws from (seed, parameter name): the same seed gives both models the same weights.
    spec = tiny(position_ids="perDocument", kv_heads=kv_heads, qk_norm=True)
    model = build(spec)
    x, doc_ids = tokens(batch=1), packed_doc_ids(batch=1)
    packed = model(x, doc_ids)
    for start, stop in ((0, 5), (5, 14), (14, 24)):  # every document, alone at the start of a sequence
        torch.testing.assert_close(packed[:, start:stop], model(x[:, start:stop]), rtol=1e-5, atol=1e-5)
    # RoPE scores depend only on query-key offsets, so under the mask sequence positions give the same function
    # (up to rounding); the reset matters without the mask (next test).
    sequence = build(tiny(kv_heads=kv_heads, qk_norm=True))
    torch.testing.assert_close(sequence(x, doc_ids), packed, rtol=1e-5, atol=1e-5)


def test_per_document_positions_without_masking_and_explicit_positions():
    from stagerun.trainer.model.positions import document_positions

    per_doc, sequence = tiny(position_ids="perDocument"), tiny()
    model, plain = build(per_doc), build(sequence)  # the same weights: position ids add no parameter
    plain.load_state_dict(model.state_dict())
    x, doc_ids = tokens(), packed_doc_ids()
    positions = document_positions(doc_ids).to(torch.int32)  # what the batch carries (trainer/batch.py)
    # The positions are used without the mask: attention still crosses documents, RoPE restarts.
    unmasked = model(x, positions=positions)
    assert not torch.allclose(unmasked, plain(x), atol=1e-4)
    torch.testing.assert_close(unmasked[:, :5], plain(x)[:, :5])  # the first document starts at 0 either way
    # Given with the mask, explicit positions are what the model derives from doc_ids itself.
    torch.testing.assert_close(model(x, doc_ids, positions=positions), model(x, doc_ids))
    # A sequence model ignores positions; one document spanning the row is the sequence positions.
    torch.testing.assert_close(plain(x, positions=positions), plain(x))
    torch.testing.assert_close(model(x, positions=torch.arange(24).expand(2, 24)), plain(x))


def test_batches_carry_per_document_positions():
    import numpy as np

    from stagerun.trainer.batch import StepBatch
    from stagerun.trainer.data.loader import MicroBatch
    from stagerun.trainer.model.positions import document_positions

    doc_ids = packed_doc_ids().numpy().astype(np.int32)
    inputs = tokens().numpy()
    mb = MicroBatch(inputs=inputs, targets=inputs, doc_ids=doc_ids, sources=["a", "b"])
    batch = StepBatch.from_micro_batches([mb], torch.device("cpu"), doc_masking=False)
    carried = batch.micro_batches[0]
    assert carried.doc_ids is None  # no mask without docMasking ...
    assert torch.equal(carried.positions.long(), document_positions(torch.from_numpy(doc_ids)))  # ... positions yes


# -- initialisation --------------------------------------------------------------------------------------------


def test_init_is_deterministic_and_meta_buildable():
    spec = tiny(tied_embeddings=False, qkv_bias=True, norm="layernorm", norm_bias=True)
    first, second = build(spec, seed=5), build(spec, seed=5)
    with torch.device("meta"):
        lazy = Transformer(spec)
    lazy.to_empty(device="cpu")
    init_weights(lazy, 5)
    other_seed = build(spec, seed=6)
    reference = first.state_dict()
    for model in (second, lazy):
        for name, value in model.state_dict().items():
            assert torch.equal(value, reference[name]), name
    assert not torch.equal(other_seed.layers[0].attention.wq.weight, first.layers[0].attention.wq.weight)
    # Distinct parameters get distinct draws, norms start at identity, biases at zero, residual outputs scaled.
    assert not torch.equal(first.layers[0].attention.wq.weight, first.layers[1].attention.wq.weight)
    assert torch.equal(first.norm.weight, torch.ones(64)) and torch.equal(first.norm.bias, torch.zeros(64))
    assert torch.equal(first.layers[0].attention.wq.bias, torch.zeros(64))
    big = Transformer(tiny(dim=256, heads=4, kv_heads=4, ffn_hidden=1024, layers=8))
    init_weights(big, 0)
    assert big.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert big.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.02)


def test_init_ignores_wrapper_prefixes():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    spec = tiny()
    plain, wrapped = build(spec, seed=3), Transformer(spec)
    for i, layer in enumerate(wrapped.layers):
        wrapped.layers[i] = checkpoint_wrapper(layer)
    init_weights(wrapped, 3)
    assert "_checkpoint_wrapped_module" in next(n for n, _ in wrapped.named_parameters() if "layers" in n)
    for (_, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.equal(a, b)


def _sharded_init_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)  # forked from a process whose OpenMP pool is live: keep the child single-threaded
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        spec = tiny(tied_embeddings=False, qkv_bias=True)
        with torch.device("meta"):
            model = Transformer(spec)
        model.to_empty(device="cpu")
        for module in model.modules():  # shard rows, except wk on columns, to mix placements
            for name, param in list(module.named_parameters(recurse=False)):
                dim = 1 if module is model.layers[0].attention.wk and name == "weight" else 0
                sharded = distribute_tensor(param.detach(), mesh, [Shard(dim)])
                module.register_parameter(name, nn.Parameter(sharded))
        init_weights(model, 11)
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, result_file)
    finally:
        dist.destroy_process_group()


def test_init_is_independent_of_sharding(monkeypatch):
    """Two gloo ranks holding DTensor shards end up with exactly the unsharded model's weights."""
    import torch.multiprocessing as mp

    from stagerun.trainer.model import init as model_init

    monkeypatch.setattr(model_init, "BLOCK_ELEMENTS", 3 * 64)  # blocks straddle the shard edges (forked: inherited)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "weights.pt")
        mp.start_processes(_sharded_init_worker, args=(2, init_file, result_file), nprocs=2, start_method="fork")
        sharded = torch.load(result_file)
    reference = build(tiny(tied_embeddings=False, qkv_bias=True), seed=11)
    for name, value in reference.named_parameters():
        assert torch.equal(sharded[name], value), name


def test_init_blocks_tile_any_shard_box(monkeypatch):
    """Every box of a parameter, however it straddles the row blocks, gets exactly the full draw's values."""
    from stagerun.trainer.model import init as model_init

    monkeypatch.setattr(model_init, "BLOCK_ELEMENTS", 3 * 16)  # 3 rows of 16 per block: many block edges
    shape, full = (20, 16), torch.empty(20, 16)
    fill_local_shard(full, shape, (0, 0), 0.02, 7, "layers.0.attention.wq.weight")
    assert full.std().item() == pytest.approx(0.02, rel=0.2)
    # float32 boxes of whole rows draw their inner blocks in place, the others through a temporary: same values.
    boxes = [((3, 12), (0, 16), torch.float32), ((4, 11), (0, 16), torch.float32), ((0, 20), (0, 16), torch.bfloat16)]
    boxes += [((5, 6), (3, 9), torch.float32), ((17, 20), (8, 16), torch.bfloat16)]
    for rows, cols, dtype in boxes:
        box = torch.empty(rows[1] - rows[0], cols[1] - cols[0], dtype=dtype)
        fill_local_shard(box, shape, (rows[0], cols[0]), 0.02, 7, "layers.0.attention.wq.weight")
        assert torch.equal(box, full[rows[0] : rows[1], cols[0] : cols[1]].to(dtype)), (rows, cols, dtype)
    # Another block size is another (equally valid) draw: the block size is part of the scheme, fixed per release.
    monkeypatch.setattr(model_init, "BLOCK_ELEMENTS", 2**20)
    other = torch.empty(20, 16)
    fill_local_shard(other, shape, (0, 0), 0.02, 7, "layers.0.attention.wq.weight")
    assert not torch.equal(other, full)


# Layouts of 4 ranks that the product's own tensor-parallel and FSDP plans shard differently: FSDP, HSDP,
# TP x FSDP (rows split twice, wo/w2 split on columns) and TP on its own with a replicated dp.
_LAYOUTS = [{"dp_shard": 4}, {"dp_replicate": 2, "dp_shard": 2}, {"dp_shard": 2, "tp": 2}, {"dp_replicate": 2, "tp": 2}]


def _layouts_init_worker(rank: int, world: int, init_file: str, result_dir: str, block_elements: int) -> None:
    import torch.distributed as dist

    from stagerun.core.layout import ParallelLayout
    from stagerun.trainer import distributed as D
    from stagerun.trainer.model import init as model_init

    torch.set_num_threads(1)  # forked from a process whose OpenMP pool is live: keep the child single-threaded
    model_init.BLOCK_ELEMENTS = block_elements
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for index, degrees in enumerate(_LAYOUTS):
            layout = ParallelLayout(**degrees)
            mesh, batch, loss = D.build_mesh(layout, "cpu")
            topo = D.Topology(
                rank=rank,
                world_size=world,
                local_rank=rank,
                device=torch.device("cpu"),
                layout=layout,
                mesh=mesh,
                batch_mesh=batch,
                loss_mesh=loss,
            )
            with torch.device("meta"):
                model = Transformer(tiny(tied_embeddings=False, qkv_bias=True, heads=4, kv_heads=2))
            if layout.tp > 1:
                D.apply_tensor_parallel(model, topo)
            D.apply_fsdp(model, topo, None)
            model.to_empty(device="cpu")
            init_weights(model, 11)
            full = {name: p.full_tensor() for name, p in model.named_parameters()}
            if rank == 0:
                torch.save(full, os.path.join(result_dir, f"layout{index}.pt"))
    finally:
        dist.destroy_process_group()


def test_init_is_independent_of_the_parallel_layout(monkeypatch):
    """FSDP 4, HSDP 2x2, TP 2 x FSDP 2 and TP 2 x replicate 2 (the product's plans, 4 gloo ranks) all end up with
    exactly the unsharded model's weights, with blocks small enough that every shard straddles block edges."""
    import torch.multiprocessing as mp

    from stagerun.trainer.model import init as model_init

    block_elements = 3 * 64  # 3 rows of the 64-wide matrices per block, never aligned with a shard edge
    monkeypatch.setattr(model_init, "BLOCK_ELEMENTS", block_elements)
    reference = build(tiny(tied_embeddings=False, qkv_bias=True, heads=4, kv_heads=2), seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        args = (4, os.path.join(tmp, "init"), tmp, block_elements)
        mp.start_processes(_layouts_init_worker, args=args, nprocs=4, start_method="fork")
        results = [torch.load(os.path.join(tmp, f"layout{i}.pt")) for i in range(len(_LAYOUTS))]
    for degrees, sharded in zip(_LAYOUTS, results):
        for name, value in reference.named_parameters():
            assert torch.equal(sharded[name], value), (degrees, name)


# -- training --------------------------------------------------------------------------------------------------


def test_tiny_model_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = build(tiny(), seed=0)
    batch = tokens(batch=4, seq=33, seed=1)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_per_document_positions_need_rope():
    from conftest import tiny_run

    from stagerun.core.spec import validate_manifest

    manifest = tiny_run(model={"preset": "tiny", "position": "alibi", "positionIds": "perDocument"})
    (problem,) = [p for p in validate_manifest(manifest) if "positionIds" in p.path]
    assert problem.path == "spec.model.positionIds" and "ALiBi has none" in problem.message
    assert not validate_manifest(tiny_run(model={"preset": "tiny", "qkNorm": True, "positionIds": "perDocument"}))
