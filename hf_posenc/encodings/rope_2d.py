"""2-D RoPE for vision transformers (Heo et al. 2024, https://arxiv.org/abs/2403.13298).

A patch at grid row ``y`` and column ``x`` rotates each query/key frequency pair ``t`` by the angle
``theta_t^x * x + theta_t^y * y``:

* **RoPE-Axial**: the first ``d/4`` frequencies rotate by the column only, the other
  ``d/4`` by the row only, each axis with ``theta_t = base^(-t / (d/4))`` (``base`` 100, the authors' ``rope_theta``).
* **RoPE-Mixed**: every frequency rotates by both axes with frequencies ``(theta^x, theta^y)``
  learned per layer and head (the ``theta`` table, fp32). At conversion each head gets the paper's
  initialisation: magnitudes ``base^(-t / (d/4))`` (``base`` 10), the first ``d/4`` pointing along a random
  direction ``phi_h`` in the ``(x, y)`` plane and the other ``d/4`` along ``phi_h + pi/2``.

Axial is Mixed with axis-aligned, fixed frequencies, so one rotation serves both. Pairs use the half layout
(dimension ``i`` with ``i + d/2``, as ``rotate_half``); models converted here had no RoPE, so the layout is
free. Tokens before the patches (CLS, DeiT's distillation token, DINOv2's registers) sit at position
``(0, 0)``, an identity rotation: they stay unrotated, as in the paper. The positions come from the grid of
the image each forward reads (``hf_posenc.positions.grid_positions``), so a converted model reads any
resolution without interpolating a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import registry
from ..config import PosEncConfig, check_positive, fail_field
from .base import PositionModule
from .rope import default_inv_freq, rotate_half

VARIANTS = ("axial", "mixed")
#: The paper's frequency bases (its code's ``rope_theta``): 100 for RoPE-Axial, 10 for RoPE-Mixed's init.
DEFAULT_BASE = {"axial": 100.0, "mixed": 10.0}


@dataclass(frozen=True)
class Rope2dConfig(PosEncConfig):
    """2-D rotary position embedding of image patches (Heo et al. 2024, https://arxiv.org/abs/2403.13298).

    Args:
        variant: ``"axial"`` (fixed frequencies, half per axis) or ``"mixed"`` (learned frequencies per
            head over both axes, the ``theta`` table).
        rope_theta: Frequency base; None: the paper's (100 for axial, 10 for mixed's initialisation).
        layers: Layers that get it; the others get none.
    """

    kind: str = "rope_2d"
    variant: str = "axial"
    rope_theta: float | None = None
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        if self.variant not in VARIANTS:
            fail_field(self.kind, "variant", self.variant, ", ".join(repr(v) for v in VARIANTS))
        check_positive(self.kind, "rope_theta", self.rope_theta, allow_none=True)

    @property
    def base(self) -> float:
        """The frequency base in effect."""
        return self.rope_theta if self.rope_theta is not None else DEFAULT_BASE[self.variant]


class Rope2D(PositionModule):
    """Rotates queries and keys by their ``(row, column)`` patch positions.

    Args:
        num_heads: Query heads (one learned frequency set each, mixed variant).
        head_dim: Per-head dimension, a multiple of 4 (``d/4`` frequencies per axis).
        variant: ``"axial"`` or ``"mixed"``.
        base: Frequency base (see :class:`Rope2dConfig`).

    Raises:
        ValueError: ``head_dim`` is not a multiple of 4.
    """

    def __init__(self, num_heads: int, head_dim: int, variant: str = "axial", base: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"PosEncConfig(kind='rope_2d') needs a head dimension divisible by 4 (d/4 frequencies "
                             f"per axis); this model has head_dim={head_dim}.")
        self.num_heads, self.head_dim, self.variant, self.base = num_heads, head_dim, variant, base
        if variant == "mixed":
            # [axis (row, column), H, d/2], created fp32: angles reach tens of radians on large grids.
            self.theta = nn.Parameter(torch.empty(2, num_heads, head_dim // 2, dtype=torch.float32))
            self.reset_parameters()

    def magnitudes(self, device=None) -> torch.Tensor:
        """``base^(-t / (d/4))`` for ``t < d/4``, fp32 ``[d/4]``."""
        return default_inv_freq(self.base, self.head_dim // 2, device)

    def reset_parameters(self) -> None:
        """The paper's RoPE-Mixed initialisation (random direction per head, drawn from torch's RNG)."""
        if self.variant != "mixed":
            return
        with torch.no_grad():
            magnitude = self.magnitudes(self.theta.device).repeat(2)  # [d/2]
            quarter = self.head_dim // 4
            phi = torch.rand(self.num_heads, 1, device=self.theta.device) * (2 * math.pi)  # [H, 1]
            direction = torch.cat((phi.expand(-1, quarter), phi.expand(-1, quarter) + math.pi / 2), dim=-1)
            self.theta[0].copy_(magnitude * direction.sin())  # row (y) components
            self.theta[1].copy_(magnitude * direction.cos())  # column (x) components

    def frequencies(self, device) -> torch.Tensor:
        """fp32 ``[2 (row, column), H or 1, d/2]``: the frequency of each pair along each axis."""
        if self.variant == "mixed":
            return self.theta.float()
        magnitude = self.magnitudes(device)
        zeros = torch.zeros_like(magnitude)
        # The first d/4 pairs follow the column (x), the others the row (y), as the paper's code concatenates.
        return torch.stack((torch.cat((zeros, magnitude)), torch.cat((magnitude, zeros))))[:, None]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` ``[H or 1, n, d]`` of ``(row, column)`` positions ``[n, 2]``."""
        angles = torch.einsum("na,ahf->hnf", positions.to(torch.float32), self.frequencies(positions.device))
        angles = torch.cat((angles, angles), dim=-1)  # pair (i, i + d/2) shares frequency i
        return angles.cos(), angles.sin()

    def rotate(self, query, key, q_pos, k_pos, heads=None):
        # ``heads`` (sequence parallelism) changes nothing: the frequencies are the same for every head.
        # query: [B, H, q, d], key: [B, H, kv, d]; q_pos [q, 2], k_pos [kv, 2] (row, column).
        q_cos, q_sin = self.cos_sin(q_pos)
        k_cos, k_sin = (q_cos, q_sin) if k_pos is q_pos else self.cos_sin(k_pos)

        def apply(x, cos, sin):
            return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)

        return apply(query, q_cos, q_sin), apply(key, k_cos, k_sin)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, base={self.base}, head_dim={self.head_dim}"


registry.register(registry.Encoding(
    kind="rope_2d",
    config_class=Rope2dConfig,
    module_class=Rope2D,
    build=lambda config, layer: Rope2D(layer.num_heads, layer.head_dim, config.variant, config.base),
    capabilities=registry.Capabilities(route="rotate", tables=("theta",), patch_grid=True),
    display_name="2-D RoPE (RoPE-ViT)",
    paper="https://arxiv.org/abs/2403.13298",
    backends=registry.OWN_BACKENDS,
    example=registry.Example(prefill_kernels=("sdpa", "sdpa")),
))
