"""Causal per-diagonal biases (ALiBi, T5, KERPLE) tile by tile: no ``[B, H, q, kv]`` bias exists at any time.

Kernel ``diagonal_tiles_cpu`` runs the tiles on the fused CPU kernel (:mod:`hf_posenc.kernels.cpu_fused`),
``diagonal_tiles_sdpa`` on ``F.scaled_dot_product_attention`` (other devices, decode steps, dropout).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from . import cpu_fused, tiling
from .call import Call, own_heads
from .dense import expand_kv, prepared


def diagonal_tiles_cpu(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``diagonal_tiles_cpu`` (:func:`tiles_on_cpu`). Returns ``(output [B, H, q, D], None)``."""
    query, key, value, allowed = prepared(call)
    return tiles_on_cpu(query, key, value, call.posenc, call.capabilities, allowed, call.q_pos, call.k_pos,
                        call.scaling, call.diagonal, call.heads), None


def diagonal_tiles_sdpa(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``diagonal_tiles_sdpa`` (:func:`tiles_on_sdpa`). Returns ``(output [B, H, q, D], None)``."""
    query, key, value, allowed = prepared(call)
    return tiles_on_sdpa(query, key, value, call.posenc, call.capabilities, allowed, call.q_pos, call.k_pos,
                         call.scaling, call.dropout, call.training, call.diagonal, call.heads), None


def _diagonals(posenc, capabilities, q_pos, k_pos, dtype, heads=None):
    """The causal bias per diagonal ``[H, q + kv - 1]`` (the call's ``heads`` only) and the band its gradient
    comes from.

    A ``banded`` bias gives its values relative to the far constant (zero past the band); a ``diagonal``
    one varies at every distance, so its band is every distance a causal query sees: ``0 .. kv - 1``.
    """
    if capabilities.bias_form == "banded":
        diagonals, band = posenc.banded_diagonals(q_pos, k_pos, dtype)
        return own_heads(heads, diagonals), band
    return own_heads(heads, posenc.bias_diagonals(q_pos, k_pos, True)), k_pos.shape[0]


def tiles_on_cpu(query, key, value, posenc, capabilities, allowed, q_pos, k_pos, scaling, diagonal, heads=None):
    """Causal per-diagonal bias on the fused CPU kernel (:class:`hf_posenc.kernels.cpu_fused.TiledBiasAttention`):
    the fused kernel even when the bias is learned (its gradient comes from the band where it varies), with
    denormals flushed where the encoding declares it.

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, Hkv, kv, D]``.
        posenc, capabilities: The layer's bias module and its declared capabilities.
        allowed: Bool ``[B|1, 1, q, kv]`` or None (plain causality).
        diagonal: See :func:`hf_posenc.positions.causal_diagonal`.
        heads: The layer's query heads that ``query`` holds (:class:`hf_posenc.kernels.call.Heads`; None: all).

    Returns:
        ``[B, H, q, D]``.
    """
    diagonals, band = _diagonals(posenc, capabilities, q_pos, k_pos, query.dtype, heads)
    key, value = expand_kv(key, query.shape[1]), expand_kv(value, query.shape[1])
    # The fused kernel adds an fp32 mask to its fp32 logits whatever the q/k/v dtype: the bias keeps its full
    # resolution in bf16/fp16 models (ALiBi's -m * d at large distances).
    return cpu_fused.TiledBiasAttention.apply(query, key, value, diagonals.float(), allowed, diagonal, band,
                                                  scaling, capabilities.flush_denormals)


def tiles_on_sdpa(query, key, value, posenc, capabilities, allowed, q_pos, k_pos, scaling, dropout, training,
                        diagonal, heads=None):
    """Causal attention with a relative bias on SDPA, one call per tile of query rows.

    A float mask takes SDPA off its causal kernel, so one call over ``[q, kv]`` pays for the masked upper
    triangle too. Tiles of rows stop at the diagonal (row ``r`` sees keys ``j <= r + diagonal``), which
    halves that work, and each tile's bias is expanded from the per-diagonal values for that tile only: no
    ``[B, H, q, kv]`` bias exists at any time. Arguments as :func:`tiles_on_cpu`.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    diagonals, _ = _diagonals(posenc, capabilities, q_pos, k_pos, query.dtype, heads)
    diagonals = diagonals.to(query.dtype)  # SDPA wants the mask in the query dtype
    fill = torch.finfo(query.dtype).min
    if allowed is None:  # future keys carry the mask value
        diagonals = tiling.future_filled(diagonals, tiling.distance_diagonals(q_pos, k_pos), fill)
    outputs = []
    for rows, limit in tiling.tiles(q_len, kv_len, diagonal):
        mask = tiling.diagonal_block(diagonals, rows, slice(0, limit), kv_len)[None]  # [1, H, qb, limit]
        if allowed is not None:
            mask = torch.where(allowed[:, :, rows, :limit], mask, fill)
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, rows], key[:, :, :limit], value[:, :, :limit], attn_mask=mask,
            dropout_p=dropout if training else 0.0, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
