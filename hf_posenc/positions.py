"""Cache positions of an attention call's queries and keys, and which keys each query may see.

Positions are cache indices, taken from the cache length recorded before the forward (never from
``key.shape`` alone), so that StaticCache (whose key buffer is longer than what it holds) and sliding-window
caches give the same results as no cache. A left-padded row counts its pads, which changes no relative
distance between real tokens, and every encoding here is relative.
"""

from __future__ import annotations

import torch


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
