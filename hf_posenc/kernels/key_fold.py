"""Kernels ``key_fold_cpu`` and ``key_term_fold_cpu``: causal biases that are a per-key term up to a row constant
(ALiBi's ``-m_h (i - j)``, FoX's ``F_i - F_j``) folded into an extra head dimension, tiles of query rows on the
fused CPU kernel (fp32 only; :class:`hf_posenc.kernels.cpu_fused.TiledFoldAttention`)."""

from __future__ import annotations

import torch

from . import cpu_fused
from .call import Call, own_heads
from .dense import expand_kv, prepared, sdpa_attention


def key_fold_cpu(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``key_fold_cpu`` (:func:`fold_on_cpu`). Returns ``(output [B, H, q, D], None)``."""
    query, key, value, allowed = prepared(call)
    slopes = own_heads(call.heads, call.posenc.slopes(query.device))  # [H]
    return fold_on_cpu(query, key, value, slopes, allowed, call.scaling, call.diagonal), None


def key_term_fold_cpu(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``key_term_fold_cpu``: the encoding's differentiable per-key terms ``t_j`` (``key_terms(call)``,
    ``[B, H, kv]`` fp32; the logit of query ``i`` on key ``j`` gains ``t_j`` up to a constant per row) folded
    tile by tile, as ALiBi's slopes are (:func:`fold_on_cpu`). A module that adds nothing right now (``key_terms``
    returns None: FoX at its identity start) takes SDPA without a bias. Returns ``(output [B, H, q, D], None)``."""
    query, key, value, allowed = prepared(call)
    terms = call.posenc.key_terms(call)
    if terms is None:
        return sdpa_attention(query, key, value, allowed, None, call.scaling, call.dropout, call.training,
                              call.plain_causal)
    return fold_on_cpu(query, key, value, None, allowed, call.scaling, call.diagonal, terms), None


def fold_on_cpu(query, key, value, slopes, allowed, scaling, diagonal, terms=None):
    """Causal ALiBi (``slopes``: ``[H]`` fp32, one per query head of ``query``) or per-key ``terms``
    (``[B|1, H, kv]`` fp32, differentiable) folded into a head dimension, tile by tile on the fused CPU kernel
    (:class:`hf_posenc.kernels.cpu_fused.TiledFoldAttention`; fp32). Returns ``[B, H, q, D]``."""
    key, value = expand_kv(key, query.shape[1]), expand_kv(value, query.shape[1])
    return cpu_fused.TiledFoldAttention.apply(query, key, value, slopes, allowed, diagonal, scaling, terms)
