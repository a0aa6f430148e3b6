"""The attention functions that apply the encodings, registered with transformers' ``AttentionInterface``.

q/k/v reach an attention function after the projections and after the KV-cache update (transformers
5.x), with ``module`` = the attention module: a converted layer carries its encoding as
``module.posenc``. Each call goes positions -> :class:`~hf_posenc.kernels.call.Call` ->
:func:`~hf_posenc.kernels.select.select` -> ``KERNELS[name](call)``: query and key positions come from the
cache length recorded by the pre-hook that ``convert`` installs (``posenc_past``; see
:mod:`hf_posenc.positions`), and every kernel lives in :mod:`hf_posenc.kernels`.
"""

from __future__ import annotations

import torch

from . import _hf, kernels, parallel
from .encodings.base import PositionModule
from .kernels import cpu_fused, triton_cope
from .positions import grid_positions, positions

EAGER = "hf_posenc_eager"
SDPA = "hf_posenc_sdpa"
#: FlexAttention (the stock name with our prefix, so that transformers checks the class supports flex).
FLEX = "hf_posenc_flex_attention"
#: Our attention name for each stock backend that can express every encoding.
BACKENDS = {"eager": EAGER, "sdpa": SDPA, "flex_attention": FLEX}


def _eager_only_paths() -> bool:
    """Whether the fused CPU kernels and the tiled paths may run. They size their loops from the cache
    counter (data-dependent for StaticCache) and set thread flags (denormal flushing), which torch.compile
    cannot trace: compiled forwards take the plain paths, which compute the same attention."""
    return not torch.compiler.is_compiling()


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


def _needs_gradient(query, key, value, posenc) -> bool:
    """Whether this call's backward will run: autograd is on and q/k/v or the layer's tables require it."""
    if not torch.is_grad_enabled():
        return False
    tensors = [query, key, value, *(posenc.parameters() if posenc is not None else ())]
    return any(t.requires_grad for t in tensors)


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
    posenc_rotated_keys=None,
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
        backend: ``"eager"``, ``"sdpa"`` or ``"flex_attention"``.
        posenc_past: Tokens cached before this forward (set by the conversion pre-hook).
        posenc_rotated_keys: The cache layer's store of rotated keys (:mod:`hf_posenc.rotated_keys`; set by the
            pre-hook for encodings that keep one) or None.
        posenc_grid (in kwargs): The ``(rows, columns)`` patch grid of an image model's forward (set by the
            conversion's hooks), read by encodings that rotate by it.

    Returns:
        ``(output [B, q, H, D], probabilities [B, H, q, kv] or None)``.
    """
    posenc: PositionModule | None = getattr(module, "posenc", None)
    capabilities = posenc.registry_entry().capabilities if posenc is not None else kernels.call.NO_ENCODING
    softcap = kwargs.get("softcap")
    q_len, kv_len = query.shape[2], key.shape[2]
    temperature = getattr(module, "posenc_temperature", None)  # hf_posenc.temperature.AttentionTemperature
    if temperature is not None:
        query = temperature.scale_queries(query, posenc_past, q_len)
    if capabilities.patch_grid:  # an image encoder: no cache, queries are the keys
        q_pos = k_pos = grid_positions(kwargs.get("posenc_grid"), q_len, query.device)
    else:
        q_pos, k_pos = positions(posenc_past, q_len, kv_len, query.device)
    # Sequence parallelism (DeepSpeed Ulysses) hands over some of the heads: per-head tables take their slice.
    heads = parallel.head_slice(query.shape[1], getattr(getattr(module, "config", None), "num_attention_heads", None))
    call = kernels.Call(
        device=query.device.type, dtype=compute_dtype(query, key, value), backend=backend,
        causal=getattr(module, "is_causal", True), queries=q_len, compiling=not _eager_only_paths(),
        softcap=softcap is not None, dropout=dropout if module.training else 0.0,
        fused_cpu=cpu_fused.has_fused_kernel(), triton=triton_cope.AVAILABLE,
        grad=_needs_gradient(query, key, value, posenc), query=query,
        key=key, value=value, attention_mask=attention_mask,
        q_pos=q_pos, k_pos=k_pos, past=posenc_past, scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        logit_cap=softcap, training=module.training, posenc=posenc, capabilities=capabilities,
        position_ids=kwargs.get("position_ids"), heads=heads, rotated_keys=posenc_rotated_keys,
    )
    output, weights = kernels.KERNELS[kernels.select(capabilities, call)](call)
    return output.transpose(1, 2).contiguous(), weights


def posenc_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``hf_posenc_eager``: see :func:`posenc_attention`."""
    return posenc_attention(module, query, key, value, attention_mask, scaling, dropout, backend="eager", **kwargs)


def posenc_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``hf_posenc_sdpa``: see :func:`posenc_attention`."""
    return posenc_attention(module, query, key, value, attention_mask, scaling, dropout, backend="sdpa", **kwargs)


def posenc_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``hf_posenc_flex_attention``: see :func:`posenc_attention`. It takes the sdpa backend's bool masks and
    turns them into block masks (:func:`hf_posenc.kernels.flex_attention.block_mask_of`), so that every kernel, flex or
    not, reads the same masks."""
    return posenc_attention(module, query, key, value, attention_mask, scaling, dropout, backend="flex_attention",
                            **kwargs)


def register() -> None:
    """Register ``hf_posenc_eager`` / ``hf_posenc_sdpa`` with transformers, each with its stock backend's mask
    function (``import hf_posenc`` does this; it adds names only)."""
    _hf.register_attention(EAGER, posenc_eager_attention, masks="eager")
    _hf.register_attention(SDPA, posenc_sdpa_attention, masks="sdpa")
    _hf.register_attention(FLEX, posenc_flex_attention, masks="sdpa")
