"""Kernel ``key_fold_cpu``: causal ALiBi with its per-key term folded into an extra head dimension, tiles
of query rows on the fused CPU kernel (fp32 only; :class:`hf_posenc.kernels.cpu_fused.TiledFoldAttention`)."""

from __future__ import annotations

import torch

from . import cpu_fused
from .call import Call, own_heads
from .dense import expand_kv, prepared


def key_fold_cpu(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``key_fold_cpu`` (:func:`fold_on_cpu`). Returns ``(output [B, H, q, D], None)``."""
    query, key, value, allowed = prepared(call)
    slopes = own_heads(call.heads, call.posenc.slopes(query.device))  # [H]
    return fold_on_cpu(query, key, value, slopes, allowed, call.scaling, call.diagonal), None


def fold_on_cpu(query, key, value, slopes, allowed, scaling, diagonal):
    """Causal ALiBi (``slopes``: ``[H]`` fp32, one per query head of ``query``) with its per-key term folded into
    a head dimension, tile by tile on the fused CPU kernel (:class:`hf_posenc.kernels.cpu_fused.TiledFoldAttention`;
    fp32). Returns ``[B, H, q, D]``."""
    key, value = expand_kv(key, query.shape[1]), expand_kv(value, query.shape[1])
    return cpu_fused.TiledFoldAttention.apply(query, key, value, slopes, allowed,
                                                  diagonal, scaling)
