"""Kernel ``row_tiles``: a causal bias that depends on the query row (``bias_form="rows"``: FIRE's per-row
normaliser), computed and attended one tile of query rows at a time, so that no ``[B, H, q, kv]`` bias, nor the
encoding's own per-pair intermediates over every (query, key) pair (FIRE's ``[q, kv, width]`` MLP hidden layer),
exists at any time.

Each tile of rows stops at its last visible key; its bias comes from the encoding's ``tile_bias`` and runs on
``F.scaled_dot_product_attention`` with a float mask. With a gradient, forward keeps nothing of the tiles and
backward recomputes each tile with autograd to take its gradients (q/k/v and the encoding's parameters), one
tile's memory at a time (:class:`_RowTiles`). Rows per tile: as many as keep ``rows * keys`` under
:data:`ROW_TILE_PAIRS` (at most :data:`hf_posenc.kernels.tiling.TILE_ROWS`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    if not call.grad:
        with torch.no_grad():
            return _tiles_forward(call, query, key, value, allowed), None
    params = [p for p in call.posenc.parameters() if p.requires_grad]
    return _RowTiles.apply(call, allowed, query, key, value, *params), None


def _tiles(call: Call, q_len: int, kv_len: int):
    rows_per_tile = max(1, min(tiling.TILE_ROWS, ROW_TILE_PAIRS // kv_len))
    return tiling.tiles(q_len, kv_len, call.diagonal, rows_per_tile)


def _tiles_forward(call: Call, query, key, value, allowed) -> torch.Tensor:
    output = query.new_empty(query.shape)
    for rows, limit in _tiles(call, query.shape[2], key.shape[2]):
        output[:, :, rows] = _tile_attention(call, rows, query[:, :, rows], key[:, :, :limit], value[:, :, :limit],
                                             allowed)
    return output


class _RowTiles(torch.autograd.Function):
    """The tiles without gradient in forward; backward recomputes each tile with autograd and takes its gradients
    in the tile's q/k/v and the encoding's parameters, accumulated in place (per-tile checkpoints instead would
    give each tile's key gradient as a whole ``[B, Hkv, kv, D]`` tensor to add, and keep an RNG state per tile).

    Args (``apply``, positional): the call, ``allowed`` (bool ``[B|1, 1, q, kv]`` or None), query ``[B, H, q, D]``,
    key, value ``[B, Hkv, kv, D]``, then the encoding's parameters that require a gradient (which the tiles'
    bias reads from the module itself; passed so that autograd routes their gradients here).
    """

    @staticmethod
    def forward(ctx, call, allowed, query, key, value, *params):
        ctx.call, ctx.params = call, params  # the module's own parameters, which the recomputed tiles read
        ctx.save_for_backward(allowed, query, key, value)
        # SDPA's math kernel, as backward's recomputation takes (its mask requires a gradient there): the output
        # that the next layers see is the one whose gradient backward computes (in bf16 the fused kernel rounds
        # otherwise, which moved FIRE's threshold gradient in tests/test_dtypes.py past its tolerance).
        with sdpa_kernel(SDPBackend.MATH):
            return _tiles_forward(call, query, key, value, allowed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        allowed, query, key, value = ctx.saved_tensors
        params = ctx.params
        grad_q, grad_k, grad_v = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        grad_params = [torch.zeros_like(p) for p in params]
        for rows, limit in _tiles(ctx.call, query.shape[2], key.shape[2]):
            with torch.enable_grad():
                tile = [x.detach().requires_grad_(True) for x in (query[:, :, rows], key[:, :, :limit],
                                                                  value[:, :, :limit])]
                output = _tile_attention(ctx.call, rows, *tile, allowed)
                grads = torch.autograd.grad(output, (*tile, *params), grad[:, :, rows], allow_unused=True)
            grad_q[:, :, rows] += grads[0]
            grad_k[:, :, :limit] += grads[1]
            grad_v[:, :, :limit] += grads[2]
            for total, part in zip(grad_params, grads[3:]):
                if part is not None:
                    total += part
        return None, None, grad_q, grad_k, grad_v, *grad_params


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
