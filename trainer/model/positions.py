"""Position encodings: rotary embeddings (RoPE, optionally partial) and ALiBi biases.

Nothing here is a registered buffer: cos/sin tables and ALiBi slopes are computed from positions in forward (and
cached in plain dicts), so a model built on the meta device and materialised with ``to_empty()`` needs no buffer
re-initialisation, and checkpoints hold parameters only.
"""

from __future__ import annotations

import math

import torch

from stagerun.core.spec.rope import ResolvedRope

# (seq_len, rotary_dims, rope, device, dtype) -> (cos, sin). Tiny (T x rotary_dims) tensors; a run sees a handful
# of sequence lengths and RoPEs (one per phase at most), so this never grows large.
_ROPE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def as_rope(rope: ResolvedRope | float) -> ResolvedRope:
    """A bare base (the model's ``ropeTheta``) is unscaled RoPE."""
    return rope if isinstance(rope, ResolvedRope) else ResolvedRope(float(rope))


def rope_frequencies(rotary_dims: int, rope: ResolvedRope | float) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dims / 2] in float32 on the CPU, the scale on cos/sin): transformers'
    ``ROPE_INIT_FUNCTIONS`` step for step (default, linear, llama3, yarn), so the tables agree with theirs exactly."""
    rope = as_rope(rope)
    dim, base, scaling = rotary_dims, rope.theta, rope.scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if scaling.type == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if scaling.type == "yarn":
        return _yarn(base**exponents, dim, base, scaling), scaling.attention_factor
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, s) -> torch.Tensor:
    """Llama 3.1: wavelengths beyond original / low are interpolated (/ factor), those below original / high kept,
    and the band between blended smoothly (transformers' ``_compute_llama3_parameters``)."""
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(pos_freqs: torch.Tensor, dim: int, base: float, s) -> torch.Tensor:
    """YaRN: dims that turn fewer than beta_slow times over the original context are interpolated, those that turn
    more than beta_fast times extrapolated, a linear ramp between (transformers' ``_compute_yarn_parameters``)."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _rope_tables(seq_len: int, rotary_dims: int, rope, device: torch.device, dtype: torch.dtype):
    # Frequencies in float32 whatever the compute dtype: bf16 positions lose integer precision above 256. They are
    # computed on the CPU, as transformers computes its inv_freq buffer, then moved.
    inv_freq, scale = rope_frequencies(rotary_dims, rope)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.to(device))
    # Hugging Face layout: the two halves of the rotated dims share one frequency table (non-interleaved), so an
    # exported q/k weight needs no permutation.
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:  # YaRN's attention factor, applied in float32 before the cast as transformers does
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def rope_cos_sin(
    seq_len: int, rotary_dims: int, rope: ResolvedRope | float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [seq_len, rotary_dims] for positions 0..seq_len-1, for ``rope`` (a phase's
    resolved RoPE, or a bare base: unscaled)."""
    rope = as_rope(rope)
    if torch.compiler.is_compiling():
        # Inside a compiled graph the tables are folded into the kernel; a Python dict would only cause guards.
        return _rope_tables(seq_len, rotary_dims, rope, device, dtype)
    key = (seq_len, rotary_dims, rope, torch.device(device), dtype)
    tables = _ROPE_CACHE.get(key)
    if tables is None:
        tables = _ROPE_CACHE[key] = _rope_tables(seq_len, rotary_dims, rope, device, dtype)
    return tables


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document [B, T] from document ids [B, T] (0, 1, 2, ... along a row, as
    the loader numbers them): 0 at every document start, StableLM 2's ``reset_position_ids``. A document that
    began in an earlier sequence counts from 0 at this sequence's start, as GPT-NeoX does."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def rope_at(
    positions: torch.Tensor, rotary_dims: int, rope: ResolvedRope | float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, rotary_dims] at explicit positions [B, T] (per-document positions); rows of the same
    tables ``rope_cos_sin`` gives, so a one-document sequence gets exactly the sequence positions' values."""
    cos, sin = rope_cos_sin(positions.shape[1], rotary_dims, rope, positions.device, dtype)
    return cos[positions], sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the Hugging Face / GPT-NeoX rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head of ``x`` [B, T, H, head_dim]; leave the rest as is.

    Partial rotary (StableLM 2 rotates 25 % of each head) keeps the trailing dims position-free. ``cos``/``sin``
    are [T, r] (the same positions for every sequence) or [B, T, r] (per-document positions, :func:`rope_at`).
    """
    rotary_dims = cos.shape[-1]
    cos = cos[..., None, :]  # [(B,) T, 1, r]: broadcast over heads
    sin = sin[..., None, :]
    if rotary_dims == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :rotary_dims], x[..., rotary_dims:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


def alibi_slopes(n_heads: int) -> list[float]:
    """Per-head ALiBi slopes (Press et al., 2022), as BLOOM and Baichuan 2 13B compute them.

    For a power of two n the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ...; otherwise the slopes of the
    closest lower power of two are followed by every other slope of twice that power (the paper's interpolation).
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def alibi_bias(slopes: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Float attention bias [H, T, T]: -slope * (query - key) at or below the diagonal, -inf above (causal)."""
    positions = torch.arange(seq_len, device=slopes.device)
    distance = (positions[None, :] - positions[:, None]).to(slopes.dtype)  # key - query: <= 0 where allowed
    bias = slopes[:, None, None] * distance
    return bias.masked_fill(distance > 0, float("-inf"))
