"""SDPA's fused CPU flash-attention kernel, called directly where ``F.scaled_dot_product_attention`` falls short.

The bias encodings need more from the kernel than the public function gives on CPU (which kernel a call
takes is decided in :mod:`hf_posenc.kernels`):

* **T5's learned table needs the gradient of its bias.** SDPA runs a float mask that requires grad on its
  unfused math path (``[B, H, q, kv]`` scores and probabilities kept for backward). Here the mask is passed
  detached, so q/k/v get the fused forward and backward, and the bias gets its gradient from a separate,
  cheap computation on the band of diagonals where a T5 bias varies at all (:class:`TiledBiasAttention`).
  That computation needs the kernel's log-sum-exp, which only the ATen op returns.
* **ALiBi's far keys underflow into denormals.** Their logits sit ~90-100 below the row maximum, where
  ``exp`` returns denormal floats that x86 multiplies ~100x more slowly; the fused backward suffers most.
  ALiBi's kernels run forward and backward with denormals flushed to zero (the dropped values are below
  1.2e-38 against a softmax sum of at least 1, so no fp32 result changes), and the caller's setting comes
  back afterwards.
* **ALiBi's fp32 fold needs a per-tile key term** to stay exact at every length: its bias rides in an extra
  head dimension measured from each tile's last key (:class:`TiledFoldAttention`), tiles merged with the
  kernel's log-sum-exp.

All call ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), the op
``F.scaled_dot_product_attention`` itself dispatches to on CPU; :func:`has_fused_kernel` says whether this torch
build has it. Tensor layout throughout: ``[B, H, n, D]``, equal query and key/value head counts.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager, nullcontext

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import tiling
from .tiling import toeplitz


def has_fused_kernel() -> bool:
    """Whether this torch build has the fused CPU kernel's ATen op (which calls take it:
    :func:`hf_posenc.kernels.select`)."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _flush_enabled() -> bool:
    # torch has no getter for the flag: with flush-to-zero on, a product in the denormal range becomes 0.
    return bool(torch.tensor(1e-30) * torch.tensor(1e-10) == 0)


@contextmanager
def denormals_flushed():
    """Flush denormal floats to zero on this thread inside the block; the previous setting comes back after."""
    if _flush_enabled() or not torch.set_flush_denormal(True):  # already on, or a CPU without the flag
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def autocast_off(device_type: str = "cpu"):
    """Autocast disabled inside the block: the kernels here take q/k/v in one dtype and keep masks,
    log-sum-exps and bias gradients in fp32 on purpose (``out=`` buffers included), which autocast would
    recast; a backward called inside the caller's autocast block would hit it too."""
    return torch.autocast(device_type, enabled=False)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool masks become additive ones, as ``F.scaled_dot_product_attention`` converts them."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def flash_attention_lse(query, key, value, mask, causal: bool, scale: float):
    """The fused kernel with its row log-sum-exp; differentiable in q/k/v (not in ``mask``, nor the lse).

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]``.
        mask: Additive float ``[B|1, H|1, q, kv]`` or bool (True = attend) or None.
        causal: Top-left aligned causality (only meaningful for ``q == kv``).
        scale: Logit scale.

    Returns:
        ``(output [B, H, q, D], logsumexp [B, H, q] fp32)``.
    """
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, causal, attn_mask=_float_mask(mask, query.dtype), scale=scale)


