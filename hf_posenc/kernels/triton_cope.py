"""Kernel ``cope_triton``: CoPE attention as Triton kernels, forward and backward (CUDA).

CoPE (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719), for query ``i`` and key ``j`` it may see::

    s_ij = q_i . k_j * scale
    g_ij = sigmoid(s_ij)                     (0 for a key the query may not see)
    p_ij = min(sum_{t >= j} g_it, P - 1)     (contextual position, fp32)
    z_i  = q_i @ E                           ([P]: a score per integer position; computed outside the kernel)
    e_ij = sum_n max(0, 1 - |p_ij - n|) z_in (linear interpolation between floor p and floor p + 1)
    o_i  = softmax_j(s_ij + e_ij) @ v

How the kernels are laid out (one program per block of ``BLOCK_M`` query rows of one batch and head):

* **Keys from the last one down.** The reverse cumulative sum of the gates becomes a running sum carried
  from one key block to the next (towards key 0) plus a reverse ``cumsum`` inside the block.
* **Interpolation without a gather.** ``e`` is the contraction of ``z`` with the tent weights
  ``max(0, 1 - |p - n|)`` over chunks of ``CHUNK`` positions. Only the chunks that hold a position of the tile
  are visited: a tile whose rows have all reached ``P - 1`` (far from the diagonal) visits one chunk.
* **Flash-style memory.** The forward keeps the output and the per-row softmax max and normaliser; the
  backward recomputes every tile. Nothing of size ``[q, kv]`` is stored.
* **Backward in one program per query block, two sweeps over its keys.** The gate gradient of key ``j`` is the
  prefix sum ``dg_ij = sum_{t <= j} dp_it`` of the position gradients (``dp = dS * slope``); keys run from the
  last one down, so it is written ``D_i - (suffix of dp after j)`` with the row total ``D_i`` known only at the
  end of the sweep. ``dq`` splits into two accumulators combined at the end; ``dk`` takes the part without
  ``D_i`` in the first sweep and ``scale * sum_i g'_ij D_i q_i`` in a second, light sweep (gates only).
  ``dk``/``dv`` rows are shared by the query blocks and accumulate with fp32 atomics; ``dz`` rows belong to one
  program (atomics only for ordering across its key blocks).
* Gates, positions, softmax and every accumulator are fp32; fp32 inputs multiply at IEEE precision (no TF32),
  bf16/fp16 inputs feed the tensor cores with fp32 accumulation. Block sizes are compile-time constants.

Rows that may see no key at all (a left-padded query row under some masks) give a zero output and no
gradient (the PyTorch path gives them the mean of the values of the keys of its tile instead).

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors through
Triton's interpreter: that is how ``tests/test_triton_cope.py`` checks them against
:func:`hf_posenc.encodings.cope.cope_attention` where no GPU is present.
"""

from __future__ import annotations

import torch

from .call import Call
from .dense import expand_kv, prepared

try:  # optional: the kernel is chosen only where Triton imports (Call.triton)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

#: Whether Triton can be imported here (``kernels.select`` reads it through ``Call.triton``).
AVAILABLE = triton is not None

#: Query rows per program, keys per tile and integer positions per interpolation chunk: compile-time constants.
#: The interpolation holds a ``[BLOCK_M, BLOCK_N, CHUNK]`` fp32 tile (8k values at these sizes).
BLOCK_M, BLOCK_N, CHUNK = 32, 32, 8


def _head_dim_block(dim: int) -> int:
    """Padded head dimension: a power of two, at least 16 (``tl.dot`` needs 16 on every side)."""
    return max(16, triton.next_power_of_2(dim))


