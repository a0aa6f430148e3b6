"""ALiBi: attention with linear biases (Press et al. 2022, https://arxiv.org/abs/2108.12409)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import registry
from ..config import PosEncConfig, check_positive
from ..kernels.tiling import distance_diagonals, toeplitz
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

    def __init__(self, num_heads: int, max_bias: float = 8.0):
        super().__init__()
        self.num_heads = num_heads
        self.max_bias = max_bias

    def slopes(self, device: torch.device) -> torch.Tensor:
        """``[H]`` fp32 slopes ``m_h`` (the ``key_fold`` kernel folds ``-m_h (i - j)`` into a head dimension)."""
        return alibi_slopes(self.num_heads, self.max_bias).to(device)

    def bias_diagonals(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """The bias once per diagonal, ``[H, q + kv - 1]`` fp32 (see :func:`hf_posenc.kernels.tiling.toeplitz`).
        Positions must be consecutive ranges."""
        distances = distance_diagonals(q_pos, k_pos)  # [q + kv - 1]
        magnitude = distances.to(torch.float32)
        if not causal:
            magnitude = magnitude.abs()
        return -self.slopes(q_pos.device)[:, None] * magnitude  # [H, q + kv - 1]

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """``[1, H, q, kv]`` fp32 bias."""
        return toeplitz(self.bias_diagonals(q_pos, k_pos, causal), q_pos.shape[0], k_pos.shape[0])[None]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_bias={self.max_bias}"


@dataclass(frozen=True)
class AlibiConfig(PosEncConfig):
    """ALiBi: linear attention biases (Press et al. 2022, https://arxiv.org/abs/2108.12409).

    Head ``h`` adds ``-m_h * |i - j|`` to its scores. Slopes are the paper's geometric sequence
    ``2^(-max_bias/n * (h+1))`` for ``n`` heads (for a non-power-of-two ``n``, the sequence of the
    closest lower power of two followed by every other slope of the next one). Encoders use the
    symmetric distance.

    Args:
        max_bias: The paper's 8: the exponent range of the slopes.
    """

    kind: str = "alibi"
    max_bias: float = 8.0
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        check_positive(self.kind, "max_bias", self.max_bias)


registry.register(registry.Encoding(
    kind="alibi",
    config_class=AlibiConfig,
    module_class=AlibiBias,
    build=lambda config, layer: AlibiBias(layer.num_heads, config.max_bias),
    capabilities=registry.Capabilities(
        route="bias", bias_form="diagonal", kernels=("dense", "diagonal_tiles", "key_fold"),
        # Far keys' logits make exp return denormal floats, which x86 computes slowly.
        flush_denormals=True,
    ),
    display_name="ALiBi",
    paper="https://arxiv.org/abs/2108.12409",
    backends=registry.OWN_BACKENDS,
    encoder_note="symmetric",
    example=registry.Example(prefill_kernels=("key_fold_cpu", "diagonal_tiles_cpu"), archs=("llama", "gpt2")),
))
