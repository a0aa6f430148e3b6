"""Kernel ``attend``: the encoding computes the whole attention itself, as it needs the logits (CoPE).

Its ``attend(query, key, value, allowed, scaling, return_weights, diagonal, softcap)`` also applies the layer's
logit soft-capping (``softcap``: Gemma 2's constant, or None).
"""

from __future__ import annotations

import torch

from .call import Call
from .dense import expand_kv, prepared


def attend(call: Call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the layer's ``posenc.attend`` on the cast q/k/v with GQA heads expanded.

    Returns:
        ``(output [B, H, q, D], probabilities [B, H, q, kv] or None)``: weights for the eager backend only.
    """
    query, key, value, allowed = prepared(call)
    # Causal query row r sees keys j <= r + diagonal (both position ranges are consecutive). With no mask
    # the encoding builds causality per block instead of a [q, kv] mask here.
    diagonal = None
    if call.causal:
        # Compiled: a mask alone makes it causal; without one, queries and keys align (diagonal 0).
        diagonal = (0 if allowed is None else None) if call.compiling else call.diagonal
    key, value = expand_kv(key, query.shape[1]), expand_kv(value, query.shape[1])
    # A soft-capping layer (Gemma 2) hands its cap on: the encoding applies it to the logits it computes.
    return call.posenc.attend(query, key, value, allowed, call.scaling, return_weights=call.backend == "eager",
                              diagonal=diagonal, softcap=call.logit_cap if call.softcap else None)
