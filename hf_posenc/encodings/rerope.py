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

import torch

from .windowed_rope_attention import TwoPositionRope


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

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = float(self.window)
        if self.leak is None:
            return torch.full_like(q_pos, self.window), torch.zeros_like(k_pos)
        # Divided in fp64: rotate_at casts to its angle precision.
        k = self.leak
        return q_pos.double() / k + (w - w / k), k_pos.double() / k

    def extra_repr(self) -> str:
        return super().extra_repr() + f", leak={self.leak}"
