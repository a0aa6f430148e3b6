"""CoPE: contextual position encoding (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719).

For query ``i`` and key ``j <= i`` of one head::

    g_ij = sigmoid(q_i . k_j * scale)                    # gate: does key m count as a position step?
    p_ij = min(sum_{m=j..i} g_im, npos_max - 1)           # contextual position (fp32)
    z_i  = q_i @ E                                        # [npos_max]: a score for every integer position
    e_ij = z_i[floor p] + (p - floor p) * (z_i[floor p + 1] - z_i[floor p])
    logits_ij = q_i . k_j * scale + e_ij

The position term is added unscaled, as in the paper's listing (the reference code also divides it by
sqrt(d); the two are equivalent up to a rescaling of E). Gates are multiplied by the causal/padding
mask, so padded keys and empty StaticCache slots count zero.

On a model that soft-caps its logits (Gemma 2's ``attn_logit_softcapping = c``) the logits become
``tanh(logits_ij / c) * c`` before the mask, as in Gemma 2's eager attention. The cap takes the whole logit:
both terms are dot products of the query (with the key, with the interpolated position embedding), as
RoPE's rotated ``q . k`` is in stock Gemma 2; what the cap bounds is what the softmax sees. The gates keep
the raw ``q_i . k_j * scale``, as in the paper: they are a sigmoid, bounded already, and a model without a
cap counts the same positions.

How the fast path works (:class:`_CopeAttention`, a custom autograd function):

* **Keys in reverse order.** Every block works on the keys flipped (nearest key first), so the
  paper's reverse cumulative sum becomes one forward ``cumsum`` that adds the small near-diagonal
  gates first (fp32 error relative to the position itself, not to the row total).
* **Gather-free interpolation.** In that order ``p`` is non-decreasing along the keys, so
  ``floor(p) = n`` holds on one contiguous run of keys per integer ``n``. ``torch.searchsorted``
  finds the ``npos_max`` run boundaries per row, and the step functions ``z[floor p]``,
  ``z[floor p + 1] - z[floor p]`` and ``floor p`` are rebuilt as cumulative sums of their jumps at
  those boundaries. Interpolation then costs a few elementwise passes and no ``[q, kv]`` int64 index
  tensor ever exists (a gather needs one, 8 bytes per element, and autograd keeps it for backward).
  The backward pass sums gradients per run the same way (cumsum + read at the boundaries).
* **Flash-style memory.** Forward keeps only ``q, k, v, E``, the output and the softmax row max and
  normaliser (``[2, B, H, q]``); backward recomputes each block. Nothing of size ``[q, kv]`` outlives a block.
* **Causal blocks stop at the diagonal.** Given the diagonal offset, a block of query rows only
  reads the keys some row of it may see: about half of the ``[q, kv]`` work of a full pass.
* **Clamped keys skip the step functions.** Once every row of a tile has reached ``npos_max - 1``
  (after about ``2 * npos_max`` keys when gates are near 0.5), the remaining keys get the top score
  ``z[npos_max - 1]`` directly and no position gradient. How much this saves depends on the gates:
  a layer whose gates stay near 0 never clamps and pays for the step functions on every key.
* The run boundaries have a static shape (``npos_max`` per row); the clamp point is one host sync per
  tile. Under ``torch.compile`` the step functions cover every key instead (a static width that inductor can
  lower, exact past the clamp too), so ``fullgraph=True`` compiles with the default backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import registry
from ..config import PosEncConfig, check_positive, fail_field
from .base import PositionModule

_NEG = torch.finfo(torch.float32).min
#: Query rows per tile of the fast path (at most the module's ``block_size``). Causal tiles stop at the
#: diagonal, so smaller tiles skip more of the masked triangle; on CPU (1 core, T=2048, H=4, D=64)
#: fwd+bwd took 2.6x / 1.65x / 1.36x / 1.2x stock eager attention at 512 / 256 / 128 / 64 rows.
TILE_ROWS = 64


def _causal_limit(stop: int, kv_len: int, diagonal: int | None) -> int:
    """Number of leading keys that query rows ``< stop`` may see (row ``r`` sees keys ``<= r + diagonal``)."""
    if diagonal is None:
        return kv_len
    return max(1, min(kv_len, stop + diagonal))


def _block_mask(allowed, start: int, stop: int, limit: int, diagonal: int | None, device) -> torch.Tensor | None:
    """Bool mask of one block in reversed key order, ``[B|1, 1, qb, m]``: it covers the first ``m <= limit`` keys,
    every key after them is allowed (None: every key allowed)."""
    if allowed is not None:
        return allowed[:, :, start:stop, :limit].flip(-1)
    # Reversed position jr holds key j = limit - 1 - jr; row r sees j <= r + diagonal, so its first visible
    # position is (limit - 1 - diagonal) - r. None where the block's first row already sees every key (decode).
    # Only the first (limit - 1 - diagonal - start) positions hide a key from some row (a tile's triangle at the
    # diagonal): the mask covers those, so that filling it costs a tile's width, not the whole block's.
    hidden = min(limit, limit - 1 - diagonal - start) if diagonal is not None else 0
    if hidden <= 0:
        return None
    rows = torch.arange(start, stop, device=device)
    first_visible = (limit - 1 - diagonal) - rows  # [qb]: smallest jr visible to the row
    return (torch.arange(hidden, device=device)[None, :] >= first_visible[:, None])[None, None]


def _gates_and_positions(qk: torch.Tensor, hidden: torch.Tensor | None, npos_max: int):
    """Gates and clamped positions ``[B, H, qb, n]`` of a block's first ``n <= kb`` keys (reversed order), ``n``
    reaching at least the point where every row's position is clamped at ``npos_max - 1``.

    Past that point no key needs its gate or position (they all take the top score), so the sigmoid and the
    running sum stop there instead of covering every key: chunks of keys, from ``4 * npos_max`` and doubling,
    with one host sync per chunk (under ``torch.compile``: every key, no sync).

    Args:
        qk: Scaled logits ``[B, H, qb, kb]``.
        hidden: Bool ``[B|1, 1, qb, m]``: keys ``< m`` hidden from a row (their gates count 0), or None.
        npos_max: Number of integer positions.
    """
    kb, top = qk.shape[-1], npos_max - 1
    gates, positions = [], []
    start, size, carry = 0, max(256, 4 * npos_max), None
    while start < kb:
        stop = kb if torch.compiler.is_compiling() else min(kb, start + size)
        chunk = torch.sigmoid(qk[..., start:stop])
        if hidden is not None and start < hidden.shape[-1]:
            end = min(stop, hidden.shape[-1])
            chunk[..., :end - start].masked_fill_(hidden[..., start:end], 0.0)
        running = chunk.cumsum(-1)
        if carry is not None:
            running.add_(carry)
        gates.append(chunk)
        positions.append(running)
        carry = running[..., -1:]
        start, size = stop, 2 * size
        if start < kb and bool(carry.min() >= top):  # every row clamped: the remaining keys need nothing
            break
    if len(gates) == 1:
        return gates[0], positions[0].clamp_(max=top)
    return torch.cat(gates, -1), torch.cat(positions, -1).clamp_(max=top)


def _block_forward(q, k_rev, mask, pos_emb, scaling, softcap=None, qk=None):
    """Logits, gates and position terms of one block (keys reversed).

    Args:
        q: ``[B, H, qb, D]`` fp32.
        k_rev: ``[B, H, kb, D]`` fp32, nearest key first (unused when ``qk`` is given).
        mask: Bool ``[B|1, 1, qb, m]`` in the same order for the first ``m <= kb`` keys (the keys after them are
            allowed), or None.
        pos_emb: ``E``, ``[D, npos_max]`` fp32.
        scaling: Logit scale.
        softcap: Soft-capping constant ``c`` of the logits (None: none); the gates see the raw ``q . k``.
        qk: The block's scaled logits ``q . k * scaling`` in reversed key order (``[B, H, qb, kb]``, written over),
            where the caller computed them; None: from ``q`` and ``k_rev``.

    Returns:
        ``scores`` (masked logits incl. the position term, soft-capped, ``[B, H, qb, kb]``) and, for backward, ``gates``
        (``[B, H, qb, n]``, at least the first ``width`` keys), ``frac`` (``p - floor p``) and ``slope``
        (``z[floor p + 1] - z[floor p]``) on the first ``width`` keys (``[B, H, qb, width]``), and ``bounds``
        ``[B, H, qb, npos_max - 1]`` (the first key of each run ``floor p >= n``, ``n = 1..npos_max-1``). From key
        ``width`` on, every row's position is clamped at the top: the term is the constant ``z[npos_max - 1]`` with
        no slope.
    """
    npos_max = pos_emb.shape[-1]
    if qk is None:
        qk = torch.matmul(q, k_rev.transpose(-1, -2)).mul_(scaling)  # [B, H, qb, kb]
    hidden = None if mask is None else ~mask
    gates, positions = _gates_and_positions(qk, hidden, npos_max)  # non-decreasing positions along keys
    z = torch.matmul(q, pos_emb)  # [B, H, qb, npos_max]
    # d_n = z_{n+1} - z_n, and 0 at the top position (clamped p has no slope).
    slopes = F.pad(z.diff(dim=-1), (0, 1))  # [B, H, qb, npos_max]
    levels = torch.arange(1, npos_max, device=q.device, dtype=torch.float32)
    bounds = torch.searchsorted(positions, levels.expand(*positions.shape[:-1], npos_max - 1).contiguous())
    # Positions reach the clamp after about 2 * npos_max keys when gates are near 0.5: only the keys
    # before the last row's clamp point need the step functions; the rest get the top score directly.
    if torch.compiler.is_compiling():
        # A data-dependent width cannot size a compiled graph (inductor cannot lower the unbacked size): every
        # key takes the step functions, which are exact past the clamp too (top value, slope 0, frac 0).
        width = positions.shape[-1]
    else:
        width = int(bounds[..., -1].max()) if bounds.numel() else 0
    positions = positions[..., :width]
    # Step functions as cumulative sums of their jumps: channel 0 = z[floor p], 1 = slope, 2 = floor p.
    jumps = positions.new_zeros(3, *positions.shape[:-1], width + 1)
    jumps[0, ..., 0] = z[..., 0]
    jumps[1, ..., 0] = slopes[..., 0]
    steps = torch.stack((z.diff(dim=-1), slopes.diff(dim=-1), torch.ones_like(slopes[..., 1:])))
    jumps.scatter_add_(-1, bounds.expand(3, *bounds.shape), steps)
    step_fns = jumps[..., :width].cumsum(-1)  # [3, B, H, qb, width]
    # Measuring frac from the rebuilt floor (not floor(p)) keeps the pieces consistent with each other
    # even if rounding ever broke monotonicity: linear interpolation is continuous across a run edge.
    frac = positions - step_fns[2]
    slope = step_fns[1]
    scores = qk
    scores[..., :width].add_(step_fns[0]).addcmul_(frac, slope)
    scores[..., width:].add_(z[..., -1:])
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if hidden is not None:
        scores[..., :hidden.shape[-1]].masked_fill_(hidden, _NEG)
    return scores, gates, frac, slope, bounds


def _run_sums(values: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Sums of ``values [..., kb]`` over the runs ``floor p = n``, ``[..., npos_max]``.

    Args:
        values: ``[C, B, H, qb, kb]``.
        bounds: ``[B, H, qb, npos_max - 1]`` run starts for ``n >= 1`` (run 0 starts at key 0).
    """
    kb = values.shape[-1]
    prefix = F.pad(values, (1, 0)).cumsum(-1)  # exclusive prefix sums, [C, B, H, qb, kb + 1]
    edges = F.pad(bounds, (1, 1), value=0)
    edges[..., -1] = kb  # [B, H, qb, npos_max + 1]: run n is keys edges[n] .. edges[n + 1] - 1
    at_edges = prefix.gather(-1, edges.expand(values.shape[0], *edges.shape))
    return at_edges[..., 1:] - at_edges[..., :-1]


