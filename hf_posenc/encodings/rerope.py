"""ReRoPE and Leaky ReRoPE (Su 2023, "Rectified Rotary Position Embeddings",
https://kexue.fm/archives/9708, code: https://github.com/bojone/rerope).

Training-free length extension by capping the relative distance RoPE sees. For query ``i`` and key
``j <= i`` with window ``w``::

    distance(i, j) = i - j                   if i - j < w
                   = w                       otherwise            (ReRoPE)
                   = w + (i - j - w) / k     otherwise            (Leaky ReRoPE, leak k)

As rotations, the far regime rotates the query at ``w`` and the key at ``0`` (ReRoPE), or the query at
``i / k + w - w / k`` and the key at ``j / k`` (Leaky ReRoPE). Both depend on ``i - j`` only, so cache
indices serve as positions (left pads change nothing). The attention is the exact two-pass kernel of
:mod:`hf_posenc.encodings.windowed_rope_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import registry
from ..config import PosEncConfig, check_positive, fail_field
from .windowed_rope_attention import TwoPositionRope, check_every_layer


@dataclass(frozen=True)
class ReRopeConfig(PosEncConfig):
    """ReRoPE / Leaky ReRoPE (Su 2023, https://kexue.fm/archives/9708), training-free, on the model's own RoPE.

    Distances below ``window`` are exact; beyond it they are ``window`` (ReRoPE), or
    ``window + (i - j - window) / leak`` (Leaky ReRoPE). Causal RoPE models only.

    Args:
        window: ``w`` (>= 1).
        leak: ``k`` of Leaky ReRoPE (> 1; 1 would be plain RoPE), or None for ReRoPE.
    """

    kind: str = "rerope"
    window: int = 512
    leak: float | None = None
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        check_positive(self.kind, "window", self.window, integer=True)
        check_positive(self.kind, "leak", self.leak, allow_none=True)
        if self.leak is not None and self.leak <= 1:
            fail_field(self.kind, "leak", self.leak, "None (ReRoPE) or a number > 1 (Leaky ReRoPE)")
        check_every_layer(self.kind, self.layers)

    def is_base_within(self, length: int, trained_length: int) -> bool:
        # Distances below the window are exact (leaky or not).
        return length <= self.window


class ReRoPE(TwoPositionRope):
    """ReRoPE (``leak=None``) or Leaky ReRoPE on the model's own RoPE.

    Args:
        rope_parameters, head_dim, max_position_embeddings, layout: The model's RoPE
            (see :class:`~hf_posenc.encodings.rope.RotaryPosition`).
        window: ``w``: distances below it are exact; beyond it they are ``w`` (or compressed by ``leak``).
        leak: ``k`` of Leaky ReRoPE, or None for ReRoPE.
    """

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, layout: str = "half",
                 *, window: int, leak: float | None = None):
        super().__init__(rope_parameters, head_dim, max_position_embeddings, layout, window=window)
        self.leak = None if leak is None else float(leak)
        self.integer_positions = leak is None  # Leaky ReRoPE's are fractional

    def far_positions(self, q_pos, k_pos):
        w = float(self.window)
        if self.leak is None:  # int tensors or Python ints alike
            return q_pos * 0 + self.window, k_pos * 0
        # Divided in fp64: rotate_at casts to its angle precision.
        k = self.leak
        return q_pos.double() / k + (w - w / k), k_pos.double() / k

    def far_keys_unrotated(self, scaling: float) -> bool:
        # ReRoPE rotates far keys at position 0: cos = scaling, sin = 0, the identity when scaling is 1.
        return self.leak is None and scaling == 1.0

    def extra_repr(self) -> str:
        return super().extra_repr() + f", leak={self.leak}"


registry.register(registry.Encoding(
    kind="rerope",
    config_class=ReRopeConfig,
    module_class=ReRoPE,
    build=lambda config, layer: ReRoPE.from_layer(layer, window=config.window, leak=config.leak),
    capabilities=registry.Capabilities(route="two_position_rope", causal_only=True, extends_rope=True),
    display_name="ReRoPE",
    paper="https://kexue.fm/archives/9708",
    backends=registry.OWN_BACKENDS,
    causal_reason="capped distances are defined for keys before the query",
    # A window shorter than the tests' sequences, so that both regimes run; low-precision tolerances not measured.
    example=registry.Example(params={"window": 3}, prefill_kernels=("two_position_tiled", "two_position_tiled"),
                             precision_tested=False),
))
