"""The attention functions that apply the encodings, registered with transformers' ``AttentionInterface``.

q/k/v reach an attention function after the projections and after the KV-cache update (transformers
5.x), with ``module`` = the attention module: a converted layer carries its encoding as
``module.posenc``. Query and key positions come from the cache length recorded by the pre-hook that
``convert`` installs (``posenc_past``), never from ``key.shape`` alone, so that StaticCache (whose key
buffer is longer than what it holds) and sliding-window caches give the same results as no cache.
Positions are cache indices: a left-padded row counts its pads, which changes no relative distance
between real tokens, and every encoding here is relative.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from . import cpu_attention, kernels, registry, tiling
from .encodings.base import PositionModule

EAGER = "hf_posenc_eager"
SDPA = "hf_posenc_sdpa"
#: Our attention name for each stock backend that can express every encoding.
BACKENDS = {"eager": EAGER, "sdpa": SDPA}
#: The capabilities of a layer without an encoding module (a NoPE layer).
_NO_ENCODING = registry.Capabilities()


def key_offset(past, q_len: int, kv_len: int) -> int:
    """Cache position of the first key returned by the cache update.

    Args:
        past: Tokens in the cache before this forward (int, or a 0-d tensor for StaticCache).
        q_len: Number of queries in this forward.
        kv_len: Number of keys returned by the cache update.
    """
    # A StaticCache buffer is longer than what it holds (slot j holds position j, slots past `live` are
    # empty and masked); a dynamic or sliding-window cache returns the last kv_len keys, in order. Tensor
    # arithmetic on StaticCache's counter: int() of it is a data-dependent guard that torch.compile refuses.
    offset = past + q_len - kv_len
    return offset.clamp(min=0) if isinstance(offset, torch.Tensor) else max(0, offset)


def positions(past, q_len: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache positions of the queries ``[q]`` and keys ``[kv]`` (int64); arguments as :func:`key_offset`."""
    q_pos = torch.arange(q_len, device=device) + past
    k_pos = torch.arange(kv_len, device=device) + key_offset(past, q_len, kv_len)
    return q_pos, k_pos


def grid_positions(grid: tuple[int, int] | None, length: int, device) -> torch.Tensor:
    """``(row, column)`` positions ``[length, 2]`` (int64) of an image model's tokens: the patches of a
    ``rows x columns`` grid come last, row by row; the tokens before them (CLS, distillation, registers) get
    ``(0, 0)``, where a 2-D rotation is the identity.

    Raises:
        ValueError: No grid was recorded, or it has more patches than the sequence has tokens.
    """
    if grid is None:
        raise ValueError("This attention layer rotates by the patch grid of the image, and none was recorded in this "
                         "forward: call the image model itself with pixel_values (the grid is read from its patch "
                         "embeddings), not its encoder layers on their own.")
    rows, columns = grid
    if rows * columns > length:
        raise ValueError(f"The recorded patch grid {rows}x{columns} has more patches than the {length} tokens this "
                         "attention layer received.")
    patches = torch.stack(torch.meshgrid(torch.arange(rows, device=device), torch.arange(columns, device=device),
                                         indexing="ij"), dim=-1).reshape(-1, 2)  # [rows * columns, 2]
    return torch.cat((patches.new_zeros(length - rows * columns, 2), patches))


def causal_diagonal(past, q_len: int, kv_len: int) -> int:
    """``q_pos[0] - k_pos[0]`` of :func:`positions`: causal query row ``r`` may see key index ``j`` iff
    ``j <= r + diagonal``. A Python int, as it sizes tiles: not for use under ``torch.compile``."""
    return int(past - key_offset(past, q_len, kv_len))


def _eager_only_paths() -> bool:
    """Whether the fused CPU kernels and the tiled paths may run. They size their loops from the cache
    counter (data-dependent for StaticCache) and set thread flags (denormal flushing), which torch.compile
    cannot trace: compiled forwards take the plain paths, which compute the same attention."""
    return not torch.compiler.is_compiling()