class _FlushedFlashAttention(torch.autograd.Function):
    """The fused kernel, forward and backward, with denormals flushed (see the module docstring)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, causal, scale):
        with denormals_flushed(), autocast_off():
            output, lse = flash_attention_lse(query, key, value, mask, causal, scale)
        ctx.save_for_backward(query, key, value, output, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, key, value, output, lse, mask = ctx.saved_tensors
        with denormals_flushed(), autocast_off():
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad, query, key, value, output, lse, 0.0, ctx.causal, attn_mask=mask, scale=ctx.scale)
        return *grads, None, None, None


def flash_attention(query, key, value, mask, causal: bool, scale: float, flush_denormals: bool = False):
    """Fused CPU attention, optionally with denormals flushed to zero in forward and backward.

    Arguments as :func:`flash_attention_lse`; ``mask`` must not require grad. Returns ``[B, H, q, D]``.
    """
    if not flush_denormals:
        return flash_attention_lse(query, key, value, mask, causal, scale)[0]
    return _FlushedFlashAttention.apply(query, key, value, _float_mask(mask, query.dtype), causal, scale)


#: Query rows per tile of :class:`TiledFoldAttention`. The folded key term of a tile is measured from its
#: last visible key, so a row's logits carry an offset of at most this many slopes (see the class docstring).
FOLD_TILE_ROWS = 128


def _folded(x: torch.Tensor, fill: float) -> torch.Tensor:
    """``x`` ``[B, H, n, D]`` with one more head dimension holding ``fill``: ``[B, H, n, D + 1]``."""
    return torch.cat((x, x.new_full((*x.shape[:-1], 1), fill)), dim=-1)


def _write_key_term(key_folded: torch.Tensor, slopes: torch.Tensor | None, terms: torch.Tensor | None, limit: int,
                    scale: float) -> None:
    """Set the extra dimension of the first ``limit`` keys (in place) to ``m_h (j - (limit - 1)) / scale`` (ALiBi's
    ``slopes``) or to ``(t_j - t_{limit - 1}) / scale`` (a general per-key ``terms`` tensor): either way measured
    from the tile's last visible key."""
    if terms is None:
        distance = torch.arange(-(limit - 1), 1, device=key_folded.device, dtype=torch.float32)  # j - (limit - 1)
        term = slopes[:, None] * (distance / scale)  # [H, limit] fp32
    else:
        term = (terms[..., :limit] - terms[..., limit - 1:limit]) / scale  # [B|1, H, limit] fp32
    key_folded[:, :, :limit, -1] = term.to(key_folded.dtype)


