"""The interface every positional-encoding module implements.

A converted attention module carries its encoding as ``attn.posenc`` (a ``PositionModule``), so that
PEFT's ``modules_to_save=["posenc"]`` can make learned tables trainable and save them in the adapter.
The attention function (``hf_posenc.attention``) asks the module for one of three things:

* ``rotate(q, k, q_pos, k_pos)``: rotated queries/keys (RoPE family), or
* ``bias(q_pos, k_pos, causal)``: an additive score bias ``[1, H, q, kv]`` (ALiBi, T5), or
* ``attend(...)``: the whole attention, for encodings that need the logits (CoPE), or
* ``attend(query, key, value, q_pos, k_pos, ...)`` from unrotated q/k (route ``"two_position_rope"``:
  Self-Extend and ReRoPE, which rotate at two position sets inside their own two-pass attention).
"""

from __future__ import annotations

import torch
from torch import nn


class PositionModule(nn.Module):
    """Base class of the per-layer positional-encoding modules.

    Attributes:
        route: ``"rotate"``, ``"bias"``, ``"attend"`` or ``"two_position_rope"``: which hook the attention
            function uses.
    """

    route: str = ""

    def reset_parameters(self) -> None:
        """Initialise learned tables so that a fresh layer is a no-op where the method allows it.

        Called on conversion and by ``_init_weights`` when weights are missing from a checkpoint
        (models are built on the meta device, so this must not rely on construction-time values).
        """

    def rotate(self, query: torch.Tensor, key: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        raise NotImplementedError

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        raise NotImplementedError
