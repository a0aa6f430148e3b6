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

Memory: query rows are processed in blocks and each block is recomputed in backward
(activation checkpointing), so no ``[B, H, T, T]`` tensor is kept for backward beyond one block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import PositionModule


def _cope_block(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    pos_emb: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CoPE attention for one block of query rows.

    Args:
        query: ``[B, H, qb, D]``.
        key, value: ``[B, H, kv, D]`` (already expanded to the query heads).
        allowed: Bool ``[B|1, 1, qb, kv]`` (True = may attend) or None (attend everything).
        pos_emb: ``E``, ``[D, npos_max]``.
        scaling: Logit scale (usually ``D ** -0.5``).

    Returns:
        Output ``[B, H, qb, D]`` in the value dtype and attention probabilities ``[B, H, qb, kv]`` fp32.
    """
    npos_max = pos_emb.shape[-1]
    q32 = query.float()
    logits = torch.matmul(q32, key.float().transpose(-1, -2)) * scaling  # [B, H, qb, kv] fp32
    gates = torch.sigmoid(logits)
    if allowed is not None:
        gates = gates.masked_fill(~allowed, 0.0)
    # p_ij = sum_{m >= j} g_im: a reverse cumulative sum over keys.
    positions = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=npos_max - 1)
    floor = positions.floor()
    frac = positions - floor
    index = floor.long()
    scores = torch.matmul(q32, pos_emb.float())  # z: [B, H, qb, npos_max]
    low = scores.gather(-1, index)
    high = scores.gather(-1, (index + 1).clamp(max=npos_max - 1))
    logits = logits + low + frac * (high - low)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs.to(value.dtype), value), probs


def cope_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    pos_emb: torch.Tensor,
    scaling: float,
    block_size: int,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocked CoPE attention over all query rows (see the module docstring for the equations).

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]``; allowed: ``[B|1, 1, q, kv]`` bool or None.
        pos_emb: ``[D, npos_max]``.
        scaling: Logit scale.
        block_size: Query rows per block.
        return_weights: Also return the ``[B, H, q, kv]`` probabilities (output_attentions).

    Returns:
        ``(output [B, H, q, D], weights or None)``.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, pos_emb))
    outputs, weights = [], []
    for start in range(0, query.shape[2], block_size):
        rows = slice(start, start + block_size)
        block_allowed = None if allowed is None else allowed[:, :, rows]
        args = (query[:, :, rows], key, value, block_allowed, pos_emb, scaling)
        if needs_grad:
            out, probs = checkpoint(_cope_block, *args, use_reentrant=False)
        else:
            out, probs = _cope_block(*args)
        outputs.append(out)
        if return_weights:
            weights.append(probs)
    output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return output, (torch.cat(weights, dim=2) if return_weights else None)


class CoPE(PositionModule):
    """Per-layer CoPE position table ``E`` shared by the heads of the layer.

    Args:
        head_dim: Per-head dimension.
        npos_max: Number of integer positions.
        block_size: Query rows per block in :func:`cope_attention`.
    """

    route = "attend"

    def __init__(self, head_dim: int, npos_max: int = 64, block_size: int = 512):
        super().__init__()
        self.npos_max = npos_max
        self.block_size = block_size
        # E: [D, npos_max]; zero so that a fresh CoPE layer is plain attention.
        self.pos_emb = nn.Parameter(torch.zeros(head_dim, npos_max))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pos_emb.zero_()

    def attend(self, query, key, value, allowed, scaling, return_weights=False):
        return cope_attention(query, key, value, allowed, self.pos_emb, scaling, self.block_size, return_weights)

    def extra_repr(self) -> str:
        return f"head_dim={self.pos_emb.shape[0]}, npos_max={self.npos_max}, block_size={self.block_size}"