class TiledFoldAttention(torch.autograd.Function):
    """Causal ALiBi, or any causal bias of the form ``t_j - t_i`` per key, on the fused CPU kernel, its bias folded
    into one extra head dimension, tile by tile.

    ``-m_h (i - j) = m_h (j - c) - m_h (i - c)`` for any constant ``c``: the second term is constant along a
    query row and cancels in the softmax, the first is a per-key term that rides in an extra head dimension
    (the query holds 1 there, the key ``m_h (j - c) / scale``), so no ``[B, H, q, kv]`` bias exists. Its
    magnitude is what costs precision: fp32 rounds a logit to ``eps * |logit|``, and a row's logits carry
    the offset ``m_h (i - c)`` on top of eager's ``-m_h (i - j)``. One ``c`` for the whole call (the last
    key) puts ``m_h (T - i)`` on the early rows, a relative error that grows with ``T`` (1.3e-5 at 2k,
    5.4e-5 at 8k, 3.1e-4 at 32k against fp64). Here each tile of :data:`FOLD_TILE_ROWS` query rows measures
    its keys from its own last visible key, so the offset of any row stays below ``FOLD_TILE_ROWS * m_h`` at
    every length and the error stays at eager's level (~1e-6; ``benchmarks/attention.py --fold-error``).

    A general per-key term ``terms`` (FoX: ``t_j = -F_j``, the cumulative log forget gates, so that the logit
    gains ``F_i - F_j`` up to the row constant) takes the slopes' place: the tile's keys hold
    ``(t_j - t_ref) / scale`` with ``t_ref`` the term of its last visible key (again the row constant the
    softmax ignores, and what keeps the offset of a row to the gates of at most one tile). Its gradient is the
    extra dimension's key gradient over ``scale``, summed over tiles; ``t_ref``'s share is dropped, as the
    output does not depend on it (each row's ``dS`` sums to 0).

    Without a mask a tile is two fused-kernel calls merged through their log-sum-exps: the keys before
    the tile's diagonal block (all visible, no mask) and the square diagonal block on the kernel's causal
    path; with the caller's mask it is one masked call over the keys the tile can see. The keys' extra
    dimension is rewritten in place before each tile. Forward and backward run with denormals flushed (the
    far keys' weights are denormals). Backward recomputes the folded tensors and takes each part's
    gradients from the kernel's backward with the merged output and log-sum-exp.

    Args (``apply``, positional):
        query: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]`` (heads expanded), fp32.
        slopes: ``[H]`` fp32 ALiBi slopes, or None when ``terms`` is given.
        allowed: Bool ``[B|1, 1, q, kv]`` or None (plain causality from ``diagonal``).
        diagonal: Row ``r`` may see key ``j`` iff ``j <= r + diagonal``.
        scale: Logit scale.
        terms: ``[B|1, H, kv]`` fp32 per-key terms ``t_j`` (the logit of key ``j`` gains ``t_j`` up to a row
            constant), differentiable; None with ``slopes``.

    Returns:
        ``[B, H, q, D]``.
    """

    @staticmethod
    def forward(ctx, query, key, value, slopes, allowed, diagonal, scale, terms=None):
        q_len, kv_len, dim = query.shape[2], key.shape[2], query.shape[3]
        # Equal q/k/v head dims (D + 1 each): the fused kernel needs them; the value's extra dimension is 0.
        query_f, key_f, value_f = _folded(query, 1.0), _folded(key, 0.0), _folded(value, 0.0)
        output = query.new_empty(*query.shape[:3], dim + 1)
        lse = query.new_empty(query.shape[:3], dtype=torch.float32)
        with denormals_flushed(), autocast_off():
            for rows, limit in tiling.tiles(q_len, kv_len, diagonal, FOLD_TILE_ROWS):
                _write_key_term(key_f, slopes, terms, limit, scale)
                parts = [flash_attention_lse(query_f[:, :, rows], key_f[:, :, keys], value_f[:, :, keys], mask,
                                             causal, scale)
                         for keys, mask, causal in _fold_tile_parts(allowed, rows, limit, diagonal)]
                output[:, :, rows], lse[:, :, rows] = _merged(parts)
        ctx.save_for_backward(query, key, value, output, lse, slopes, allowed, terms)
        ctx.diagonal, ctx.scale = diagonal, scale
        return output[..., :dim]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, key, value, output, lse, slopes, allowed, terms = ctx.saved_tensors
        q_len, kv_len, dim = query.shape[2], key.shape[2], query.shape[3]
        query_f, key_f, value_f = _folded(query, 1.0), _folded(key, 0.0), _folded(value, 0.0)
        grad_f = F.pad(grad, (0, 1))  # [B, H, q, D + 1]: the extra output dimension is 0 and gets no gradient
        # Accumulated with the extra dimension (contiguous adds), which is dropped at the end.
        grad_q, grad_k, grad_v = torch.zeros_like(query_f), torch.zeros_like(key_f), torch.zeros_like(value_f)
        with denormals_flushed(), autocast_off():
            for rows, limit in tiling.tiles(q_len, kv_len, ctx.diagonal, FOLD_TILE_ROWS):
                _write_key_term(key_f, slopes, terms, limit, ctx.scale)
                for keys, mask, causal in _fold_tile_parts(allowed, rows, limit, ctx.diagonal):
                    # The merged output and lse: each part's P = exp(S - lse) and rowsum(dO * O) are the
                    # whole row's, so the parts' gradients add up to the gradient of the whole tile.
                    d_q, d_k, d_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        grad_f[:, :, rows], query_f[:, :, rows], key_f[:, :, keys], value_f[:, :, keys],
                        output[:, :, rows], lse[:, :, rows], 0.0, causal, attn_mask=_float_mask(mask, query.dtype),
                        scale=ctx.scale)
                    grad_q[:, :, rows] += d_q
                    grad_k[:, :, keys] += d_k
                    grad_v[:, :, keys] += d_v
        # d logit / d t_j = 1 on every tile that holds key j: the extra dimension's gradient over the scale.
        grad_terms = None
        if terms is not None and ctx.needs_input_grad[7]:
            grad_terms = (grad_k[..., -1] / ctx.scale).sum(0, keepdim=True) if terms.shape[0] == 1 \
                else grad_k[..., -1] / ctx.scale  # [B|1, H, kv]
        return grad_q[..., :dim], grad_k[..., :dim], grad_v[..., :dim], None, None, None, None, grad_terms


