"""T5 relative position bias (Raffel et al. 2020, https://arxiv.org/abs/1910.10683, section 2.1)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import registry
from ..config import PosEncConfig, check_positive, fail_field
from ..kernels.tiling import distance_diagonals, toeplitz
from .base import PositionModule


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Map signed distances ``key - query`` to bucket indices.

    Half of the buckets (per direction when bidirectional) hold the exact distances 0..n/2-1; the rest
    cover distances up to ``max_distance`` logarithmically; farther pairs share the last bucket. A
    causal model only sees non-positive distances (keys in the past), which are folded to ``>= 0``.

    Args:
        relative_position: Integer tensor of ``key_position - query_position``.
        bidirectional: Encoders: keys after the query get their own half of the buckets.
        num_buckets: Total number of buckets.
        max_distance: Distance from which every pair falls in the last bucket.

    Returns:
        Long tensor of the same shape with values in ``[0, num_buckets)``.
    """
    offset = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        offset = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    is_small = distance < exact
    # log-spaced buckets for exact <= distance < max_distance; clamp(min=1) only avoids log(0) in the
    # entries that `is_small` discards.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return offset + torch.where(is_small, distance, large)


@functools.cache
def _causal_band_width(num_buckets: int, max_distance: int) -> int:
    """See :meth:`T5Bias.band_width` (cached: every layer asks on every forward)."""
    # CPU explicitly: the module may live on the meta device while a checkpoint loads.
    distances = torch.arange(max_distance + 1, device="cpu")
    buckets = relative_position_bucket(-distances, False, num_buckets, max_distance)
    # Buckets grow with the distance and reach the last one at max_distance at the latest.
    return int((buckets < num_buckets - 1).sum())


class T5Bias(PositionModule):
    """A learned scalar bias per (distance bucket, head), added to the attention scores.

    Args:
        num_heads: Number of query heads.
        num_buckets: Number of distance buckets.
        max_distance: See :func:`relative_position_bucket`.
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        # [num_buckets, H]; zero so that a freshly converted layer is exactly the NoPE model. fp32 whatever the
        # model dtype (explicitly: from_pretrained(dtype=bf16) builds under that default dtype and would round it).
        self.relative_attention_bias = nn.Parameter(torch.zeros(num_buckets, num_heads, dtype=torch.float32))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.relative_attention_bias.zero_()

    def bias_diagonals(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """The bias once per diagonal, ``[H, q + kv - 1]`` (see :func:`hf_posenc.kernels.tiling.toeplitz`).
        Positions must be consecutive ranges."""
        distances = distance_diagonals(q_pos, k_pos)  # i - j per diagonal, [q + kv - 1]
        # Buckets of key - query, once per diagonal instead of once per (query, key) pair.
        buckets = relative_position_bucket(-distances, not causal, self.num_buckets, self.max_distance)
        return self.relative_attention_bias[buckets].t()  # [H, q + kv - 1]

    def band_width(self) -> int:
        """Causal distances from this one on all fall in the last bucket (one shared bias value per head)."""
        return _causal_band_width(self.num_buckets, self.max_distance)

    def banded_diagonals(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, int]:
        """The causal bias per diagonal relative to the far bucket, and the band it is confined to.

        Causal softmax ignores a per-row constant, and every key a causal query sees is at distance
        ``>= 0``: subtracting the last bucket's value changes no attention weight, and leaves a bias that is
        exactly zero at every distance ``>= band_width()`` (``b_last - b_last``: whatever gradient reaches it
        cancels). Attention can then take the gradient of the table from that band alone
        (``hf_posenc.kernels.cpu_fused.TiledBiasAttention``).

        Args:
            q_pos, k_pos: Consecutive query and key positions.
            dtype: Precision of the subtraction (at least fp32 is used, so a bf16 table loses nothing more).

        Returns:
            ``([H, q + kv - 1] diagonals as in bias_diagonals, band width)``.
        """
        dtype = torch.promote_types(dtype, torch.float32)
        diagonals = self.bias_diagonals(q_pos, k_pos, True).to(dtype)  # [H, q + kv - 1]
        return diagonals - self.relative_attention_bias[-1].to(dtype)[:, None], self.band_width()

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """``[1, H, q, kv]`` bias."""
        return toeplitz(self.bias_diagonals(q_pos, k_pos, causal), q_pos.shape[0], k_pos.shape[0])[None]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}"


@dataclass(frozen=True)
class T5BiasConfig(PosEncConfig):
    """T5-style bucketed relative position bias (Raffel et al. 2020, https://arxiv.org/abs/1910.10683).

    A learned scalar per (bucket, head) is added to the scores. Buckets are exact for small distances
    and logarithmic up to ``max_distance``. Decoders bucket ``max(i - j, 0)``; encoders bucket the signed
    distance with half the buckets per direction. The table starts at zero, so a fresh layer is a no-op.
    One table per converted layer.

    Args:
        num_buckets: Number of buckets (>= 2; even on encoders).
        max_distance: Distance from which all pairs share the last bucket.
    """

    kind: str = "t5_bias"
    num_buckets: int = 32
    max_distance: int = 128
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        check_positive(self.kind, "num_buckets", self.num_buckets, integer=True)
        check_positive(self.kind, "max_distance", self.max_distance, integer=True)
        if self.num_buckets < 4:
            fail_field(self.kind, "num_buckets", self.num_buckets, "an integer >= 4")
        if self.max_distance <= self.num_buckets // 2:
            fail_field(self.kind, "max_distance", self.max_distance,
                       f"an integer > num_buckets // 2 ({self.num_buckets // 2})")


def _encoder_buckets(config: T5BiasConfig, causal: bool) -> str | None:
    if not causal and config.num_buckets % 2:
        return (f"invalid num_buckets={config.num_buckets} on an encoder; allowed: an even number "
                "(half of the buckets per direction)")
    return None


registry.register(registry.Encoding(
    kind="t5_bias",
    config_class=T5BiasConfig,
    module_class=T5Bias,
    build=lambda config, layer: T5Bias(layer.num_heads, config.num_buckets, config.max_distance),
    capabilities=registry.Capabilities(
        route="bias", bias_form="banded", tables=("relative_attention_bias",), kernels=("dense", "diagonal_tiles"),
    ),
    display_name="T5 relative bias",
    paper="https://arxiv.org/abs/1910.10683",
    backends=registry.OWN_BACKENDS,
    encoder_note="bidirectional",
    check=_encoder_buckets,
    example=registry.Example(params={"num_buckets": 8, "max_distance": 20},
                             prefill_kernels=("diagonal_tiles_cpu", "diagonal_tiles_cpu"), archs=("qwen3", "bert")),
))
