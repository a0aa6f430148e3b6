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


class AlibiBias(PositionModule):
    """Per-head linear distance penalty ``-m_h * |i - j|`` added to the attention scores.

    Parameter-free: the slopes are derived on the fly (never stored, so a meta-device load cannot
    leave them uninitialised).

    Args:
        num_heads: Number of query heads.
        max_bias: See :func:`alibi_slopes`.
    """

    route = "bias"

    def __init__(self, num_heads: int, max_bias: float = 8.0):
        super().__init__()
        self.num_heads = num_heads
        self.max_bias = max_bias

    def slopes(self, device: torch.device) -> torch.Tensor:
        return alibi_slopes(self.num_heads, self.max_bias).to(device)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        # distance[i, j] = i - j, [q, kv]; masked (future) entries of a causal model are never read.
        distance = (q_pos[:, None] - k_pos[None, :]).to(torch.float32)
        if not causal:
            distance = distance.abs()
        # [1, H, q, kv]
        return (-self.slopes(q_pos.device)[:, None, None] * distance)[None]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_bias={self.max_bias}"