if AVAILABLE:

    @triton.jit
    def _tile_mask(offs_m, offs_n, q_len, kv_len, mask_ptr, stride_mm, stride_mn, diagonal,
                   HAS_MASK: tl.constexpr, HAS_DIAGONAL: tl.constexpr):
        """Bool ``[BLOCK_M, BLOCK_N]``: which keys each row of the tile may see."""
        valid = (offs_m[:, None] < q_len) & (offs_n[None, :] < kv_len)
        if HAS_DIAGONAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + diagonal)
        if HAS_MASK:
            # int64 offsets: a [q, kv] mask passes 2**31 elements from 46k tokens on
            offsets = offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
            allowed = tl.load(mask_ptr + offsets, mask=valid, other=0)
            valid = valid & (allowed != 0)
        return valid

    @triton.jit
    def _chunk_range(positions, valid, npos, CHUNK: tl.constexpr):
        """First and end chunk start of the positions ``floor p .. floor p + 1`` the valid entries reach."""
        low = tl.min(tl.where(valid, positions, npos * 1.0))
        high = tl.max(tl.where(valid, positions, -1.0))
        first = (tl.floor(low).to(tl.int32) // CHUNK) * CHUNK
        end = tl.minimum(tl.floor(high).to(tl.int32) + 2, npos)
        return first, end

    @triton.jit
    def _gates_and_positions(q, k_ptrs, k_mask, valid, carry, scale, DOT_PRECISION: tl.constexpr):
        """Scaled logits, gates and positions of one tile (keys towards the diagonal are already in ``carry``)."""
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
        gates = tl.where(valid, tl.sigmoid(logits), 0.0)
        positions = carry[:, None] + tl.cumsum(gates, axis=1, reverse=True)
        return k, logits, gates, positions, carry + tl.sum(gates, axis=1)

    @triton.jit
    def _interpolate(z_ptr, offs_m, q_len, stride_zm, positions, valid, npos, CHUNK: tl.constexpr):
        """Position term ``e`` and its slope ``de/dp`` (0 at the top position) of a tile, ``[BLOCK_M, BLOCK_N]``."""
        clamped = tl.minimum(positions, npos - 1.0)
        floor = tl.floor(clamped)
        term = tl.zeros_like(clamped)
        slope = tl.zeros_like(clamped)
        first, end = _chunk_range(clamped, valid, npos, CHUNK)
        for start in range(first, end, CHUNK):
            n = start + tl.arange(0, CHUNK)
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + n[None, :],
                        mask=(offs_m[:, None] < q_len) & (n[None, :] < npos), other=0.0)[:, None, :]  # [M, 1, C]
            level = n[None, None, :].to(tl.float32)
            term += tl.sum(tl.maximum(1.0 - tl.abs(clamped[:, :, None] - level), 0.0) * z, axis=2)
            # z[floor p + 1] - z[floor p], picked from the chunk by comparison (no gather)
            step = tl.where(floor[:, :, None] + 1.0 == level, z, 0.0) - tl.where(floor[:, :, None] == level, z, 0.0)
            slope += tl.sum(step, axis=2)
        slope = tl.where(clamped < npos - 1.0, slope, 0.0)
        return clamped, term, slope

    @triton.jit
    def _cope_forward(
        q_ptr, k_ptr, v_ptr, z_ptr, mask_ptr, out_ptr, max_ptr, sum_ptr,
        q_len, kv_len, heads, head_dim, value_dim, npos, diagonal, scale,
        stride_mb, stride_mm, stride_mn,
        HAS_MASK: tl.constexpr, HAS_DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: B * H * T * D may pass 2**31
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        # Per (batch, head): q/z/out rows contiguous; the mask row of the batch (stride 0 when broadcast).
        q_ptr += bh * q_len * head_dim
        k_ptr += bh * kv_len * head_dim
        v_ptr += bh * kv_len * value_dim
        z_ptr += bh * q_len * npos
        mask_ptr += (bh // heads) * stride_mb
        q = tl.load(q_ptr + offs_m[:, None] * head_dim + offs_d[None, :],
                    mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim), other=0.0)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        carry = tl.zeros([BLOCK_M], tl.float32)
        keys_end = kv_len
        if HAS_DIAGONAL:  # keys after the last row's diagonal are masked for every row of the block
            keys_end = tl.maximum(tl.minimum(kv_len, tl.minimum(q_len, (block + 1) * BLOCK_M) + diagonal), 0)
        blocks = tl.cdiv(keys_end, BLOCK_N)
        for i in range(0, blocks):
            offs_n = (blocks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = _tile_mask(offs_m, offs_n, q_len, kv_len, mask_ptr, stride_mm, stride_mn, diagonal,
                               HAS_MASK, HAS_DIAGONAL)
            k_ptrs = k_ptr + offs_n[:, None] * head_dim + offs_d[None, :]
            k_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < head_dim)
            _, logits, _, positions, carry = _gates_and_positions(q, k_ptrs, k_mask, valid, carry, scale,
                                                                  DOT_PRECISION)
            _, term, _ = _interpolate(z_ptr, offs_m, q_len, npos, positions, valid, npos, CHUNK)
            scores = tl.where(valid, logits + term, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with no key yet stays at zero
            probs = tl.exp(scores - shift[:, None])
            rescale = tl.exp(row_max - shift)
            row_sum = row_sum * rescale + tl.sum(probs, axis=1)
            v = tl.load(v_ptr + offs_n[:, None] * value_dim + offs_dv[None, :],
                        mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < value_dim), other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(out_ptr + bh * q_len * value_dim + offs_m[:, None] * value_dim + offs_dv[None, :], out,
                 mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < value_dim))
        tl.store(max_ptr + bh * q_len + offs_m, row_max, mask=offs_m < q_len)
        tl.store(sum_ptr + bh * q_len + offs_m, row_sum, mask=offs_m < q_len)

    @triton.jit
    def _cope_backward(
        q_ptr, k_ptr, v_ptr, z_ptr, mask_ptr, max_ptr, sum_ptr, do_ptr, delta_ptr,
        dq_ptr, dk_ptr, dv_ptr, dz_ptr,
        q_len, kv_len, heads, head_dim, value_dim, npos, diagonal, scale,
        stride_mb, stride_mm, stride_mn,
        HAS_MASK: tl.constexpr, HAS_DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: B * H * T * D may pass 2**31
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        rows = offs_m < q_len
        q_ptr += bh * q_len * head_dim
        k_ptr += bh * kv_len * head_dim
        v_ptr += bh * kv_len * value_dim
        z_ptr += bh * q_len * npos
        dz_ptr += bh * q_len * npos
        dk_ptr += bh * kv_len * head_dim
        dv_ptr += bh * kv_len * value_dim
        mask_ptr += (bh // heads) * stride_mb
        q_mask = rows[:, None] & (offs_d[None, :] < head_dim)
        q = tl.load(q_ptr + offs_m[:, None] * head_dim + offs_d[None, :], mask=q_mask, other=0.0)
        d_out = tl.load(do_ptr + bh * q_len * value_dim + offs_m[:, None] * value_dim + offs_dv[None, :],
                        mask=rows[:, None] & (offs_dv[None, :] < value_dim), other=0.0)  # fp32
        row_max = tl.load(max_ptr + bh * q_len + offs_m, mask=rows, other=0.0)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        row_sum = tl.load(sum_ptr + bh * q_len + offs_m, mask=rows, other=0.0)
        row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
        delta = tl.load(delta_ptr + bh * q_len + offs_m, mask=rows, other=0.0)  # dO . O
        carry = tl.zeros([BLOCK_M], tl.float32)  # gates of the keys after the tile
        dp_carry = tl.zeros([BLOCK_M], tl.float32)  # dp of the keys after the tile
        dq_direct = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_j (dS - suffix * g') k_j
        dq_gates = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_j g' k_j (times the row total at the end)
        keys_end = kv_len
        if HAS_DIAGONAL:
            keys_end = tl.maximum(tl.minimum(kv_len, tl.minimum(q_len, (block + 1) * BLOCK_M) + diagonal), 0)
        blocks = tl.cdiv(keys_end, BLOCK_N)
        for i in range(0, blocks):
            offs_n = (blocks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = _tile_mask(offs_m, offs_n, q_len, kv_len, mask_ptr, stride_mm, stride_mn, diagonal,
                               HAS_MASK, HAS_DIAGONAL)
            k_ptrs = k_ptr + offs_n[:, None] * head_dim + offs_d[None, :]
            k_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < head_dim)
            k, logits, gates, positions, carry = _gates_and_positions(q, k_ptrs, k_mask, valid, carry, scale,
                                                                      DOT_PRECISION)
            clamped, term, slope = _interpolate(z_ptr, offs_m, q_len, npos, positions, valid, npos, CHUNK)
            probs = tl.where(valid, tl.exp(logits + term - row_max[:, None]) / row_sum[:, None], 0.0)
            v_mask = (offs_n[:, None] < kv_len) & (offs_dv[None, :] < value_dim)
            v = tl.load(v_ptr + offs_n[:, None] * value_dim + offs_dv[None, :], mask=v_mask, other=0.0)
            d_v = tl.dot(tl.trans(probs).to(v.dtype), d_out.to(v.dtype), input_precision=DOT_PRECISION)
            tl.atomic_add(dv_ptr + offs_n[:, None] * value_dim + offs_dv[None, :], d_v, mask=v_mask)
            d_probs = tl.dot(d_out.to(v.dtype), tl.trans(v), input_precision=DOT_PRECISION)
            d_scores = probs * (d_probs - delta[:, None])  # softmax backward, [BLOCK_M, BLOCK_N]
            # dz_n: each score's gradient split over its two integer positions by the tent weights.
            first, end = _chunk_range(clamped, valid, npos, CHUNK)
            for start in range(first, end, CHUNK):
                n = start + tl.arange(0, CHUNK)
                weights = tl.maximum(1.0 - tl.abs(clamped[:, :, None] - n[None, None, :].to(tl.float32)), 0.0)
                tl.atomic_add(dz_ptr + offs_m[:, None] * npos + n[None, :],
                              tl.sum(weights * d_scores[:, :, None], axis=1),
                              mask=rows[:, None] & (n[None, :] < npos))
            # Gate gradient dg_j = D - (dp of the keys after j); the D part is added after the sweep.
            d_pos = d_scores * slope
            after = dp_carry[:, None] + tl.cumsum(d_pos, axis=1, reverse=True) - d_pos
            dp_carry += tl.sum(d_pos, axis=1)
            gate_slope = gates * (1.0 - gates)  # 0 where masked (the gate is 0 there)
            direct = d_scores - after * gate_slope
            dq_direct += tl.dot(direct.to(k.dtype), k, input_precision=DOT_PRECISION)
            dq_gates += tl.dot(gate_slope.to(k.dtype), k, input_precision=DOT_PRECISION)
            tl.atomic_add(dk_ptr + offs_n[:, None] * head_dim + offs_d[None, :],
                          tl.dot(tl.trans(direct).to(q.dtype), q, input_precision=DOT_PRECISION) * scale,
                          mask=k_mask)
        total = dp_carry  # D_i = sum_j dp_ij
        d_q = (dq_direct + total[:, None] * dq_gates) * scale
        tl.store(dq_ptr + bh * q_len * head_dim + offs_m[:, None] * head_dim + offs_d[None, :], d_q, mask=q_mask)
        # Second sweep: dk_j += scale * sum_i g'_ij D_i q_i, from the gates alone.
        q_total = (q.to(tl.float32) * total[:, None] * scale).to(q.dtype)
        for i in range(0, blocks):
            offs_n = (blocks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = _tile_mask(offs_m, offs_n, q_len, kv_len, mask_ptr, stride_mm, stride_mn, diagonal,
                               HAS_MASK, HAS_DIAGONAL)
            k_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < head_dim)
            k = tl.load(k_ptr + offs_n[:, None] * head_dim + offs_d[None, :], mask=k_mask, other=0.0)
            gates = tl.where(valid, tl.sigmoid(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale), 0.0)
            gate_slope = gates * (1.0 - gates)
            tl.atomic_add(dk_ptr + offs_n[:, None] * head_dim + offs_d[None, :],
                          tl.dot(tl.trans(gate_slope).to(q.dtype), q_total, input_precision=DOT_PRECISION),
                          mask=k_mask)


def _launch_args(query, key, value, z, allowed, diagonal, scale):
    """Flattened ``[B*H, n, D]`` tensors and the scalar arguments shared by both kernels."""
    batch, heads, q_len, head_dim = query.shape
    kv_len, value_dim = key.shape[2], value.shape[3]
    flat = [t.reshape(batch * heads, *t.shape[2:]).contiguous() for t in (query, key, value, z)]
    if allowed is None:
        mask, strides = flat[0], (0, 0, 0)  # never read (HAS_MASK is off)
    else:
        mask = allowed.to(torch.uint8).expand(allowed.shape[0], 1, q_len, kv_len)  # [B|1, 1, q, kv]
        strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2), mask.stride(3))
    scalars = (q_len, kv_len, heads, head_dim, value_dim, z.shape[-1], 0 if diagonal is None else int(diagonal),
               float(scale), *strides)
    flags = {"HAS_MASK": allowed is not None, "HAS_DIAGONAL": diagonal is not None,
             "DOT_PRECISION": "ieee" if query.dtype == torch.float32 else "tf32",
             "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_D": _head_dim_block(head_dim),
             "BLOCK_DV": _head_dim_block(value_dim), "CHUNK": CHUNK}
    return flat, mask, scalars, flags


class _CopeTriton(torch.autograd.Function):
    """The Triton forward and backward behind :func:`cope_attention_triton` (``z = q @ E`` is an input)."""

    @staticmethod
    def forward(ctx, query, key, value, z, allowed, scale, diagonal):
        (q, k, v, zf), mask, scalars, flags = _launch_args(query, key, value, z, allowed, diagonal, scale)
        batch_heads, q_len = q.shape[0], q.shape[1]
        out = q.new_empty(batch_heads, q_len, v.shape[-1], dtype=torch.float32)
        stats = q.new_empty(2, batch_heads, q_len, dtype=torch.float32)  # row max, row sum of exp
        grid = (triton.cdiv(q_len, BLOCK_M), batch_heads)
        _cope_forward[grid](q, k, v, zf, mask, out, stats[0], stats[1], *scalars, **flags)
        ctx.save_for_backward(query, key, value, z, out, stats)
        ctx.allowed, ctx.config = allowed, (scale, diagonal)
        return out.reshape(*query.shape[:3], v.shape[-1]).to(value.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, z, out, stats = ctx.saved_tensors
        scale, diagonal = ctx.config
        (q, k, v, zf), mask, scalars, flags = _launch_args(query, key, value, z, ctx.allowed, diagonal, scale)
        d_out = grad_output.reshape(out.shape).float().contiguous()
        delta = (d_out * out).sum(-1)  # [B*H, q]: the softmax backward's row term dO . O
        d_q = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        d_k = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        d_v = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        d_z = torch.zeros(zf.shape, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(q.shape[1], BLOCK_M), q.shape[0])
        _cope_backward[grid](q, k, v, zf, mask, stats[0], stats[1], d_out, delta, d_q, d_k, d_v, d_z,
                             *scalars, **flags)
        return (d_q.reshape(query.shape).to(query.dtype), d_k.reshape(key.shape).to(key.dtype),
                d_v.reshape(value.shape).to(value.dtype), d_z.reshape(z.shape).to(z.dtype), None, None, None)


def cope_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    pos_emb: torch.Tensor,
    scaling: float,
    diagonal: int | None = None,
) -> torch.Tensor:
    """CoPE attention on the Triton kernels (the equations of the module docstring), differentiable.

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]`` (heads already expanded), fp32, bf16 or fp16.
        allowed: Bool ``[B|1, 1, q, kv]`` (True = may attend) or None.
        pos_emb: ``E``, ``[D, npos_max]``.
        scaling: Logit scale.
        diagonal: Causal offset: row ``r`` sees keys ``j <= r + diagonal`` (None: only ``allowed`` limits keys).

    Returns:
        ``[B, H, q, D]`` in the value dtype.
    """
    if not AVAILABLE:
        raise RuntimeError("cope_attention_triton needs the triton package (allowed: CoPE's PyTorch path, "
                           "hf_posenc.encodings.cope.cope_attention, where triton is not installed).")
    # Gates and positions stay fp32 whatever the autocast state (as in the PyTorch path).
    with torch.autocast(query.device.type, enabled=False):
        z = torch.matmul(query.float(), pos_emb.float())  # [B, H, q, npos_max]: the score of every integer position
        return _CopeTriton.apply(query, key, value, z, allowed, float(scaling), diagonal)


def cope_triton(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``cope_triton``: the layer's CoPE table on the Triton kernels (no weights: the eager backend and
    ``torch.compile`` take ``attend``). Returns ``(output [B, H, q, D], None)``."""
    query, key, value, allowed = prepared(call)
    key, value = expand_kv(key, query.shape[1]), expand_kv(value, query.shape[1])
    diagonal = call.diagonal if call.causal else None
    return cope_attention_triton(query, key, value, allowed, call.posenc.pos_emb, call.scaling, diagonal), None
