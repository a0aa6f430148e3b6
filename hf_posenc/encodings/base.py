"""The interface every positional-encoding module implements.

A converted attention module carries its encoding as ``attn.posenc`` (a ``PositionModule``), so that
PEFT's ``modules_to_save=["posenc"]`` can make learned tables trainable and save them in the adapter.
Which hook the attention function (``hf_posenc.attention``) uses is declared in the encoding's registry
entry (``hf_posenc.registry.Capabilities.route``), one of four:

* ``rotate(q, k, q_pos, k_pos)``: rotated queries/keys (RoPE family), or
* ``bias(q_pos, k_pos, causal)``: an additive score bias ``[1, H, q, kv]`` (ALiBi, T5), or
* ``attend(...)``: the whole attention, for encodings that need the logits (CoPE), or
* ``near_and_far(query, key, q_pos, k_pos, ...)``: unrotated q/k rotated at two position sets
  (``two_position_rope``: Self-Extend and ReRoPE), which the two-position kernels
  (:mod:`hf_posenc.kernels.two_position`) merge exactly; a decode step asks ``decode_keys`` for one key tensor
  that one attention call reads.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import registry


class PositionModule(nn.Module):
    """Base class of the per-layer positional-encoding modules (capabilities: ``hf_posenc.registry``)."""

    def registry_entry(self) -> registry.Encoding:
        """This module's registry entry. A method, so that wrappers which forward attribute access to the
        module they wrap (PEFT's ``modules_to_save``) resolve to the wrapped module's entry."""
        return registry.entry_of(self)

    def reset_parameters(self) -> None:
        """Initialise learned tables so that a fresh layer is a no-op where the method allows it.

        Called on conversion and by ``_init_weights`` when weights are missing from a checkpoint
        (models are built on the meta device, so this must not rely on construction-time values).
        """

    def rotate(self, query: torch.Tensor, key: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               heads=None):
        """Rotated ``(query [B, H, q, D], key [B, Hkv, kv, D])``. ``heads``: the layer's heads the call holds under
        sequence parallelism (:class:`hf_posenc.kernels.call.Heads`, None: all); per-head parameters take their
        rows from it."""
        raise NotImplementedError

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        raise NotImplementedError
