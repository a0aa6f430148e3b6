"""The worker of ``tests/test_triton_cope.py``: runs CoPE's Triton kernels under Triton's CPU interpreter and
writes, per case, the largest differences from the PyTorch implementation as JSON (``sys.argv[1]``).

``TRITON_INTERPRET=1`` must be set before triton is imported (the ``triton.jit`` decorator reads it when the
kernel module is imported), hence a process of its own. Tiles are shrunk to 16 rows/keys and chunks to 4
positions, so that the tiny cases cover several key tiles, several chunks, partial tiles and clamped tiles.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import torch  # noqa: E402

from hf_posenc import kernels  # noqa: E402
from hf_posenc.encodings.cope import CoPE, cope_attention  # noqa: E402
from hf_posenc.kernels import triton_cope  # noqa: E402
from hf_posenc.registry import get as registry_entry  # noqa: E402

triton_cope.BLOCK_M, triton_cope.BLOCK_N, triton_cope.CHUNK = 16, 16, 4


def _inputs(batch, heads, q_len, kv_len, dim, npos, dtype, seed):
    """Random q/k/v (logits of order 1: gates spread over (0, 1)) and a random table E (leaves)."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=generator) for n in (q_len, kv_len, kv_len))
    table = torch.randn(dim, npos, generator=generator) * 0.5
    return [t.to(dtype).requires_grad_() for t in (q, k, v)] + [table.requires_grad_()]


def _compare(out, ref, leaves, rows):
    """Largest output difference on ``rows`` (``[B, 1, q, 1]`` bool) and relative gradient differences of a
    random loss over those rows."""
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)) * rows
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.to(ref.dtype))
    report = {"output": ((out.float() - ref.float()) * rows).abs().max().item()}
    for name, got, want in zip(("q", "k", "v", "pos_emb"), grads, ref_grads):
        report[name] = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    return report


def functional_case(batch=2, heads=2, q_len=37, kv_len=37, dim=16, npos=6, pads=(0, 0), dtype=torch.float32,
                    seed=0):
    """``cope_attention_triton`` against ``cope_attention`` on the same inputs, causal with offset
    ``kv_len - q_len``; ``pads`` left-pads each sequence (a mask over keys, rows with no key excluded)."""
    q, k, v, table = _inputs(batch, heads, q_len, kv_len, dim, npos, dtype, seed)
    diagonal = kv_len - q_len
    allowed = None
    if any(pads):
        keys, queries = torch.arange(kv_len), torch.arange(q_len) + diagonal
        allowed = (keys[None, None, None, :] <= queries[None, None, :, None]) & \
            (keys >= torch.tensor(pads)[:, None])[:, None, None, :]  # [B, 1, q, kv]
    rows = torch.ones(batch, 1, q_len, 1) if allowed is None else allowed.any(-1, keepdim=True).float()
    scale = dim ** -0.5
    out = triton_cope.cope_attention_triton(q, k, v, allowed, table, scale, diagonal)
    ref, _ = cope_attention(q, k, v, allowed, table, scale, 512, diagonal=diagonal)
    report = _compare(out, ref, (q, k, v, table), rows)
    if not rows.all():  # rows that see no key: zero output by design (the PyTorch path averages its tile's values)
        report["rows_without_keys"] = (out.float() * (1 - rows)).abs().max().item()
    return report


def kernel_case():
    """The ``cope_triton`` kernel against ``attend`` on one attention call of a CoPE layer: GQA (2 query heads
    per KV head), a transformers-style bool mask with left padding, a random table."""
    batch, heads, kv_heads, length, dim, npos = 2, 4, 2, 29, 8, 5
    q, k, v, table = _inputs(batch, heads, length, length, dim, npos, torch.float32, 1)
    k, v = (t.detach()[:, :kv_heads].clone().requires_grad_() for t in (k, v))
    layer = CoPE(dim, npos)
    with torch.no_grad():
        layer.pos_emb.copy_(table)
    pads = torch.tensor([0, 7])
    positions = torch.arange(length)
    mask = (positions[None, :] <= positions[:, None])[None, None] & (positions >= pads[:, None])[:, None, None, :]
    outputs = {}
    for name in ("cope_triton", "attend"):
        call = kernels.Call(device="cpu", dtype=torch.float32, backend="sdpa", queries=length, query=q, key=k,
                            value=v, attention_mask=mask, q_pos=positions, k_pos=positions, scaling=dim ** -0.5,
                            posenc=layer, capabilities=registry_entry("cope").capabilities, grad=True)
        outputs[name] = kernels.KERNELS[name](call)[0]
    rows = mask.any(-1, keepdim=True).float()
    return _compare(outputs["cope_triton"], outputs["attend"], (q, k, v, layer.pos_emb), rows)


CASES = {
    "causal": functional_case,
    "padded": lambda: functional_case(pads=(0, 5)),
    "cached": lambda: functional_case(q_len=9, kv_len=40, pads=(3, 0)),
    "unclamped": lambda: functional_case(batch=1, q_len=23, kv_len=23, dim=8, npos=24),
    "single_row": lambda: functional_case(q_len=1, kv_len=21),
    "kernel_call": kernel_case,
    "fp16": lambda: functional_case(dtype=torch.float16),
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    json.dump({name: case() for name, case in CASES.items()}, open(sys.argv[1], "w"), indent=1)
