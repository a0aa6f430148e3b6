"""ALiBi: attention with linear biases (Press et al. 2022, https://arxiv.org/abs/2108.12409)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import registry
from ..config import PosEncConfig, check_positive, fail_field
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
        slopes: Explicit per-head slopes instead of the paper's (``AlibiConfig.slopes``).

    Raises:
        ValueError: ``slopes`` does not give one slope per head.
    """

    def __init__(self, num_heads: int, max_bias: float = 8.0, slopes: tuple[float, ...] | None = None):
        super().__init__()
        if slopes is not None and len(slopes) != num_heads:
            raise ValueError(f"PosEncConfig(kind='alibi'): invalid slopes (length {len(slopes)}); allowed: one slope "
                             f"per attention head ({num_heads} for this model).")
        self.num_heads = num_heads
        self.max_bias = max_bias
        self.explicit_slopes = slopes

    def slopes(self, device: torch.device) -> torch.Tensor:
        """``[H]`` fp32 slopes ``m_h`` (the ``key_fold`` kernel folds ``-m_h (i - j)`` into a head dimension)."""
        if self.explicit_slopes is not None:
            return torch.tensor(self.explicit_slopes, dtype=torch.float32, device=device)
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
        own = "" if self.explicit_slopes is None else ", explicit slopes"
        return f"num_heads={self.num_heads}, max_bias={self.max_bias}{own}"


@dataclass(frozen=True)
class AlibiConfig(PosEncConfig):
    """ALiBi: linear attention biases (Press et al. 2022, https://arxiv.org/abs/2108.12409).

    Head ``h`` adds ``-m_h * |i - j|`` to its scores. Slopes are the paper's geometric sequence
    ``2^(-max_bias/n * (h+1))`` for ``n`` heads (for a non-power-of-two ``n``, the sequence of the
    closest lower power of two followed by every other slope of the next one). Encoders use the
    symmetric distance.

    Args:
        max_bias: The paper's 8: the exponent range of the slopes.
        slopes: One slope per attention head, used instead of the paper's sequence (``max_bias`` is then
            unused): a model's own ALiBi, e.g. a Falcon ALiBi checkpoint's (:func:`hf_posenc.native_alibi`).
    """

    kind: str = "alibi"
    max_bias: float = 8.0
    layers: tuple[int, ...] | None = None
    slopes: tuple[float, ...] | None = None

    def _validate(self) -> None:
        check_positive(self.kind, "max_bias", self.max_bias)
        if self.slopes is not None:
            if isinstance(self.slopes, str | bytes) or not hasattr(self.slopes, "__iter__") or not self.slopes:
                fail_field(self.kind, "slopes", self.slopes, "None or a non-empty list of positive numbers")
            object.__setattr__(self, "slopes", tuple(self.slopes))  # a saved config gives a list
            for slope in self.slopes:
                check_positive(self.kind, "slopes", slope)


registry.register(registry.Encoding(
    kind="alibi",
    config_class=AlibiConfig,
    module_class=AlibiBias,
    build=lambda config, layer: AlibiBias(layer.num_heads, config.max_bias, config.slopes),
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
