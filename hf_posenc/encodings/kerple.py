"""KERPLE: kernelized relative positional embedding (Chi et al. 2022, https://arxiv.org/abs/2205.09921).

Each head adds a learned conditionally positive definite kernel of the distance to its scores (paper §4):

* ``log``:   ``b(i, j) = -r1_h * log(1 + r2_h * |i - j|)``, ``r1, r2 > 0``;
* ``power``: ``b(i, j) = -r1_h * |i - j| ** r2_h``,         ``r1 > 0``, ``0 < r2 <= 2``.

The bias depends on ``|i - j|`` only, so it is given once per diagonal and rides on the tiled fused kernels
of ALiBi and T5 (``hf_posenc.kernels.tiling``); encoders use the same symmetric distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import registry
from ..config import PosEncConfig, fail_field
from ..kernels.tiling import distance_diagonals, toeplitz
from .base import PositionModule

#: The paper's two kernels (§4).
KERNELS = ("log", "power")
#: Lower bound of ``r2``, the authors' release's value (its code clamps both parameters to at least 1e-2).
R2_MIN = 1e-2
#: Upper bound of ``r2`` for the power kernel: ``-|d| ** p`` is conditionally positive definite for ``0 < p <= 2``.
POWER_MAX = 2.0


def projected(param: torch.Tensor, low: float, high: float | None = None) -> torch.Tensor:
    """``param`` clamped to ``[low, high]`` in value, with the gradient of the clamped value passed through.

    The authors keep the parameters in range by projection: before every use their code overwrites the
    stored values with the clamped ones, and the loss never sees the clamp. Here the stored parameter is not
    written inside ``forward`` (that breaks ``torch.compile``, gradient checkpointing's recomputation and
    read-only evaluation); the forward value is the projection and the gradient is the loss's gradient at
    that value, as in their code. A plain ``clamp`` would instead give zero gradient to a parameter once past
    a bound, which could never come back: with ``r1`` starting at its bound 0, one step that pushed it
    below would freeze the layer as a no-op for good.
    """
    return param + (param.clamp(low, high) - param).detach()


class KerpleBias(PositionModule):
    """Learned kernel bias per head, ``-r1_h * k(r2_h, |i - j|)``, added to the attention scores.

    ``r1`` starts at 0, so a freshly converted layer is exactly the NoPE model; ``r2`` starts at 1 (the power
    kernel is then ALiBi with a learned slope). With ``r1 = 0`` the bias does not depend on ``r2``: the first
    backward gives ``r2`` no gradient, only ``r1``; once a step has moved ``r1`` above 0, both learn. The
    authors initialise both at random (uniform) and floor ``r1`` at 0.01 too, which would change a pretrained
    model at once; the floor of ``r1`` is 0 here for the no-op start.

    Args:
        num_heads: Number of query heads.
        kernel: ``"log"`` or ``"power"`` (see the module docstring).
    """

    def __init__(self, num_heads: int, kernel: str = "log"):
        super().__init__()
        self.num_heads = num_heads
        self.kernel = kernel
        # [H] each, fp32 whatever the model dtype (created explicitly: a bf16 load would round r1 steps away).
        self.r1 = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))
        self.r2 = nn.Parameter(torch.ones(num_heads, dtype=torch.float32))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.r1.zero_()
            self.r2.fill_(1.0)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r1, r2)``, ``[H, 1]`` fp32 each, projected onto the ranges the kernel allows."""
        r1 = projected(self.r1.float(), 0.0)
        r2 = projected(self.r2.float(), R2_MIN, POWER_MAX if self.kernel == "power" else None)
        return r1[:, None], r2[:, None]

    def bias_diagonals(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """The bias once per diagonal, ``[H, q + kv - 1]`` fp32 (see :func:`hf_posenc.kernels.tiling.toeplitz`).
        Positions must be consecutive ranges; the distance is ``|i - j|`` for decoders and encoders alike
        (a decoder's future keys are masked)."""
        distance = distance_diagonals(q_pos, k_pos).abs().to(torch.float32)  # [q + kv - 1]
        r1, r2 = self.coefficients()
        if self.kernel == "log":
            return -r1 * torch.log1p(r2 * distance)  # [H, q + kv - 1]
        # d ** r2 from d >= 1 only: its r2-gradient d ** r2 * log(d) has no value at d = 0, where the bias is 0.
        return -r1 * distance.clamp(min=1).pow(r2) * (distance > 0)  # [H, q + kv - 1]

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """``[1, H, q, kv]`` fp32 bias."""
        return toeplitz(self.bias_diagonals(q_pos, k_pos, causal), q_pos.shape[0], k_pos.shape[0])[None]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kernel={self.kernel!r}"


@dataclass(frozen=True)
class KerpleConfig(PosEncConfig):
    """KERPLE (Chi et al. 2022, https://arxiv.org/abs/2205.09921): a learned kernel of ``|i - j|`` per head.

    ``log`` adds ``-r1 * log(1 + r2 * |i - j|)``, ``power`` adds ``-r1 * |i - j| ** r2`` (``r2 <= 2``), with
    learned ``r1 >= 0``, ``r2 >= 0.01`` per head and layer. ``r1`` starts at 0, so a fresh layer is a no-op;
    fine-tuning (PEFT: ``modules_to_save=["posenc"]``) learns both. Encoders use the symmetric distance.

    Args:
        kernel: ``"log"`` (the paper's best) or ``"power"``.
    """

    kind: str = "kerple"
    kernel: str = "log"
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        if self.kernel not in KERNELS:
            fail_field(self.kind, "kernel", self.kernel, f"one of {list(KERNELS)}")


registry.register(registry.Encoding(
    kind="kerple",
    config_class=KerpleConfig,
    module_class=KerpleBias,
    build=lambda config, layer: KerpleBias(layer.num_heads, config.kernel),
    capabilities=registry.Capabilities(route="bias", bias_form="diagonal", tables=("r1", "r2"),
                                       kernels=("dense", "diagonal_tiles")),
    display_name="KERPLE",
    paper="https://arxiv.org/abs/2205.09921",
    backends=registry.OWN_BACKENDS,
    encoder_note="symmetric",
    # r1, r2 randomised positive in tests, the paper's ranges. In bf16 their gradients are sums over every (query,
    # key) pair that cancel down to the kernel's variation along a row: a wider tolerance than the shared one.
    example=registry.Example(params={"kernel": "power"}, prefill_kernels=("diagonal_tiles_cpu", "diagonal_tiles_cpu"),
                             positive_tables=("r1", "r2"), bf16_table_grad_tol=0.1),
))
