"""The shape of a model read from its config: layers, heads, head dimension and each layer's RoPE parameters.

The architectures (:mod:`hf_posenc.architectures`) say where things live; these helpers read the numbers
that every converter and loader needs from a transformers config.
"""

from __future__ import annotations

import math

from .architectures import Architecture

#: RoPE base given to architectures without RoPE.
DEFAULT_ROPE_THETA = 10000.0


def num_layers(config) -> int:
    """Number of transformer blocks."""
    return config.num_hidden_layers


def num_heads(config) -> int:
    """Number of query heads."""
    return config.num_attention_heads


def head_dim(config) -> int:
    """Per-head dimension (``config.head_dim`` where the config sets it)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_layer_types(config) -> list[str] | None:
    """The layer types with RoPE parameters of their own (Gemma 3, ModernBERT: local and global bases), or
    None when ``config.rope_parameters`` is one set for every layer."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(value, dict) for value in params.values()):
        return list(params)
    return None


def current_rope_parameters(config, arch: Architecture, layer_idx: int = 0) -> dict:
    """The RoPE parameters of layer ``layer_idx`` (a default set for architectures without RoPE)."""
    if arch.rope == "none":
        return {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA, "partial_rotary_factor": 1.0}
    if arch.rotary_dim is not None:
        # RoPE fixed in code (GPT-J): the default base over the first `rotary_dim` dimensions of each head.
        rotated = getattr(config, arch.rotary_dim, None) or head_dim(config)
        factor = rotated / head_dim(config)
        if int(head_dim(config) * factor) != rotated:  # rotary_dim() truncates the product: 30 / 44 * 44 < 30
            factor = math.nextafter(factor, math.inf)
        return {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA, "partial_rotary_factor": factor}
    params = dict(config.rope_parameters)
    if rope_layer_types(config) is not None:
        params = dict(params[config.layer_types[layer_idx]])
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return params
