"""The dense kernels: explicit scores (``eager``) and ``F.scaled_dot_product_attention`` (``sdpa``), any route
but the encoding's own attention, with a bias encoding's whole ``[H, q, kv]`` bias where it has one.

:func:`prepared` is the shared first step of every kernel that attends over one rotation of q/k: the
rotation route's rotation, the cast to the compute dtype and the keys each query may see.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..positions import allowed_keys
from .call import Call, own_heads


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat grouped key/value heads ``[B, Hkv, n, D]`` to ``[B, H, n, D]`` (GQA)."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def prepared(call: Call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(query, key, value, allowed)`` of a call: q/k rotated (rotation route) and q/k/v cast to the compute
    dtype, ``allowed`` the bool ``[B|1, 1, q, kv]`` keys each query may see (None: plain causality on the
    stock fast path)."""
    query, key, value = call.query, call.key, call.value
    if call.capabilities.route == "rotate" or call.capabilities.rotates:
        # Before the cast, as stock RoPE does: under autocast q/k still hold fp32 here.
        store = call.key_store if getattr(call.posenc, "keeps_rotated_keys", False) else None
        stored = {} if store is None else {"store": store}  # rotated keys kept beside the cache (inference)
        query, key = call.posenc.rotate(query, key, call.q_pos, call.k_pos, heads=call.heads, **stored)
    query, key, value = query.to(call.dtype), key.to(call.dtype), value.to(call.dtype)
    # Explicit scores (eager backend, soft-capping) need the whole mask, whichever kernel runs, unless every
    # query sees every key (a decode step): then there is nothing to mask.
    plain = (call.plain_causal and not call.explicit) or call.every_key_visible
    allowed = None if plain else allowed_keys(call.attention_mask, call.q_pos, call.k_pos, call.causal)
    return query, key, value, allowed


def _dense_bias(call: Call, allowed: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A bias encoding's whole bias ``[H|B, H, q, kv]`` (None for other routes) and the mask to go with it."""
    if call.capabilities.route != "bias":
        return None, allowed
    # The dense kernels take a bias for the eager backend (explicit weights), soft-capped layers,
    # bidirectional (encoder) biases and compiled forwards.
    if call.capabilities.bias_form == "rows":
        # For the call's own heads (call.heads); None: exactly zero (FoX's identity start).
        bias = call.posenc.row_bias(call, allowed)
        if bias is None:
            return None, allowed
    else:
        bias = own_heads(call.heads, call.posenc.bias(call.q_pos, call.k_pos, call.causal), dim=1)  # [1, H, q, kv]
    if allowed is None and call.causal:  # sdpa's causal flag is off with a float bias: causality goes in the mask
        allowed = allowed_keys(None, call.q_pos, call.k_pos, call.causal)
    return bias, allowed


def eager(call: Call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel ``eager``: explicit scores; the weights come back for the eager backend only. Returns
    ``(output [B, H, q, D], probabilities [B, H, q, kv] or None)``."""
    query, key, value, allowed = prepared(call)
    bias, allowed = _dense_bias(call, allowed)
    output, weights = eager_attention(query, key, value, allowed, bias, call.scaling, call.dropout, call.training,
                                      call.logit_cap)
    return output, (weights if call.backend == "eager" else None)


def sdpa(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``sdpa``: ``F.scaled_dot_product_attention``. Returns ``(output [B, H, q, D], None)``."""
    query, key, value, allowed = prepared(call)
    bias, allowed = _dense_bias(call, allowed)
    return sdpa_attention(query, key, value, allowed, bias, call.scaling, call.dropout, call.training,
                          call.plain_causal)


def eager_attention(query, key, value, allowed, bias, scaling, dropout, training, softcap=None):
    """Reference attention: explicit scores and probabilities (supports ``output_attentions``).

    ``softcap`` (Gemma 2): the content logits become ``tanh(s / c) * c`` as in stock eager attention; a
    position bias is added after the cap, so that ALiBi/T5 distances are not squashed with the logits.
    """
    key, value = expand_kv(key, query.shape[1]), expand_kv(value, query.shape[1])
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        # fp32 so that large distance biases (ALiBi at long range) keep their resolution in bf16 models.
        scores = scores.float() + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value), probs


def sdpa_attention(query, key, value, allowed, bias, scaling, dropout, training, plain_causal):
    """``F.scaled_dot_product_attention``, with the bias folded into a float mask when there is one."""
    mask = allowed
    if bias is not None:
        bias = bias.to(query.dtype)
        mask = bias if allowed is None else torch.where(allowed, bias, torch.finfo(query.dtype).min)
    elif plain_causal:
        mask = None  # the fast causal kernel (aligned top-left, so only valid for q == kv)
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout if training else 0.0,
        scale=scaling,
        is_causal=plain_causal and bias is None,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output, None