def allowed_keys(
    attention_mask: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool
) -> torch.Tensor | None:
    """Bool ``[B|1, 1, q, kv]``: which keys each query may attend (None: all).

    Accepts transformers' sdpa masks (bool) and eager masks (0 / dtype-min floats). A missing mask on a
    causal model means plain causality (transformers omits it when it could use ``is_causal``).
    """
    if attention_mask is None:
        if not causal:
            return None
        return (k_pos[None, :] <= q_pos[:, None])[None, None]
    # Older-style masks (StableLM before transformers 5.2) may be longer than the keys: stock eager slices too.
    attention_mask = attention_mask[..., : k_pos.shape[0]]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def compute_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The precision attention runs in: autocast's when it is on for the tensors' device, else the
    common dtype of q/k/v.

    Under autocast q/k/v arrive mixed (the projections give the autocast dtype, a stock rotation by
    fp32 cos/sin promotes q/k back to fp32); stock SDPA and eager's matmuls then run in the autocast
    dtype, and the fused CPU kernels refuse mixed inputs outright.
    """
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat grouped key/value heads ``[B, Hkv, n, D]`` to ``[B, H, n, D]`` (GQA)."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(query, key, value, allowed, bias, scaling, dropout, training, softcap=None):
    """Reference attention: explicit scores and probabilities (supports ``output_attentions``).

    ``softcap`` (Gemma 2): the content logits become ``tanh(s / c) * c`` as in stock eager attention; a
    position bias is added after the cap, so that ALiBi/T5 distances are not squashed with the logits.
    """
    key, value = _expand_kv(key, query.shape[1]), _expand_kv(value, query.shape[1])
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


def _diagonals(posenc, capabilities, q_pos, k_pos, dtype):
    """The causal bias per diagonal ``[H, q + kv - 1]`` and the band its gradient comes from.

    A ``banded`` bias gives its values relative to the far constant (zero past the band); a ``diagonal``
    one varies at every distance, so its band is every distance a causal query sees: ``0 .. kv - 1``.
    """
    if capabilities.bias_form == "banded":
        return posenc.banded_diagonals(q_pos, k_pos, dtype)
    return posenc.bias_diagonals(q_pos, k_pos, True), k_pos.shape[0]


def diagonal_tiles_cpu(query, key, value, posenc, capabilities, allowed, q_pos, k_pos, scaling, diagonal):
    """Causal per-diagonal bias on the fused CPU kernel (:class:`hf_posenc.cpu_attention.TiledBiasAttention`):
    the fused kernel even when the bias is learned (its gradient comes from the band where it varies), with
    denormals flushed where the encoding declares it.

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, Hkv, kv, D]``.
        posenc, capabilities: The layer's bias module and its declared capabilities.
        allowed: Bool ``[B|1, 1, q, kv]`` or None (plain causality).
        diagonal: See :func:`causal_diagonal`.

    Returns:
        ``[B, H, q, D]``.
    """
    diagonals, band = _diagonals(posenc, capabilities, q_pos, k_pos, query.dtype)
    key, value = _expand_kv(key, query.shape[1]), _expand_kv(value, query.shape[1])
    # The fused kernel adds an fp32 mask to its fp32 logits whatever the q/k/v dtype: the bias keeps its full
    # resolution in bf16/fp16 models (ALiBi's -m * d at large distances).
    return cpu_attention.TiledBiasAttention.apply(query, key, value, diagonals.float(), allowed, diagonal, band,
                                                  scaling, capabilities.flush_denormals)


def diagonal_tiles_sdpa(query, key, value, posenc, capabilities, allowed, q_pos, k_pos, scaling, dropout, training,
                        diagonal):
    """Causal attention with a relative bias on SDPA, one call per tile of query rows.

    A float mask takes SDPA off its causal kernel, so one call over ``[q, kv]`` pays for the masked upper
    triangle too. Tiles of rows stop at the diagonal (row ``r`` sees keys ``j <= r + diagonal``), which
    halves that work, and each tile's bias is expanded from the per-diagonal values for that tile only: no
    ``[B, H, q, kv]`` bias exists at any time. Arguments as :func:`diagonal_tiles_cpu`.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    diagonals, _ = _diagonals(posenc, capabilities, q_pos, k_pos, query.dtype)
    diagonals = diagonals.to(query.dtype)  # SDPA wants the mask in the query dtype
    fill = torch.finfo(query.dtype).min
    if allowed is None:  # future keys carry the mask value
        diagonals = tiling.future_filled(diagonals, tiling.distance_diagonals(q_pos, k_pos), fill)
    outputs = []
    for rows, limit in tiling.tiles(q_len, kv_len, diagonal):
        mask = tiling.diagonal_block(diagonals, rows, slice(0, limit), kv_len)[None]  # [1, H, qb, limit]
        if allowed is not None:
            mask = torch.where(allowed[:, :, rows, :limit], mask, fill)
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, rows], key[:, :, :limit], value[:, :, :limit], attn_mask=mask,
            dropout_p=dropout if training else 0.0, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def key_fold_cpu(query, key, value, posenc, allowed, scaling, diagonal):
    """Causal ALiBi with its per-key term folded into a head dimension, tile by tile on the fused CPU kernel
    (:class:`hf_posenc.cpu_attention.TiledFoldAttention`; fp32). Returns ``[B, H, q, D]``."""
    key, value = _expand_kv(key, query.shape[1]), _expand_kv(value, query.shape[1])
    return cpu_attention.TiledFoldAttention.apply(query, key, value, posenc.slopes(query.device), allowed,
                                                  diagonal, scaling)


