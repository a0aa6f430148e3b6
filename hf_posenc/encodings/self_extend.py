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

import torch

from .windowed_rope_attention import TwoPositionRope


class SelfExtend(TwoPositionRope):
    """Self-Extend on the model's own RoPE.

    Args:
        rope_parameters, head_dim, max_position_embeddings, layout: The model's RoPE
            (see :class:`~hf_posenc.encodings.rope.RotaryPosition`).
        group_size: ``G``, the number of consecutive positions that share one grouped position.
        neighbor_window: ``W``, the distances kept exact.
    """

    shift_variant = True

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, layout: str = "half",
                 *, group_size: int, neighbor_window: int):
        super().__init__(rope_parameters, head_dim, max_position_embeddings, layout, window=neighbor_window)
        self.group_size = int(group_size)

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, w = self.group_size, self.window
        # Integer floor division (also right for the negative positions of left pads, which are masked).
        return torch.div(q_pos, g, rounding_mode="floor") + (w - w // g), torch.div(k_pos, g, rounding_mode="floor")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
