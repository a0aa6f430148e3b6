"""Kernel ``row_tiles``: a causal bias that depends on the query row (``bias_form="rows"``: FIRE's per-row
normaliser), computed and attended one tile of query rows at a time, so that no ``[B, H, q, kv]`` bias, nor the
encoding's own per-pair intermediates over every (query, key) pair (FIRE's ``[q, kv, width]`` MLP hidden layer),
exists at any time.

Each tile of rows stops at its last visible key; its bias comes from the encoding's ``tile_bias`` and runs on
``F.scaled_dot_product_attention`` with a float mask. With a gradient, each tile runs under
``torch.utils.checkpoint``: forward keeps the tile's output only, and backward recomputes the tile's bias and
attention to take its gradients (q/k/v and the encoding's parameters, through autograd), one tile's memory at a
time. Rows per tile: as many as keep ``rows * keys`` under :data:`ROW_TILE_PAIRS` (at most
:data:`hf_posenc.kernels.tiling.TILE_ROWS`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from . import tiling
from .call import Call
from .dense import prepared

#: (query, key) pairs per tile: FIRE's MLP holds ``width`` fp32 values per pair (width 32: 8 MiB at 2^16 pairs),
#: besides the tile's ``[B, H, rows, keys]`` scores. 2^18 took the same time (one attention call at T=2048,
#: forward and backward) but added ~50 MiB to a short forward's peak.
ROW_TILE_PAIRS = 1 << 16


def row_tiles(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``row_tiles`` (see the module docstring). Returns ``(output [B, H, q, D], None)``."""
    query, key, value, allowed = prepared(call)
    q_len, kv_len = query.shape[2], key.shape[2]
    rows_per_tile = max(1, min(tiling.TILE_ROWS, ROW_TILE_PAIRS // kv_len))
    outputs = []
    for rows, limit in tiling.tiles(q_len, kv_len, call.diagonal, rows_per_tile):
        tile = (query[:, :, rows], key[:, :, :limit], value[:, :, :limit], allowed)
        if call.grad:
            # Recomputed in backward: only the tile's inputs (views of q/k/v and the caller's mask) and output are
            # kept; the tile's causal mask is rebuilt inside, as a saved one per tile would add up to [q, kv].
            outputs.append(checkpoint(_tile_attention, call, rows, *tile, use_reentrant=False))
        else:
            outputs.append(_tile_attention(call, rows, *tile))
    return (torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]), None


def _tile_attention(call: Call, rows: slice, query, key, value, allowed):
    """One tile: ``query`` ``[B, H, rows, D]`` on ``key``/``value`` ``[B, Hkv, limit, D]``; ``allowed`` the call's
    bool ``[B|1, 1, q, kv]`` or None (plain causality). Returns ``[B, H, rows, D]``."""
    limit = key.shape[2]
    if allowed is None:
        visible = tiling.causal_tile_mask(rows, limit, call.diagonal, query.device)  # [1, 1, rows, limit]
    else:
        visible = allowed[:, :, rows, :limit]  # [B|1, 1, rows, limit]
    bias = call.posenc.tile_bias(call, rows, limit, visible)  # [B|1, H, rows, limit] fp32
    mask = torch.where(visible, bias.to(query.dtype), torch.finfo(query.dtype).min)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=call.scaling,
                                          enable_gqa=key.shape[1] != query.shape[1])
