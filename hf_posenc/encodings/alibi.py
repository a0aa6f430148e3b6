"""ALiBi: attention with linear biases (Press et al. 2022, https://arxiv.org/abs/2108.12409)."""

from __future__ import annotations

import math

import torch

from .base import PositionModule


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """The paper's head slopes.

    For ``n`` a power of two the slopes are the geometric sequence ``r, r^2, ..., r^n`` with
    ``r = 2^(-max_bias / n)``. Otherwise the paper takes the ``2^floor(log2 n)`` sequence and completes
    it with every other slope of the ``2 * 2^floor(log2 n)`` sequence.

    Args:
        num_heads: Number of attention heads.
        max_bias: The exponent range (8 in the paper).

    Returns:
        ``[num_heads]`` float32 slopes.
    """

    def geometric(n: int) -> list[float]:
        ratio = 2.0 ** (-max_bias / n)
        return [ratio ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(closest)
    if closest != num_heads:
        slopes += geometric(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def distance_diagonals(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Every distance ``i - j`` of a ``[q, kv]`` score block, one per diagonal: ``[q + kv - 1]`` int64.

    Entry ``t`` is the distance on diagonal ``i - j = t - (kv - 1)``, shifted by ``q_pos[0] - k_pos[0]``.
    Both position ranges must be consecutive (``hf_posenc.attention.positions`` always gives that).
    """
    q_len, kv_len = q_pos.shape[0], k_pos.shape[0]
    return torch.arange(q_len + kv_len - 1, device=q_pos.device) + (q_pos[0] - k_pos[-1])


def toeplitz(diagonals: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Expand per-diagonal values ``[..., q + kv - 1]`` to ``[..., q, kv]`` with ``M[i, j] = d[i - j + kv - 1]``.

    A relative bias depends on ``i - j`` only: computing it once per diagonal and expanding with one copy
    replaces a ``[q, kv]`` distance tensor, a ``[q, kv]`` int64 bucket tensor and a gather per layer.
    """
    # unfold of the reversed values gives rows U[s, j] = d[q + kv - 2 - s - j]; row s = q - 1 - i is M[i].
    # index_select writes a row-major result: SDPA copies a mask with any other layout on every call.
    rows = torch.arange(q_len - 1, -1, -1, device=diagonals.device)
    return diagonals.flip(-1).unfold(-1, kv_len, 1).index_select(-2, rows)  # [..., q, kv]


def future_filled(diagonals: torch.Tensor, distances: torch.Tensor, future: float) -> torch.Tensor:
    """Set the diagonals of keys after the query (``i - j < 0``) to ``future`` (a mask value)."""
    return diagonals.masked_fill(distances < 0, future)


class AlibiBias(PositionModule):
    """Per-head linear distance penalty ``-m_h * |i - j|`` added to the attention scores.

    Parameter-free: the slopes are derived on the fly (never stored, so a meta-device load cannot
    leave them uninitialised).

    Args:
        num_heads: Number of query heads.
        max_bias: See :func:`alibi_slopes`.
    """

    route = "bias"
    #: Far keys' logits make ``exp`` return denormal floats, which x86 computes slowly: CPU attention flushes
    #: them to zero (``hf_posenc.cpu_attention``).
    flush_denormals = True

    def __init__(self, num_heads: int, max_bias: float = 8.0):
        super().__init__()
        self.num_heads = num_heads
        self.max_bias = max_bias

    def slopes(self, device: torch.device) -> torch.Tensor:
        return alibi_slopes(self.num_heads, self.max_bias).to(device)

    def bias_diagonals(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """The bias once per diagonal, ``[H, q + kv - 1]`` fp32 (see :func:`toeplitz`). Positions must be
        consecutive ranges."""
        distances = distance_diagonals(q_pos, k_pos)  # [q + kv - 1]
        magnitude = distances.to(torch.float32)
        if not causal:
            magnitude = magnitude.abs()
        return -self.slopes(q_pos.device)[:, None] * magnitude  # [H, q + kv - 1]

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """``[1, H, q, kv]`` fp32 bias."""
        return toeplitz(self.bias_diagonals(q_pos, k_pos, causal), q_pos.shape[0], k_pos.shape[0])[None]

    def fold_into_head_dim(self, query, key, value, k_pos: torch.Tensor, scaling: float):
        """Causal ALiBi as one extra head dimension, so attention stays on SDPA's fast causal kernel.

        ``-m_h (i - j) = m_h j - m_h i``: the per-row constant ``m_h i`` cancels in the softmax, and the
        per-key term ``m_h j`` rides in a dimension where the query holds 1 and the key ``m_h j / scaling``
        (SDPA with q/k head dim 65 keeps its fused causal kernel). Keys are measured from the newest one (``j - j_last <= 0``) so the largest
        magnitudes land on the far keys, whose weights are smallest. Exact in fp32 only: callers must
        keep this to fp32 (at 4k keys the term reaches ~1e3, beyond bf16's resolution).

        Args:
            query: ``[B, H, q, D]``; key, value: ``[B, Hkv, kv, D]``.
            k_pos: Key positions ``[kv]``.
            scaling: The logit scale SDPA will apply.

        Returns:
            ``query, key, value`` with head dim ``D + 1`` and ``H`` heads each (the value's extra dimension
            is zero, as SDPA's fast kernels want equal q/k/v head dims: slice it off the output).
        """
        heads = query.shape[1]
        key = key.repeat_interleave(heads // key.shape[1], dim=1) if key.shape[1] != heads else key
        value = value.repeat_interleave(heads // value.shape[1], dim=1) if value.shape[1] != heads else value
        key_term = self.slopes(query.device)[:, None] * ((k_pos - k_pos[-1]).to(torch.float32) / scaling)
        batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        query = torch.cat((query, query.new_ones(batch, heads, q_len, 1)), dim=-1)
        key = torch.cat((key, key_term[None, :, :, None].expand(batch, heads, kv_len, 1).to(key.dtype)), dim=-1)
        value = torch.cat((value, value.new_zeros(batch, heads, kv_len, 1)), dim=-1)
        return query, key, value

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_bias={self.max_bias}"