class _CopeAttention(torch.autograd.Function):
    """Blocked CoPE attention with a recomputing backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, query, key, value, pos_emb, allowed, scaling, block_size, diagonal, return_weights, softcap):
        # Gates, cumsum and positions must stay fp32 (over 8k keys the position error is ~2 in fp16, ~8 in bf16):
        # autocast would run the block matmuls in bf16/fp16, which also cannot hold the fp32 mask fill.
        with torch.autocast(query.device.type, enabled=False):
            return _CopeAttention._forward(ctx, query, key, value, pos_emb, allowed, scaling, block_size, diagonal,
                                           return_weights, softcap)

    @staticmethod
    def _forward(ctx, query, key, value, pos_emb, allowed, scaling, block_size, diagonal, return_weights, softcap):
        batch, heads, q_len, _ = query.shape
        kv_len = key.shape[-2]
        e32 = pos_emb.float()
        # Fewer query rows than head dimensions (decode): the [q, kv] logits and probabilities are smaller than
        # the keys and values, so they are flipped instead of copying the whole cache reversed at every step.
        flip_rows = q_len < key.shape[-1] and not return_weights
        if flip_rows:
            key32, value32 = key.float(), value.float()
        else:
            k_rev, v_rev = key.float().flip(-2), value.float().flip(-2)  # [B, H, kv, D], nearest key first
        output = query.new_empty(batch, heads, q_len, value.shape[-1], dtype=torch.float32)
        stats = query.new_empty(2, batch, heads, q_len, dtype=torch.float32)  # row max, row sum of exp
        weights = query.new_zeros(batch, heads, q_len, kv_len, dtype=torch.float32) if return_weights else None
        for start in range(0, q_len, block_size):
            stop = min(start + block_size, q_len)
            limit = _causal_limit(stop, kv_len, diagonal)
            mask = _block_mask(allowed, start, stop, limit, diagonal, query.device)
            q = query[:, :, start:stop].float()
            if flip_rows:
                qk = torch.matmul(q, key32[:, :, :limit].transpose(-1, -2)).flip(-1).mul_(scaling)  # [B, H, qb, kb]
                scores, *_ = _block_forward(q, None, mask, e32, scaling, softcap, qk=qk)
            else:
                scores, *_ = _block_forward(q, k_rev[:, :, kv_len - limit:], mask, e32, scaling, softcap)
            # Softmax statistics kept per row: the max and the normaliser. Recomputing exp(s - max) / sum
            # in backward is as exact as the forward softmax; exp(s - logsumexp) would round s - lse at
            # the magnitude of the logits (relative errors ~1e-5 on peaked rows).
            row_max = scores.amax(dim=-1, keepdim=True)
            probs = scores.sub_(row_max).exp_()  # [B, H, qb, kb]
            row_sum = probs.sum(dim=-1, keepdim=True)
            probs = probs.div_(row_sum)
            if flip_rows:
                output[:, :, start:stop] = torch.matmul(probs.flip(-1), value32[:, :, :limit])
            else:
                output[:, :, start:stop] = torch.matmul(probs, v_rev[:, :, kv_len - limit:])
            stats[0, :, :, start:stop] = row_max[..., 0]
            stats[1, :, :, start:stop] = row_sum[..., 0]
            if return_weights:
                weights[:, :, start:stop, :limit] = probs.flip(-1)
        output = output.to(value.dtype)
        ctx.save_for_backward(query, key, value, pos_emb, output, stats)
        ctx.allowed = allowed  # a bool mask shared by every layer; saved by reference
        ctx.config = (scaling, block_size, diagonal, softcap)
        ctx.device_type = query.device.type
        # The weights are differentiable (attribution methods take gradients through them); without this a
        # caller that only uses the output would hand backward a [B, H, q, kv] tensor of zeros.
        ctx.set_materialize_grads(False)
        return output, weights

    @staticmethod
    def backward(ctx, grad_output, grad_weights):
        with torch.autocast(ctx.device_type, enabled=False):
            return _CopeAttention._backward(ctx, grad_output, grad_weights)

    @staticmethod
    def _backward(ctx, grad_output, grad_weights):
        """Gradients from ``dO`` and, when the weights were used, ``dW`` (``[B, H, q, kv]`` or None).

        With ``dP = dO v^T + dW`` the softmax backward is ``dS = P * (dP - rowsum(P * dP))``, and
        ``rowsum(P * dO v^T) = dO . O``: the weights add ``dW`` to ``dP`` and ``rowsum(P * dW)`` to the row term.
        """
        query, key, value, pos_emb, output, stats = ctx.saved_tensors
        scaling, block_size, diagonal, softcap = ctx.config
        allowed = ctx.allowed
        q_len, kv_len = query.shape[-2], key.shape[-2]
        e32 = pos_emb.float()
        k_rev, v_rev = key.float().flip(-2), value.float().flip(-2)
        if grad_output is None:  # only the weights were used
            grad_output = output.new_zeros(output.shape, dtype=torch.float32)
        grad_output = grad_output.float()
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i (the softmax backward's row term), [B, H, q, 1].
        delta = (grad_output * output.float()).sum(-1, keepdim=True)
        grad_q = torch.empty_like(query, dtype=torch.float32)
        grad_k_rev = torch.zeros_like(k_rev)
        grad_v_rev = torch.zeros_like(v_rev)
        grad_e = torch.zeros_like(e32)
        for start in range(0, q_len, block_size):
            stop = min(start + block_size, q_len)
            limit = _causal_limit(stop, kv_len, diagonal)
            keys = slice(kv_len - limit, kv_len)
            mask = _block_mask(allowed, start, stop, limit, diagonal, query.device)
            q = query[:, :, start:stop].float()
            d_out = grad_output[:, :, start:stop]
            scores, gates, frac, slope, bounds = _block_forward(q, k_rev[:, :, keys], mask, e32, scaling, softcap)
            # d(c * tanh(x / c)) / dx = 1 - (capped / c) ** 2; masked keys hold the fill value: the clamp gives
            # them 0 (their probability is 0 too) instead of inf.
            cap_slope = 1 - (scores / softcap).clamp_(-1, 1).square_() if softcap is not None else None
            probs = scores.sub_(stats[0, :, :, start:stop, None]).exp_().div_(stats[1, :, :, start:stop, None])
            grad_v_rev[:, :, keys] += torch.matmul(probs.transpose(-1, -2), d_out)
            d_probs = torch.matmul(d_out, v_rev[:, :, keys].transpose(-1, -2))  # [B, H, qb, kb]
            row_term = delta[:, :, start:stop]
            if grad_weights is not None:  # the block's dW in reversed key order (keys >= limit have none)
                d_weights = grad_weights[:, :, start:stop, :limit].flip(-1).float()
                d_probs.add_(d_weights)
                row_term = row_term + (d_weights * probs).sum(-1, keepdim=True)
            d_scores = d_probs.sub_(row_term).mul_(probs)  # softmax backward, [B, H, qb, kb]
            if cap_slope is not None:  # back through the cap: the gradient of the uncapped logits
                d_scores.mul_(cap_slope)
            del probs, scores, cap_slope
            # Position term e = Z + frac * slope, linear in z on each run floor p = n:
            # dz_n gets (1 - frac) * dS from run n and frac * dS from run n - 1.
            width = frac.shape[-1]
            head = d_scores[..., :width]
            runs = _run_sums(torch.stack((head, head * frac)), bounds)  # [2, B, H, qb, npos_max]
            grad_z = runs[0] - runs[1]
            grad_z[..., 1:] += runs[1][..., :-1]
            grad_z[..., -1] += d_scores[..., width:].sum(-1)  # clamped keys: the top score, weight 1
            # dp = dS * slope; p_j sums the gates of keys 0..j (reversed order), so dg_m = sum_{j >= m} dp_j,
            # which is zero from `width` on (no slope there).
            d_pos = head * slope
            d_gates = d_pos.sum(-1, keepdim=True) - d_pos.cumsum(-1) + d_pos
            # Masked gates are 0, so gates * (1 - gates) also zeroes their gradient.
            g = gates[..., :width]
            head.addcmul_(d_gates, g * (1 - g))
            d_qk = d_scores.mul_(scaling)
            grad_q[:, :, start:stop] = torch.matmul(d_qk, k_rev[:, :, keys]) + torch.matmul(grad_z, e32.t())
            grad_k_rev[:, :, keys] += torch.matmul(d_qk.transpose(-1, -2), q)
            grad_e += q.reshape(-1, q.shape[-1]).t() @ grad_z.reshape(-1, grad_z.shape[-1])
        return (grad_q.to(query.dtype), grad_k_rev.flip(-2).to(key.dtype), grad_v_rev.flip(-2).to(value.dtype),
                grad_e.to(pos_emb.dtype), None, None, None, None, None, None)


def _decode_row(query, key, value, pos_emb, allowed, scaling: float, diagonal: int | None, softcap: float | None):
    """One query row without gradient (a decode step): the paper's equations on a ``[B, H, 1, kv]`` row, in key
    order, the position term read with two gathers from ``q @ E``.

    A row of ``kv`` logits is small, so none of the blocked path's machinery (reversed keys, run boundaries,
    step functions rebuilt by cumulative sums, clamp detection) pays for itself here: its many small operations
    cost more than the arithmetic. The running sum still adds the nearest gates first (over the flipped row).
    Arguments as :func:`cope_attention` (``allowed`` ``[B|1, 1, 1, kv]`` or None); returns ``[B, H, 1, D]``.
    """
    with torch.autocast(query.device.type, enabled=False):  # fp32 gates and positions, as the blocked path
        npos_max = pos_emb.shape[-1]
        limit = _causal_limit(1, key.shape[-2], diagonal)  # keys after these are in the future
        q = query.float()
        qk = torch.matmul(q, key[:, :, :limit].float().transpose(-1, -2)).mul_(scaling)  # [B, H, 1, kb]
        gates = torch.sigmoid(qk)
        mask = None
        if allowed is not None:
            mask = allowed[..., :limit]
            gates.masked_fill_(~mask, 0.0)
        # p_j = sum of the gates of keys j..last: a running sum over the row flipped (nearest key first).
        positions = gates.flip(-1).cumsum(-1).clamp_(max=npos_max - 1)  # reversed key order
        floor = positions.floor()
        index = floor.long()
        z = torch.matmul(q, pos_emb.float())  # [B, H, 1, npos_max]
        low = z.gather(-1, index)
        high = z.gather(-1, index.add_(1).clamp_(max=npos_max - 1))
        scores = qk.add_(high.sub_(low).mul_(positions.sub_(floor)).add_(low).flip(-1))  # key order again
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        if mask is not None:
            scores = scores.masked_fill_(~mask, _NEG)
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, value[:, :, :limit].float()).to(value.dtype)


def cope_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    pos_emb: torch.Tensor,
    scaling: float,
    block_size: int,
    return_weights: bool = False,
    diagonal: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocked CoPE attention over all query rows (see the module docstring for the equations).

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]`` (heads already expanded).
        allowed: Bool ``[B|1, 1, q, kv]`` (True = may attend) or None (every key, or plain causality
            when ``diagonal`` is given).
        pos_emb: ``E``, ``[D, npos_max]``.
        scaling: Logit scale.
        block_size: Upper bound on the query rows per block (bounds the ``[rows, kv]`` working set); the
            fast path uses tiles of ``min(block_size, TILE_ROWS)`` rows.
        return_weights: Also return the ``[B, H, q, kv]`` probabilities (output_attentions), fp32 and
            differentiable like the output.
        diagonal: Causal offset: query row ``r`` may only see keys ``j <= r + diagonal`` (``kv - q``
            for a dynamic cache). Lets blocks skip keys no row of theirs can see; None: read all keys.
        softcap: Gemma 2's ``attn_logit_softcapping`` ``c``: logits become ``tanh(logits / c) * c`` before the
            mask (the gates see the raw ``q . k``; module docstring). None: no cap.

    Returns:
        ``(output [B, H, q, D] in the value dtype, weights fp32 or None)``. Gates, positions and softmax run
        in fp32 whatever the input dtype and autocast state.
    """
    one_row = query.shape[2] == 1 and not return_weights and not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, pos_emb)))
    if one_row:
        return _decode_row(query, key, value, pos_emb, allowed, float(scaling), diagonal, softcap), None
    rows = max(1, min(int(block_size), TILE_ROWS))
    return _CopeAttention.apply(query, key, value, pos_emb, allowed, float(scaling), rows,
                                None if diagonal is None else int(diagonal), bool(return_weights),
                                None if softcap is None else float(softcap))