def _fold_tile_parts(allowed, rows: slice, limit: int, diagonal: int):
    """The kernel calls of one tile: ``(keys, mask, causal)`` each.

    With the caller's mask: one call over the first ``limit`` keys. Without: the keys before the tile's
    diagonal block (every row sees them) and the square diagonal block, whose top-left causality is exact.
    """
    if allowed is not None:
        return [(slice(0, limit), allowed[:, :, rows, :limit], False)]
    first = rows.start + diagonal  # first key of the diagonal block
    if first < 0 or limit - first != rows.stop - rows.start:  # not square: a causal mask instead
        return [(slice(0, limit), tiling.causal_tile_mask(rows, limit, diagonal, "cpu"), False)]
    parts = [(slice(first, limit), None, True)]
    if first > 0:
        parts.append((slice(0, first), None, False))
    return parts


def _merged(parts):
    """One softmax over the union of the parts' keys from each part's ``(output, lse)``."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # [B, H, qb]
    output = sum(o * (part_lse - lse).exp()[..., None] for o, part_lse in parts)
    return output, lse


class TiledBiasAttention(torch.autograd.Function):
    """Causal attention with a relative bias, on the fused CPU kernel, one call per tile of query rows.

    Each tile of rows stops at its last visible key, and its bias is a strided view of the per-diagonal
    values: keys are handed to the kernel in reverse order (attention does not depend on key order), which
    turns the Toeplitz block ``M[i, j] = d[i - j + kv - 1]`` into ``d[i + j' + kv - limit]``, a view with
    unit strides that the kernel reads in place. No ``[B, H, q, kv]`` bias exists, nor a copy per tile.

    The bias reaches the kernel as a detached mask, which keeps the fused backward for q/k/v. Its own
    gradient ``dS = P * (dO v^T - rowsum(dO * O))``, ``P = exp(S - lse)``, comes from the keys of the band
    only (:func:`band_bias_gradient`). The caller guarantees that whatever gradient reaches the bias at
    distances ``>= band`` cancels (the T5 bias relative to its far bucket is ``b_last - b_last`` there).
    A band of half the keys or more (KERPLE's is every key) takes the tiles' own backward instead
    (:func:`tiles_backward`, chosen by :func:`backward_on_tiles`), which gives q/k/v and the bias their
    gradients from one tile's products at a time.

    Args (``apply``, positional):
        query: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]`` (heads already expanded).
        diagonals: ``[H, q + kv - 1]``, entry ``t`` the bias of ``i - j = t - (kv - 1)`` (local indices);
            fp32 even for bf16/fp16 q/k/v (the kernel adds an fp32 mask to fp32 logits).
        allowed: Bool ``[B|1, 1, q, kv]`` or None (plain causality from ``diagonal``).
        diagonal: Row ``r`` may see key ``j`` iff ``j <= r + diagonal``.
        band: Distances with a bias gradient (ignored when ``diagonals`` needs none).
        scale: Logit scale.
        flush: Run the kernels with denormals flushed (ALiBi).

    Returns:
        ``[B, H, q, D]``.
    """

    @staticmethod
    def forward(ctx, query, key, value, diagonals, allowed, diagonal, band, scale, flush):
        fill = torch.finfo(diagonals.dtype).min  # the mask's own dtype: fp32 whatever q/k/v are
        q_len, kv_len = query.shape[2], key.shape[2]
        # Row-major (a T5 table gather comes transposed): the tile views need unit strides along the keys.
        masked = diagonals.detach().contiguous()
        if allowed is None:  # keys after the query: entries with i - j + diagonal < 0
            masked = masked.clone() if masked.data_ptr() == diagonals.data_ptr() else masked
            masked[:, : max(0, kv_len - 1 - diagonal)] = fill
        key, value = key.flip(2), value.flip(2)  # [B, H, kv, D], newest key first
        allowed = None if allowed is None else allowed.flip(-1)
        output = query.new_empty(query.shape)
        lse = query.new_empty(query.shape[:3], dtype=torch.float32)
        with denormals_flushed() if flush else nullcontext(), autocast_off():
            for rows, limit in tiling.tiles(q_len, kv_len, diagonal):
                keys = slice(kv_len - limit, kv_len)  # the first `limit` keys, reversed
                output[:, :, rows], lse[:, :, rows] = flash_attention_lse(
                    query[:, :, rows], key[:, :, keys], value[:, :, keys],
                    _tile_mask(masked, allowed, rows, limit, kv_len, fill), False, scale)
        ctx.save_for_backward(query, key, value, output, lse, masked, allowed)
        ctx.diagonal, ctx.band, ctx.scale, ctx.flush, ctx.fill = diagonal, band, scale, flush, fill
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, key, value, output, lse, masked, allowed = ctx.saved_tensors  # key, value, allowed reversed
        q_len, kv_len = query.shape[2], key.shape[2]
        if ctx.needs_input_grad[3] and backward_on_tiles(ctx.band, kv_len):
            with denormals_flushed() if ctx.flush else nullcontext(), autocast_off():
                grad_q, grad_k, grad_v, grad_diagonals = tiles_backward(
                    grad, query, key, value, output, lse, masked, allowed, ctx.diagonal, ctx.scale, ctx.fill)
            return grad_q, grad_k.flip(2), grad_v.flip(2), grad_diagonals, None, None, None, None, None
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
        with denormals_flushed() if ctx.flush else nullcontext(), autocast_off():
            for rows, limit in tiling.tiles(q_len, kv_len, ctx.diagonal):
                keys = slice(kv_len - limit, kv_len)
                d_q, d_k, d_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad[:, :, rows], query[:, :, rows], key[:, :, keys], value[:, :, keys], output[:, :, rows],
                    lse[:, :, rows], 0.0, False, attn_mask=_tile_mask(masked, allowed, rows, limit, kv_len, ctx.fill),
                    scale=ctx.scale)
                grad_q[:, :, rows] = d_q
                grad_k[:, :, keys] += d_k
                grad_v[:, :, keys] += d_v
        key, value, grad_k, grad_v = key.flip(2), value.flip(2), grad_k.flip(2), grad_v.flip(2)
        grad_diagonals = None
        if ctx.needs_input_grad[3]:
            allowed = None if allowed is None else allowed.flip(-1)
            with autocast_off():  # fp32 products with out= buffers
                grad_diagonals = band_bias_gradient(grad, query, key, value, output, lse, masked, allowed,
                                                    ctx.diagonal, ctx.band, ctx.scale, ctx.fill).to(masked.dtype)
        return grad_q, grad_k, grad_v, grad_diagonals, None, None, None, None, None


def _tile_mask(masked, allowed_reversed, rows: slice, limit: int, kv_len: int, fill: float) -> torch.Tensor:
    """Additive mask of one tile against the reversed keys, ``[B|1, H, qb, limit]`` (a view when no
    ``allowed``): bias on visible keys, ``fill`` elsewhere."""
    # Reversed key j' is key j = limit - 1 - j' of the tile: M[r, j] = d[r - j + kv - 1] = d[r + j' + kv - limit].
    first = rows.start + kv_len - limit
    mask = masked[:, first:first + (rows.stop - rows.start) + limit - 1].unfold(-1, limit, 1)[None]
    if allowed_reversed is not None:
        mask = torch.where(allowed_reversed[:, :, rows, kv_len - limit:], mask, fill)
    return mask


#: Query rows per block of :func:`band_bias_gradient`: a block covers ``BAND_ROWS + band - 1`` keys, of
#: which each row needs ``band``; smaller blocks waste less but make smaller matrix products.
BAND_ROWS = 32


@torch.no_grad()
def band_bias_gradient(grad, query, key, value, output, lse, diagonals, allowed, diagonal: int, band: int,
                       scale: float, fill: float) -> torch.Tensor:
    """Gradient of the per-diagonal bias values from the keys within ``band`` of each query.

    ``dS = P * (dO v^T - rowsum(dO * O))`` with ``P = exp(S - lse)``, for blocks of :data:`BAND_ROWS` rows
    and the ``BAND_ROWS + band - 1`` keys that reach into their band, all blocks in one batched product:
    block ``m`` is rows ``mc .. mc + c - 1`` and keys from ``mc + diagonal - band + 1``, so its bias is the
    same Toeplitz block for every ``m`` (relative positions repeat) and its diagonal sums land at the same
    offset. Keys outside the cache are padding and masked.

    Args:
        grad, query, output: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]``; lse: ``[B, H, q]`` fp32.
        diagonals: The mask's per-diagonal values ``[H, q + kv - 1]`` (``fill`` on future keys when
            ``allowed`` is None).
        allowed: Bool ``[B|1, 1, q, kv]`` or None.
        diagonal, band, scale, fill: As in :class:`TiledBiasAttention`.

    Returns:
        ``[H, q + kv - 1]`` fp32.
    """
    f32 = torch.float32
    q_len, kv_len = query.shape[2], key.shape[2]
    c = min(BAND_ROWS, q_len)
    width = c + band - 1  # keys per block
    blocks = -(-q_len // c)
    rows_pad = blocks * c - q_len
    lead = band - 1 - diagonal  # keys to add before key 0 so that block m starts at padded key m * c
    # Padded keys: `lead` before the cache (negative when the band starts inside it), enough after.
    trail = max(0, (blocks - 1) * c + width - lead - kv_len)

    def pad_keys(x):  # [B, H, kv, D] -> [B, H, n, D] with key j at padded index j + lead
        x = F.pad(x, (0, 0, max(0, lead), trail))
        return x[:, :, -lead:] if lead < 0 else x

    def blocks_of_rows(x, value=0.0):  # [B, H, q, ...] -> [B, H, blocks, c, ...]
        if rows_pad:
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, rows_pad), value=value)
        return x.unflatten(2, (blocks, c))

    q_blocks = blocks_of_rows(query.to(f32))  # [B, H, m, c, D]
    g_blocks = blocks_of_rows(grad.to(f32))
    keys, values = pad_keys(key.to(f32)).contiguous(), pad_keys(value.to(f32)).contiguous()

    def band_products(rows, keys, add, alpha=1.0):
        """``add + alpha * rows @ windows^T``: ``[B, H, m, c, D]`` rows, ``add`` broadcastable to one
        head's ``[m, c, width]``: ``[H, c, width]`` (per head) or ``[B, H, ...]``."""
        # Block m's keys are a strided window [m * c, m * c + width) of the padded keys; bmm reads the
        # overlapping windows in place (a copy of them costs more than the product). baddbmm fuses the
        # scale and the addition into the product.
        out = rows.new_empty(*rows.shape[:-1], width)
        for b, h in itertools.product(range(rows.shape[0]), range(rows.shape[1])):
            windows = keys[b, h].as_strided((blocks, width, keys.shape[-1]), (c * keys.shape[-1], keys.shape[-1], 1))
            term = add[h] if add.dim() == 3 else add[b, h]
            torch.baddbmm(term, rows[b, h], windows.transpose(1, 2), alpha=alpha, out=out[b, h])
        return out

    # The bias block: M[r, u] = diagonals[r - u + kv - diagonal - c + width - 1], same for every block.
    first = kv_len - diagonal - c
    padded = F.pad(diagonals.to(f32), (c + width, c + width), value=fill)
    bias = toeplitz(padded[:, first + c + width:first + 2 * (c + width) - 1], c, width)  # [H, c, width]
    key_index = (torch.arange(blocks, device=query.device)[:, None] * c
                 + torch.arange(width, device=query.device) - lead)  # [m, width]
    keep = ((key_index >= 0) & (key_index < kv_len)).to(f32)[:, None]  # [m, 1, width]: keys in the cache
    if allowed is not None:
        allowed = pad_keys(allowed.transpose(-1, -2)).transpose(-1, -2)  # key j at padded index j + lead
        windows = allowed.unfold(3, width, 1)  # [B|1, 1, q, keys, width]: one window per start key
        index = torch.arange(q_len, device=query.device)
        windows = windows[:, :, index, (index // c) * c]  # [B|1, 1, q, width]: each row's block
        keep = blocks_of_rows(windows, value=False).to(f32) * keep  # [B|1, 1, m, c, width]
    lse_blocks = blocks_of_rows(lse[..., None])  # [B, H, m, c, 1] (padded rows have dO = 0)
    # P = exp(q k^T * scale + bias - lse), [B, H, m, c, width], in place to spare temporaries. Clamping at
    # -87 keeps exp off its slow paths (huge negative inputs such as future keys, 10x; denormal outputs,
    # 50x): weights below 1.7e-38 read as 1.7e-38, which no fp32 sum they enter (a row sums to 1) can
    # resolve; future keys' ones are dropped below. The upper clamp keeps the masked keys of fully masked
    # rows (lse = fill) finite until `keep` zeroes them.
    logits = band_products(q_blocks, keys, bias, scale).sub_(lse_blocks)
    probs = logits.clamp_(min=-87.0, max=80.0).exp_().mul_(keep)
    row = (g_blocks * blocks_of_rows(output.to(f32))).sum(-1, keepdim=True)  # rowsum(dO * O), [B, H, m, c, 1]
    d_logits = band_products(g_blocks, values, -row).mul_(probs)
    sums = tiling.diagonal_sums(d_logits.sum((0, 2)))  # [H, c + width - 1], entry t_local = r - u + width - 1
    # Global diagonal of entry (r, u): t = t_local + kv - diagonal - c; keep what falls inside.
    out = torch.zeros(diagonals.shape, dtype=f32, device=diagonals.device)
    lo, hi = max(0, first), min(out.shape[-1], first + sums.shape[-1])
    if hi > lo:
        out[:, lo:hi] = sums[:, lo - first:hi - first]
    if allowed is None:  # future keys (i - j + diagonal < 0) have no gradient
        out[:, : max(0, kv_len - 1 - diagonal)] = 0
    return out


def backward_on_tiles(band: int, kv_len: int) -> bool:
    """Whether :class:`TiledBiasAttention`'s backward runs on its tiles (:func:`tiles_backward`) rather than on
    the fused backward plus the band (:func:`band_bias_gradient`). From a band of half the keys on, the
    band's blocks cover more than the causal triangle and hold ``[B, H, q, band]`` at once (a ``diagonal``
    bias: ``band = kv``, the whole square), while the tiles' own backward needs one tile's memory and
    gives the bias gradient from products it computes anyway."""
    return 2 * band >= kv_len


@torch.no_grad()
def tiles_backward(grad, query, key, value, output, lse, masked, allowed, diagonal: int, scale: float,
                   fill: float):
    """The backward of :class:`TiledBiasAttention`, bias gradient included, tile by tile of query rows.

    Per tile, over the keys it sees: ``P = exp(S - lse)`` with the forward's ``lse``, ``dP = dO v^T``,
    ``dS = P * (dP - rowsum(dO * O))``, then ``dq = scale dS k``, ``dk = scale dS^T q``, ``dv = P^T dO``: the
    fused backward's products, from which the bias gradient is the sum of ``dS`` along each diagonal. Memory
    is one tile's ``[B, H, rows, keys]`` at any length, work the causal triangle's. Keys come reversed, as the
    forward keeps them, so a tile's bias is the Hankel block ``d[first + r + j']`` and its gradient the block's
    anti-diagonal sums. Products in fp32 (fp64 inputs stay fp64) whatever the q/k/v dtype.

    Args:
        grad, query, output: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]``, newest key first; lse:
            ``[B, H, q]`` fp32.
        masked: The mask's per-diagonal values ``[H, q + kv - 1]`` (``fill`` on future keys when ``allowed``
            is None).
        allowed: Bool ``[B|1, 1, q, kv]`` against the reversed keys, or None.
        diagonal, scale, fill: As in :class:`TiledBiasAttention`.

    Returns:
        ``(grad_q [B, H, q, D], grad_key, grad_value [B, H, kv, D] reversed, grad_diagonals [H, q + kv - 1])``,
        the first three in the input dtype, the last in ``masked``'s.
    """
    work = torch.promote_types(query.dtype, torch.float32)
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    query, key, value, grad = (x.to(work) for x in (query, key, value, grad))
    row = (grad * output.to(work)).sum(-1, keepdim=True)  # rowsum(dO * O), [B, H, q, 1]
    grad_q = torch.empty_like(query)
    grad_k, grad_v = torch.zeros_like(key), torch.zeros_like(value)
    grad_diagonals = torch.zeros(masked.shape, dtype=work, device=masked.device)
    for rows, limit in tiling.tiles(q_len, kv_len, diagonal):
        keys, height = slice(kv_len - limit, kv_len), rows.stop - rows.start
        q_t, g_t, k_t, v_t = query[:, :, rows], grad[:, :, rows], key[:, :, keys], value[:, :, keys]
        # P, [B, H, qb, limit], in place. Clamped as in band_bias_gradient: weights below 1.7e-38 (future
        # keys included) keep exp off its slow paths and change no sum they enter.
        probs = torch.matmul(q_t, k_t.transpose(-1, -2)).mul_(scale)
        probs.add_(_tile_mask(masked, allowed, rows, limit, kv_len, fill)).sub_(lse[:, :, rows, None])
        probs = probs.clamp_(min=-87.0, max=80.0).exp_()
        if allowed is not None:  # masked keys of fully masked rows (lse = fill) have no gradient
            probs.mul_(allowed[:, :, rows, keys])
        # dS is written into rows padded by `height` zeros: the anti-diagonal sums read it skewed in place.
        padded = torch.empty(batch, heads, height, limit + height, dtype=work, device=query.device)
        padded[..., limit:] = 0
        d_logits = padded[..., :limit]
        torch.matmul(g_t, v_t.transpose(-1, -2), out=d_logits)
        d_logits.sub_(row[:, :, rows]).mul_(probs)
        grad_v[:, :, keys] += torch.matmul(probs.transpose(-1, -2), g_t)
        grad_q[:, :, rows] = torch.matmul(d_logits, k_t).mul_(scale)
        grad_k[:, :, keys] += torch.matmul(d_logits.transpose(-1, -2), q_t).mul_(scale)
        skewed = (padded[0] if batch == 1 else padded.sum(0)).flatten(-2)[..., : height * (limit + height - 1)]
        sums = skewed.unflatten(-1, (height, limit + height - 1)).sum(-2)  # [H, qb + limit - 1], entry r + j'
        first = rows.start + kv_len - limit  # diagonal of the tile's entry (0, 0)
        grad_diagonals[:, first:first + sums.shape[-1]] += sums
    if allowed is None:  # future keys (i - j + diagonal < 0) have no gradient
        grad_diagonals[:, : max(0, kv_len - 1 - diagonal)] = 0
    dtype = output.dtype
    return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), grad_diagonals.to(masked.dtype)
