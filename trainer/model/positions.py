"""Position encodings: rotary embeddings (RoPE, optionally partial) and ALiBi biases.

Nothing here is a registered buffer: cos/sin tables and ALiBi slopes are computed from positions in forward (and
cached in plain dicts), so a model built on the meta device and materialised with ``to_empty()`` needs no buffer
re-initialisation, and checkpoints hold parameters only.
"""

from __future__ import annotations

import math

import torch

# (seq_len, rotary_dims, theta, device, dtype) -> (cos, sin). Tiny (T x rotary_dims) tensors; a run sees a handful
# of sequence lengths, so this never grows large.
_ROPE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rope_tables(seq_len: int, rotary_dims: int, theta: float, device: torch.device, dtype: torch.dtype):
    # Frequencies in float32 whatever the compute dtype: bf16 positions lose integer precision above 256.
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dims, 2, device=device, dtype=torch.float32) / rotary_dims))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    # Hugging Face layout: the two halves of the rotated dims share one frequency table (non-interleaved), so an
    # exported q/k weight needs no permutation.
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_cos_sin(
    seq_len: int, rotary_dims: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [seq_len, rotary_dims] for positions 0..seq_len-1."""
    if torch.compiler.is_compiling():
        # Inside a compiled graph the tables are folded into the kernel; a Python dict would only cause guards.
        return _rope_tables(seq_len, rotary_dims, theta, device, dtype)
    key = (seq_len, rotary_dims, float(theta), torch.device(device), dtype)
    tables = _ROPE_CACHE.get(key)
    if tables is None:
        tables = _ROPE_CACHE[key] = _rope_tables(seq_len, rotary_dims, theta, device, dtype)
    return tables


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the Hugging Face / GPT-NeoX rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head of ``x`` [B, T, H, head_dim]; leave the rest as is.

    Partial rotary (StableLM 2 rotates 25 % of each head) keeps the trailing dims position-free.
    """
    rotary_dims = cos.shape[-1]
    cos = cos[:, None, :]  # [T, 1, r]: broadcast over heads
    sin = sin[:, None, :]
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