class CoPE(PositionModule):
    """Per-layer CoPE position table ``E`` shared by the heads of the layer.

    Args:
        head_dim: Per-head dimension.
        npos_max: Number of integer positions.
        block_size: Query rows per block in :func:`cope_attention`.
    """

    def __init__(self, head_dim: int, npos_max: int = 64, block_size: int = 512):
        super().__init__()
        self.npos_max = npos_max
        self.block_size = block_size
        # E: [D, npos_max]; zero so that a fresh CoPE layer is plain attention. fp32 whatever the model dtype
        # (explicitly: from_pretrained(dtype=bf16) builds under that default dtype and would round the saved table).
        self.pos_emb = nn.Parameter(torch.zeros(head_dim, npos_max, dtype=torch.float32))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pos_emb.zero_()

    def attend(self, query, key, value, allowed, scaling, return_weights=False, diagonal=None, softcap=None):
        return cope_attention(query, key, value, allowed, self.pos_emb, scaling, self.block_size, return_weights,
                              diagonal, softcap)

    def extra_repr(self) -> str:
        return f"head_dim={self.pos_emb.shape[0]}, npos_max={self.npos_max}, block_size={self.block_size}"


@dataclass(frozen=True)
class CopeConfig(PosEncConfig):
    """Contextual position encoding (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719).

    Positions are counted by gates ``sigmoid(q_i . k_j * scale)`` summed from key ``j`` to query ``i``
    (fp32); the position term interpolates ``q_i @ E`` between the integer positions around it. As in
    the paper's listing, the position term is added unscaled to the scaled logits. ``E`` starts at zero,
    so a fresh CoPE layer is plain (NoPE) attention. Causal models only.

    Args:
        npos_max: Number of integer positions (positions are clamped to ``npos_max - 1``).
        block_size: Query rows processed together (bounds peak memory; does not change results).
    """

    kind: str = "cope"
    npos_max: int = 64
    block_size: int = 512
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        check_positive(self.kind, "npos_max", self.npos_max, integer=True)
        check_positive(self.kind, "block_size", self.block_size, integer=True)
        if self.npos_max < 2:
            fail_field(self.kind, "npos_max", self.npos_max, "an integer >= 2")


registry.register(registry.Encoding(
    kind="cope",
    config_class=CopeConfig,
    module_class=CoPE,
    build=lambda config, layer: CoPE(layer.head_dim, config.npos_max, config.block_size),
    capabilities=registry.Capabilities(route="attend", needs_logits=True, causal_only=True, tables=("pos_emb",),
                                       kernels=("cope_triton",)),
    display_name="CoPE",
    paper="https://arxiv.org/abs/2405.18719",
    backends=registry.OWN_BACKENDS,
    causal_reason="positions count gates over past keys",
    # Its position term interpolates between integer positions: rounding q/k in low precision moves a few
    # positions across an integer and changes their gradient by O(1), whatever precision the kernel keeps.
    example=registry.Example(params={"npos_max": 16}, prefill_kernels=("attend", "attend"), archs=("llama", "gpt_neox"),
                             grad_tol=0.15),
))
