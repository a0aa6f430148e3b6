"""Convert RoPE checkpoints between the GPT-NeoX (half-split) and GPT-J (interleaved) layouts.

Both layouts rotate pairs of query/key dimensions by the same frequencies; they differ only in which
dimensions form a pair (``i`` with ``i + d/2``, or ``2i`` with ``2i + 1``). Permuting the rows of the
query and key projections of every head by a fixed permutation therefore moves a checkpoint from one
layout to the other without changing a logit. :func:`hf_posenc.convert.rope_layout` applies them to a
model (and :func:`hf_posenc.convert.revert` undoes them).
"""

from __future__ import annotations

import torch

from .architectures import Architecture


def layout_permutation(rotary_dim: int, head_dim_: int, source: str, target: str) -> torch.Tensor:
    """Index ``p`` with ``new_rows = old_rows[p]`` taking one head from ``source`` to ``target`` layout.

    Dimensions past ``rotary_dim`` (partial rotary) do not move.
    """
    half = rotary_dim // 2
    if (source, target) == ("half", "interleaved"):
        rotary = torch.stack((torch.arange(half), torch.arange(half) + half), dim=-1).flatten()
    elif (source, target) == ("interleaved", "half"):
        rotary = torch.cat((torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)))
    else:
        rotary = torch.arange(rotary_dim)
    return torch.cat((rotary, torch.arange(rotary_dim, head_dim_)))


@torch.no_grad()
def _permute_heads(tensor: torch.Tensor, dim: int, start: int, stop: int, perm: torch.Tensor) -> None:
    """Permute, in place, each head's ``head_dim`` block of ``tensor[start:stop]`` along ``dim``."""
    part = tensor.narrow(dim, start, stop - start)
    d = perm.numel()
    heads = part.unflatten(dim, (-1, d))
    part.copy_(heads.index_select(dim + 1, perm.to(tensor.device)).flatten(dim, dim + 1))


def permute_attention(attn, arch: Architecture, config, perm: torch.Tensor) -> None:
    """Permute, in place, the query and key rows (and q/k norms) of every head of ``attn`` by ``perm``."""
    d = perm.numel()
    hidden_q = config.num_attention_heads * d
    hidden_k = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hidden_k *= d
    fused = arch.fused_layout(config)
    if fused is None:
        for name, rows in ((arch.q_proj, hidden_q), (arch.k_proj, hidden_k)):
            proj = getattr(attn, name)
            _permute_heads(proj.weight, 0, 0, rows, perm)
            if proj.bias is not None:
                _permute_heads(proj.bias, 0, 0, rows, perm)
    elif fused == "gpt2":
        # Conv1D: weight [in, 3 * hidden] with columns (q, k, v), each [H, D].
        proj = getattr(attn, arch.q_proj)
        for start in (0, hidden_q):
            _permute_heads(proj.weight, 1, start, start + hidden_q, perm)
            _permute_heads(proj.bias, 0, start, start + hidden_q, perm)
    elif fused == "qkv":
        # Linear rows [q: H * D | k: Hkv * D | v: Hkv * D] (Phi-3 qkv_proj, ModernBERT Wqkv).
        proj = getattr(attn, arch.q_proj)
        for tensor in (proj.weight, proj.bias):
            if tensor is not None:
                _permute_heads(tensor, 0, 0, hidden_q, perm)
                _permute_heads(tensor, 0, hidden_q, hidden_q + hidden_k, perm)
    elif fused == "grouped":
        # Linear rows [Hkv, (H/Hkv q heads, k, v), D] (Falcon's new decoder): permute all but each group's v.
        proj = getattr(attn, arch.q_proj)
        for tensor in (proj.weight, proj.bias):
            if tensor is None:
                continue
            for group in tensor.unflatten(0, (hidden_k // d, -1)):
                _permute_heads(group, 0, 0, group.shape[0] - d, perm)
    elif fused == "neox":
        # Linear rows [H, (q, k, v), D]: permute the q and k blocks of every head.
        proj = getattr(attn, arch.q_proj)
        for tensor in (proj.weight, proj.bias):
            if tensor is None:
                continue
            per_head = tensor.unflatten(0, (config.num_attention_heads, 3 * d))
            for h in range(config.num_attention_heads):
                _permute_heads(per_head[h], 0, 0, 2 * d, perm)
    for name in arch.qk_norms:
        norm = getattr(attn, name, None)
        if norm is None:
            continue
        # Every parameter in head_dim blocks: one head ([D]), a [H, D] weight (Cohere), per-head norms in a
        # ModuleList (StableLM) or the whole projection ([H * D], OLMo 2). Each norm's statistics are over a
        # set of dimensions that the permutation maps onto itself, so permuting input and weight commutes.
        for tensor in norm.parameters():
            if tensor.shape[-1] % d:
                raise ValueError(f"{type(attn).__name__}.{name} has a parameter of shape {tuple(tensor.shape)}, not "
                                 f"in blocks of head_dim={d}: rope_layout cannot permute it.")
            _permute_heads(tensor.view(-1), 0, 0, tensor.numel(), perm)
