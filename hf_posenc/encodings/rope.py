"""Rotary position embedding applied inside the attention function.

RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864). Architectures with native RoPE keep using
their own rotary module whenever the requested variant is expressible by stock transformers (see
``hf_posenc.convert``). This module covers the rest: models without RoPE (GPT-2, BERT), hybrid stacks
(``layers=``), partial rotary on models that do not support it natively, and the interleaved (GPT-J)
layout. Frequencies of every scaling variant come from transformers' ``ROPE_INIT_FUNCTIONS``; only the
``default`` frequencies (which transformers keeps in each model file) are computed here.

Keys are stored unrotated in the cache and rotated at attention time at their cache positions, so a
``dynamic`` scale always applies to all keys consistently (no keys cached under an older scale).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .base import PositionModule


def default_inv_freq(rope_theta: float, rotary_dim: int, device=None) -> torch.Tensor:
    """``theta^(-2i/d)`` for ``i < d/2`` (the paper's frequencies), fp32 ``[rotary_dim // 2]``."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (rope_theta**exponents)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX layout: dimension ``i`` pairs with ``i + d/2``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """GPT-J layout: dimension ``2i`` pairs with ``2i + 1``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryPosition(PositionModule):
    """RoPE applied to queries and keys at attention time.

    Args:
        rope_parameters: Stock ``rope_parameters`` dict (``rope_type``, ``rope_theta``,
            ``partial_rotary_factor`` and the scaling parameters of the type).
        head_dim: Per-head dimension.
        max_position_embeddings: The model's context length (used by dynamic/yarn/longrope defaults).
        layout: ``"half"`` or ``"interleaved"``.
    """

    route = "rotate"

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, layout: str = "half"):
        super().__init__()
        self.rope_parameters = dict(rope_parameters)
        self.layout = layout
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        partial = self.rope_parameters.get("partial_rotary_factor", 1.0)
        self.rotary_dim = int(head_dim * partial)
        self.rotary_dim -= self.rotary_dim % 2
        # A bare transformers config carrying what the stock frequency functions read.
        config = PreTrainedConfig()
        config.rope_parameters = dict(self.rope_parameters)
        config.head_dim = head_dim
        config.num_attention_heads = 1
        config.hidden_size = head_dim
        config.max_position_embeddings = max_position_embeddings
        config.standardize_rope_params()
        self._rope_config = config
        self._cache: dict = {}

    def frequencies(self, seq_len: int, device) -> tuple[torch.Tensor, float]:
        """Inverse frequencies ``[rotary_dim // 2]`` (fp32) and the cos/sin scaling for ``seq_len`` keys."""
        rope_type = self.rope_parameters.get("rope_type", "default")
        # dynamic and longrope depend on the length beyond the original context; the others do not.
        length_key = seq_len if rope_type in ("dynamic", "longrope") and seq_len > self.max_position_embeddings else 0
        key = (str(device), length_key)
        if key not in self._cache:
            if len(self._cache) > 64:  # dynamic scaling makes one entry per length while generating
                self._cache.clear()
            if rope_type == "default":
                inv_freq = default_inv_freq(self.rope_parameters["rope_theta"], self.rotary_dim, device)
                scaling = 1.0
            else:
                kwargs = {"seq_len": length_key} if length_key else {}
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self._rope_config, device, **kwargs)
            self._cache[key] = (inv_freq.to(device=device, dtype=torch.float32), float(scaling))
        return self._cache[key]

    def cos_sin(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape ``[len(positions), rotary_dim]`` in this module's layout."""
        inv_freq, scaling = self.frequencies(seq_len, positions.device)
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [n, rotary_dim/2]
        if self.layout == "half":
            angles = torch.cat((angles, angles), dim=-1)
        else:
            angles = angles.repeat_interleave(2, dim=-1)
        return angles.cos() * scaling, angles.sin() * scaling

    def _rotate_one(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, H, n, head_dim]; cos/sin: [n, rotary_dim] fp32 (cast to x's dtype like stock RoPE).
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rotate = rotate_half if self.layout == "half" else rotate_interleaved
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x_rot = x_rot * cos + rotate(x_rot) * sin
        return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot

    def rotate(self, query, key, q_pos, k_pos):
        # The live length (last query position + 1), not the key buffer length: a StaticCache's buffer is
        # longer than what it holds, and dynamic scaling must not depend on the cache type.
        seq_len = int(q_pos.max()) + 1
        q_cos, q_sin = self.cos_sin(q_pos, seq_len)
        k_cos, k_sin = self.cos_sin(k_pos, seq_len)
        return self._rotate_one(query, q_cos, q_sin), self._rotate_one(key, k_cos, k_sin)

    def extra_repr(self) -> str:
        return f"rope_parameters={self.rope_parameters}, rotary_dim={self.rotary_dim}, layout={self.layout!r}"
