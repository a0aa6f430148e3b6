"""Kernels ``two_position_tiled`` and ``two_position_explicit``: RoPE at two position sets chosen by distance,
merged exactly (Self-Extend and ReRoPE).

Both training-free extensions keep RoPE's exact relative distance ``i - j`` for keys near the query and
give far keys another, smaller distance (grouped for Self-Extend, https://arxiv.org/abs/2401.01325;
clamped or compressed for ReRoPE, https://kexue.fm/archives/9708). RoPE turns a distance into a pair of
rotations, one for the query and one for the key (``R(a)^T R(b) = R(b - a)``), so each regime is plain
RoPE attention with its own rotated copies of q and k::

    near:  q_i rotated at i,              k_j rotated at j              (distance i - j)
    far:   q_i rotated at far_q(i),       k_j rotated at far_k(j)       (distance far_q(i) - far_k(j))
    score_ij = near score if i - j < window else far score

Softmax over the union of two disjoint key sets is the log-sum-exp merge of the two attentions::

    lse = logaddexp(lse_near, lse_far)
    out = exp(lse_near - lse) * out_near + exp(lse_far - lse) * out_far

How :class:`_TwoPassAttention` runs it (any device; the fused CPU flash kernel where it applies):

* **Tiles of query rows.** For rows ``[r0, r1)`` the keys split into three pieces, each one attention
  call: far keys every row of the tile sees (no mask: the fast unmasked kernel), the far keys at the
  tile's edge (a small triangular mask) and the near band (``window + tile`` keys, masked). Rows stop at
  the diagonal, so no piece reads keys that no row may see: the work is about causal attention's plus the
  band.
* **Flash-style memory.** Forward keeps q/k in both rotations, v, the merged output and the merged row
  log-sum-exp (``[B, H, q]``); nothing of size ``[q, kv]`` outlives a piece. Backward recomputes each
  piece with the *merged* output and log-sum-exp, which gives that piece's exact share of the gradient
  (``P = exp(S - lse)`` are the merged probabilities, ``rowsum(dO * O)`` is the merged one), and sums them.
* A transformers padding mask (``allowed``) is intersected with each piece's own mask.

:func:`explicit_attention` is the same attention with explicit ``[q, kv]`` scores: the eager backend
(attention weights), logit soft-capping, attention dropout and ``torch.compile`` use it
(:func:`hf_posenc.kernels.select.select` chooses). The position module gives the rotated copies
(``posenc.near_and_far``, :class:`hf_posenc.encodings.windowed_rope_attention.TwoPositionRope`).

A decode step (one query row, no gradient) needs neither pass: :func:`decode_step` rotates the query once, at its
far position, and reads the far keys and the near band rotated relative to it (``posenc.decode_keys``) with one
SDPA call.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..positions import allowed_keys
from .call import Call
from .dense import expand_kv

#: Query rows per tile of :class:`_TwoPassAttention`. Larger tiles make larger unmasked far pieces;
#: smaller ones waste less of the masked band and the triangle at the diagonal.
TILE_ROWS = 256


# ---------------------------------------------------------------------------------------------------
# One piece: attention of some query rows over some keys, with its row log-sum-exp
# ---------------------------------------------------------------------------------------------------
def _fused(query: torch.Tensor) -> bool:
    """Whether the fused CPU flash kernel (forward and backward, with log-sum-exp) takes these tensors."""
    return (query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def _piece_forward(query, key, value, mask, scale):
    """``(out [B, H, qb, D], lse [B, H, qb] fp32)`` of one piece; ``mask`` additive float or None."""
    if _fused(query):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask, scale=scale)
    acc = torch.promote_types(query.dtype, torch.float32)  # fp64 stays fp64 (reference tests)
    scores = torch.matmul(query.to(acc), key.to(acc).transpose(-1, -2)) * scale  # [B, H, qb, kb]
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), value.to(acc))
    return out.to(query.dtype), lse.to(torch.promote_types(acc, torch.float32))


def _piece_backward(grad, query, key, value, out, lse, mask, scale):
    """``(dq, dk, dv)`` of one piece, given the *merged* output and log-sum-exp of its rows."""
    if _fused(query):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, key, value, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    acc = torch.promote_types(query.dtype, torch.float32)
    query, key, value, grad = query.to(acc), key.to(acc), value.to(acc), grad.to(acc)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    probs = torch.exp(scores - lse.to(acc)[..., None])  # merged probabilities of this piece's keys
    d_probs = torch.matmul(grad, value.transpose(-1, -2))
    row = (grad * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O) of the merged output
    d_scores = probs * (d_probs - row) * scale
    return (torch.matmul(d_scores, key), torch.matmul(d_scores.transpose(-1, -2), query),
            torch.matmul(probs.transpose(-1, -2), grad))


# ---------------------------------------------------------------------------------------------------
# The tiling
# ---------------------------------------------------------------------------------------------------
def _pieces(rows: slice, kv_len: int, diagonal: int, window: int):
    """``(which, keys, kind)`` per piece of a tile: ``which`` is ``"near"`` or ``"far"``; ``kind`` says
    which structural mask the piece needs (``"none"``, ``"far_edge"``, ``"near"``).

    Row ``r`` sees key ``c`` iff ``c <= r + diagonal``; its distance is ``r + diagonal - c``.
    """
    clamp = lambda x: max(0, min(kv_len, x))  # noqa: E731
    limit = clamp(rows.stop + diagonal)  # keys after this are future for every row
    far_all = clamp(rows.start + diagonal - window + 1)  # far for every row of the tile
    far_end = clamp(rows.stop + diagonal - window)  # far for the tile's last row
    out = []
    if far_all > 0:
        out.append(("far", slice(0, far_all), "none"))
    if far_end > far_all:
        out.append(("far", slice(far_all, far_end), "far_edge"))
    if limit > far_all:
        # One row (a decode step) sees every key of its band, all near: no structural mask to build or apply.
        out.append(("near", slice(far_all, limit), "near" if rows.stop - rows.start > 1 else "none"))
    return out


def _piece_mask(kind, rows: slice, keys: slice, diagonal: int, window: int, allowed, dtype, device):
    """Additive mask ``[B|1, 1, qb, kb]`` of one piece in ``dtype`` (None: every key visible)."""
    keep = None
    if kind != "none":
        distance = (torch.arange(rows.start, rows.stop, device=device)[:, None] + diagonal
                    - torch.arange(keys.start, keys.stop, device=device)[None, :])  # [qb, kb]
        keep = distance >= window if kind == "far_edge" else (distance >= 0) & (distance < window)
        keep = keep[None, None]
    if allowed is not None:
        block = allowed[:, :, rows, keys]
        keep = block if keep is None else keep & block
    if keep is None:
        return None
    # A finite fill, not -inf: a row with no key in this piece then has a finite, very negative lse whose
    # merge weight is 0 (the fused kernel reports lse = 0 for a row masked with -inf, which would merge).
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)


def _tiles(q_len: int):
    for start in range(0, q_len, TILE_ROWS):
        yield slice(start, min(start + TILE_ROWS, q_len))


class _TwoPassAttention(torch.autograd.Function):
    """Exact two-position attention, tiled, with flash-style memory (see the module docstring).

    Args (``apply``, positional):
        q_near, q_far: ``[B, H, q, D]``; k_near, k_far, value: ``[B, H, kv, D]`` (heads expanded), one dtype.
        allowed: Bool ``[B|1, 1, q, kv]`` or None (plain causality from ``diagonal``).
        diagonal: Row ``r`` may see key ``c`` iff ``c <= r + diagonal``; ``r + diagonal - c`` is the distance.
        window: Keys at distance ``< window`` use the near rotations.
        scale: Logit scale.

    Returns:
        ``[B, H, q, D]``.
    """

    @staticmethod
    def forward(ctx, q_near, k_near, q_far, k_far, value, allowed, diagonal, window, scale):
        q_len, kv_len = q_near.shape[2], k_near.shape[2]
        queries, keys = {"near": q_near, "far": q_far}, {"near": k_near, "far": k_far}
        output = torch.empty_like(q_near)
        lse_dtype = torch.float64 if q_near.dtype == torch.float64 else torch.float32
        lse = q_near.new_empty(q_near.shape[:3], dtype=lse_dtype)
        for rows in _tiles(q_len):
            outs, lses = [], []
            pieces = _pieces(rows, kv_len, diagonal, window)
            if not pieces:  # no visible key at all (not reachable from a causal layer): zeros, like SDPA
                output[:, :, rows], lse[:, :, rows] = 0, torch.finfo(lse.dtype).min
                continue
            for which, cols, kind in pieces:
                mask = _piece_mask(kind, rows, cols, diagonal, window, allowed, q_near.dtype, q_near.device)
                out, piece_lse = _piece_forward(queries[which][:, :, rows], keys[which][:, :, cols],
                                                value[:, :, cols], mask, scale)
                outs.append(out)
                lses.append(piece_lse.to(lse.dtype))
            total = torch.logsumexp(torch.stack(lses), dim=0)  # [B, H, qb]
            merged = sum(torch.exp(piece_lse - total)[..., None] * out.to(lse.dtype)
                         for out, piece_lse in zip(outs, lses))
            output[:, :, rows] = merged
            lse[:, :, rows] = total
        ctx.save_for_backward(q_near, k_near, q_far, k_far, value, output, lse, allowed)
        ctx.diagonal, ctx.window, ctx.scale = diagonal, window, scale
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q_near, k_near, q_far, k_far, value, output, lse, allowed = ctx.saved_tensors
        diagonal, window, scale = ctx.diagonal, ctx.window, ctx.scale
        q_len, kv_len = q_near.shape[2], k_near.shape[2]
        queries, keys = {"near": q_near, "far": q_far}, {"near": k_near, "far": k_far}
        d_q = {"near": torch.zeros_like(q_near), "far": torch.zeros_like(q_far)}
        d_k = {"near": torch.zeros_like(k_near), "far": torch.zeros_like(k_far)}
        d_v = torch.zeros_like(value)
        grad = grad.contiguous()
        for rows in _tiles(q_len):
            for which, cols, kind in _pieces(rows, kv_len, diagonal, window):
                mask = _piece_mask(kind, rows, cols, diagonal, window, allowed, q_near.dtype, q_near.device)
                dq, dk, dv = _piece_backward(grad[:, :, rows], queries[which][:, :, rows], keys[which][:, :, cols],
                                             value[:, :, cols], output[:, :, rows], lse[:, :, rows], mask, scale)
                d_q[which][:, :, rows] += dq
                d_k[which][:, :, cols] += dk
                d_v[:, :, cols] += dv
        return d_q["near"], d_k["near"], d_q["far"], d_k["far"], d_v, None, None, None, None


def two_pass_attention(q_near, k_near, q_far, k_far, value, allowed, diagonal: int, window: int, scale: float):
    """Exact, memory-bounded two-position attention; arguments as :class:`_TwoPassAttention`, except that k/v may
    keep fewer (grouped, GQA) heads ``[B, Hkv, kv, D]``: the tiles expand them."""
    heads = q_near.shape[1]
    k_near, k_far, value = expand_kv(k_near, heads), expand_kv(k_far, heads), expand_kv(value, heads)
    return _TwoPassAttention.apply(q_near, k_near, q_far, k_far, value, allowed, diagonal, window, scale)


def is_decode_step(call: Call) -> bool:
    """Whether :func:`decode_step` takes the call: one query row, no gradient, outside ``torch.compile``."""
    return call.queries == 1 and not call.grad and not call.compiling


def decode_step(call: Call) -> torch.Tensor:
    """One query row without gradient (a decode step) as one attention call: the query rotated at its far
    position over the far keys and the near band rotated relative to it
    (:meth:`~hf_posenc.encodings.windowed_rope_attention.TwoPositionRope.decode_keys`), so that every visible
    key is read once, by one fused SDPA call, as stock attention reads its cache. Grouped key/value heads (GQA)
    are read in place: the query heads of a group become that group's rows. Returns ``[B, H, 1, D]``.
    """
    query, key, dtype = call.query, call.key, call.dtype
    batch, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    diagonal = call.diagonal
    limit = max(0, min(kv_len, diagonal + 1))  # keys after this are in the future
    split = max(0, min(limit, diagonal - call.posenc.window + 1))  # keys before this are far
    if limit == 0:  # no visible key (not reachable from a causal layer): zeros, like the tiled path
        return torch.zeros(query.shape, dtype=dtype, device=query.device)
    q_far, keys = call.posenc.decode_keys(query, key, call.q_pos, call.k_pos, split, limit,
                                          position_ids=call.position_ids, store=call.key_store)
    allowed = _allowed(call)
    # [B, Hkv, H / Hkv, D]: the query heads of a group are adjacent (transformers' repeat_kv)
    rows = q_far.to(dtype).reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        rows, keys.to(dtype), call.value[:, :, :limit].to(dtype),
        attn_mask=None if allowed is None else allowed[..., :limit], scale=call.scaling)
    return out.reshape(batch, heads, 1, dim)


def explicit_attention(q_near, k_near, q_far, k_far, value, near, allowed, scale, softcap=None, dropout=0.0,
                       training=False):
    """Two-position attention with explicit scores and probabilities (eager weights, soft-capping, dropout).

    Args:
        q_near, q_far: ``[B, H, q, D]``; k_near, k_far, value: ``[B, H, kv, D]``.
        near: Bool ``[q, kv]``: which pairs use the near rotations.
        allowed: Bool ``[B|1, 1, q, kv]`` (True = attend).
        scale: Logit scale.
        softcap: Gemma 2's logit soft-capping (``tanh(s / c) * c``), applied to the merged logits.

    Returns:
        ``(output [B, H, q, D], probabilities [B, H, q, kv])``.
    """
    scores = torch.where(near, torch.matmul(q_near, k_near.transpose(-1, -2)),
                         torch.matmul(q_far, k_far.transpose(-1, -2))) * scale  # [B, H, q, kv]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q_near.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value), probs


def rotated_copies(call: Call, expand: bool = True):
    """``(q_near, k_near, q_far, k_far, value)`` of a call: rotated by the position module before the cast,
    as stock RoPE does, then cast to the compute dtype, GQA heads expanded (``[B, H, n, D]`` each) unless
    ``expand`` is False (k/v then keep ``[B, Hkv, n, D]``)."""
    posenc, dtype = call.posenc, call.dtype
    heads = call.query.shape[1] if expand else call.key.shape[1]
    # Frequencies for the live length (dynamic / longrope), as the plug-in RoPE does; compiled: the maximum.
    q_near, k_near, q_far, k_far = posenc.near_and_far(call.query, call.key, call.q_pos, call.k_pos,
                                                       live=not call.compiling, position_ids=call.position_ids,
                                                       store=call.key_store)
    return (q_near.to(dtype), expand_kv(k_near.to(dtype), heads), q_far.to(dtype), expand_kv(k_far.to(dtype), heads),
            expand_kv(call.value.to(dtype), heads))


def _allowed(call: Call) -> torch.Tensor | None:
    """Bool ``[B|1, 1, q, kv]`` from the call's mask, or None for plain causality."""
    if call.attention_mask is None:
        return None
    return allowed_keys(call.attention_mask, call.q_pos, call.k_pos, call.causal)


def two_position_tiled(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``two_position_tiled`` (:func:`two_pass_attention`; a decode step: :func:`decode_step`). Returns
    ``(output [B, H, q, D], None)``."""
    if is_decode_step(call):
        return decode_step(call), None
    q_near, k_near, q_far, k_far, value = rotated_copies(call, expand=False)  # expanded by the tiles only
    return two_pass_attention(q_near, k_near, q_far, k_far, value, _allowed(call), call.diagonal, call.posenc.window,
                              call.scaling), None


def two_position_explicit(call: Call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel ``two_position_explicit`` (:func:`explicit_attention`).

    Returns:
        ``(output [B, H, q, D], probabilities [B, H, q, kv] or None)``: weights for the eager backend only.
    """
    q_near, k_near, q_far, k_far, value = rotated_copies(call)
    q_pos, k_pos = call.q_pos, call.k_pos
    near = (q_pos[:, None] - k_pos[None, :]) < call.posenc.window  # [q, kv]
    allowed = _allowed(call)
    if allowed is None:
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    output, weights = explicit_attention(q_near, k_near, q_far, k_far, value, near, allowed, call.scaling,
                                         call.logit_cap, call.dropout, call.training)
    return output, (weights if call.backend == "eager" else None)