def posenc_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    backend: str,
    posenc_past=0,
    **kwargs,
):
    """Attention with the layer's positional encoding (``module.posenc``; none = NoPE layer).

    The encoding's registry entry says what it does (its route, bias form and kernels); the kernel for this
    call comes from :func:`hf_posenc.kernels.select`.

    Args:
        module: The attention module.
        query: ``[B, H, q, D]``; key, value: ``[B, Hkv, kv, D]`` (after the cache update).
        attention_mask: transformers' 4D mask for ``backend`` (bool for sdpa, float for eager) or None.
        scaling: Logit scale (default ``D ** -0.5``).
        dropout: Attention dropout probability (training only).
        backend: ``"eager"`` or ``"sdpa"``.
        posenc_past: Tokens cached before this forward (set by the conversion pre-hook).
        posenc_grid (in kwargs): The ``(rows, columns)`` patch grid of an image model's forward (set by the
            conversion's hooks), read by encodings that rotate by it.

    Returns:
        ``(output [B, q, H, D], probabilities [B, H, q, kv] or None)``.
    """
    posenc: PositionModule | None = getattr(module, "posenc", None)
    capabilities = posenc.registry_entry().capabilities if posenc is not None else _NO_ENCODING
    causal = getattr(module, "is_causal", True)
    softcap = kwargs.get("softcap")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    if capabilities.patch_grid:  # an image encoder: no cache, queries are the keys
        q_pos = k_pos = grid_positions(kwargs.get("posenc_grid"), q_len, query.device)
    else:
        q_pos, k_pos = positions(posenc_past, q_len, kv_len, query.device)
    dtype = compute_dtype(query, key, value)
    training = module.training
    call = kernels.Call(
        device=query.device.type, dtype=dtype, backend=backend, causal=causal, queries=q_len,
        compiling=not _eager_only_paths(), softcap=softcap is not None, dropout=dropout if training else 0.0,
        fused_cpu=cpu_attention.has_fused_kernel(),
    )
    kernel = kernels.select(capabilities, call)
    # Explicit scores (eager backend, soft-capping) need the whole mask, whichever kernel runs.
    explicit = backend == "eager" or softcap is not None
    if kernel == "two_position_rope":
        # Unrotated q/k (the stock rotation is neutralised): the module rotates them at both position sets,
        # before the cast as stock RoPE does, inside its own exact two-pass attention.
        allowed = None if attention_mask is None else allowed_keys(attention_mask, q_pos, k_pos, causal)
        output, weights = posenc.attend(
            query, key, value, q_pos, k_pos, allowed, scaling,
            diagonal=None if call.compiling else causal_diagonal(posenc_past, q_len, kv_len),
            position_ids=kwargs.get("position_ids"), dtype=dtype, explicit=explicit, softcap=softcap,
            dropout=dropout, training=training, return_weights=backend == "eager")
        return output.transpose(1, 2).contiguous(), weights
    if capabilities.route == "rotate":
        # Before the cast, as stock RoPE does: under autocast q/k still hold fp32 here.
        query, key = posenc.rotate(query, key, q_pos, k_pos)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    # Stock fast path: no mask given and queries aligned with keys (prefill without a StaticCache).
    plain_causal = causal and attention_mask is None and q_len == kv_len
    allowed = None if (plain_causal and not explicit) else allowed_keys(attention_mask, q_pos, k_pos, causal)

    if kernel in ("key_fold_cpu", "diagonal_tiles_cpu", "diagonal_tiles_sdpa"):
        diagonal = causal_diagonal(posenc_past, q_len, kv_len)
        if kernel == "key_fold_cpu":
            output = key_fold_cpu(query, key, value, posenc, allowed, scaling, diagonal)
        elif kernel == "diagonal_tiles_cpu":
            output = diagonal_tiles_cpu(query, key, value, posenc, capabilities, allowed, q_pos, k_pos, scaling,
                                        diagonal)
        else:
            output = diagonal_tiles_sdpa(query, key, value, posenc, capabilities, allowed, q_pos, k_pos, scaling,
                                         dropout, training, diagonal)
        return output.transpose(1, 2).contiguous(), None
    if kernel == "attend":
        # Causal query row r sees keys j <= r + diagonal (both position ranges are consecutive). With
        # no mask the encoding builds causality per block instead of a [q, kv] mask here.
        diagonal = causal_diagonal(posenc_past, q_len, kv_len) if causal else None
        if causal and call.compiling:
            # Compiled: a mask alone makes it causal; without one, queries and keys align (diagonal 0).
            diagonal = 0 if allowed is None else None
        key, value = _expand_kv(key, query.shape[1]), _expand_kv(value, query.shape[1])
        output, weights = posenc.attend(query, key, value, allowed, scaling, return_weights=backend == "eager",
                                        diagonal=diagonal)
        return output.transpose(1, 2).contiguous(), weights
    bias = None
    if capabilities.route == "bias":
        # The dense kernels: the eager backend (explicit weights), soft-capped layers, bidirectional (encoder)
        # biases and compiled forwards.
        bias = posenc.bias(q_pos, k_pos, causal)
        if allowed is None and causal:  # sdpa's causal flag is off with a float bias: causality goes in the mask
            allowed = allowed_keys(None, q_pos, k_pos, causal)
    if explicit:
        output, weights = eager_attention(query, key, value, allowed, bias, scaling, dropout, training, softcap)
        weights = weights if backend == "eager" else None
    else:
        output, weights = sdpa_attention(query, key, value, allowed, bias, scaling, dropout, training, plain_causal)
    return output.transpose(1, 2).contiguous(), weights


def posenc_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``hf_posenc_eager``: see :func:`posenc_attention`."""
    return posenc_attention(module, query, key, value, attention_mask, scaling, dropout, backend="eager", **kwargs)


def posenc_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``hf_posenc_sdpa``: see :func:`posenc_attention`."""
    return posenc_attention(module, query, key, value, attention_mask, scaling, dropout, backend="sdpa", **kwargs)
