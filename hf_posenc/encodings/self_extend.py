"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning",
https://arxiv.org/abs/2401.01325).

A RoPE model reads past its pretraining length without training by mapping unseen large distances onto
seen ones. For query position ``i`` and key position ``j <= i``, with group size ``G`` and neighbour
window ``W``::

    distance(i, j) = i - j                                          if i - j < W   (neighbour attention)
                   = floor(i / G) - floor(j / G) + W - floor(W / G)  otherwise      (grouped attention)

The shift ``W - floor(W / G)`` makes the grouped distances continue where the neighbour window ends. As
rotations, the grouped regime rotates the query at ``floor(i / G) + W - floor(W / G)`` and the key at
``floor(j / G)``. The largest distance at length ``L`` is about ``L / G + W - W / G``, so a model
pretrained on ``L_train`` positions reads up to ``(L_train - W) * G + W`` tokens with seen distances only.

Grouping is not shift-invariant (``floor`` depends on where a row starts), so rows are positioned by the
model's ``position_ids`` (``generate`` derives them from the attention mask): a left-padded row groups as
it would alone. The attention itself is the exact two-pass kernel of
:mod:`hf_posenc.encodings.windowed_rope_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import registry
from ..config import PosEncConfig, check_positive
from .windowed_rope_attention import TwoPositionRope, check_every_layer


@dataclass(frozen=True)
class SelfExtendConfig(PosEncConfig):
    """Self-Extend (Jin et al. 2024, https://arxiv.org/abs/2401.01325), training-free, on the model's own RoPE.

    Keys at distance ``i - j < neighbor_window`` keep it; farther keys get the grouped distance
    ``floor(i/G) - floor(j/G) + W - floor(W/G)``. A model pretrained on ``L`` positions sees only seen
    distances up to ``(L - W) * G + W`` tokens. Causal RoPE models only.

    Args:
        group_size: ``G`` (>= 1; 1 is plain RoPE).
        neighbor_window: ``W`` (>= 1).
    """

    kind: str = "self_extend"
    group_size: int = 4
    neighbor_window: int = 1024
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        check_positive(self.kind, "group_size", self.group_size, integer=True)
        check_positive(self.kind, "neighbor_window", self.neighbor_window, integer=True)
        check_every_layer(self.kind, self.layers)

    def is_base_within(self, length: int, trained_length: int) -> bool:
        # Every distance below W is exact; G = 1 groups nothing.
        return self.group_size == 1 or length <= self.neighbor_window


class SelfExtend(TwoPositionRope):
    """Self-Extend on the model's own RoPE.

    Args:
        rope_parameters, head_dim, max_position_embeddings, layout: The model's RoPE
            (see :class:`~hf_posenc.encodings.rope.RotaryPosition`).
        group_size: ``G``, the number of consecutive positions that share one grouped position.
        neighbor_window: ``W``, the distances kept exact.
    """

    shift_variant = True
    integer_positions = True

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, layout: str = "half",
                 *, group_size: int, neighbor_window: int):
        super().__init__(rope_parameters, head_dim, max_position_embeddings, layout, window=neighbor_window)
        self.group_size = int(group_size)

    def far_positions(self, q_pos, k_pos):
        g, w = self.group_size, self.window
        # Floor division (int tensors or Python ints alike; also right for the negative positions of left pads,
        # which are masked).
        return q_pos // g + (w - w // g), k_pos // g

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


registry.register(registry.Encoding(
    kind="self_extend",
    config_class=SelfExtendConfig,
    module_class=SelfExtend,
    build=lambda config, layer: SelfExtend.from_layer(layer, group_size=config.group_size,
                                                      neighbor_window=config.neighbor_window),
    capabilities=registry.Capabilities(route="two_position_rope", causal_only=True, extends_rope=True),
    display_name="Self-Extend",
    paper="https://arxiv.org/abs/2401.01325",
    backends=registry.OWN_BACKENDS,
    causal_reason="grouped distances are defined for keys before the query",
    # Windows shorter than the tests' sequences, so that both regimes run; low-precision tolerances not measured.
    example=registry.Example(params={"group_size": 2, "neighbor_window": 3},
                             prefill_kernels=("two_position_tiled", "two_position_tiled"), precision_tested=False),
))
