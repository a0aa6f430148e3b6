"""The SDPA fast paths of the bias encodings against explicit softmax attention with the papers' biases.

ALiBi (https://arxiv.org/abs/2108.12409): ``-m_h (i - j)``; T5 (https://arxiv.org/abs/1910.10683): a learned
scalar per (distance bucket, head). The references build the full ``[H, q, kv]`` bias from the positions
directly; the fast paths fold ALiBi into an extra head dimension (fp32) or tile query rows with per-diagonal
biases (T5, ALiBi in other dtypes).
"""

import pytest
import torch

from hf_posenc import attention
from hf_posenc.encodings import AlibiBias, T5Bias, relative_position_bucket


class Layer(torch.nn.Module):
    is_causal = True

    def __init__(self, posenc):
        super().__init__()
        self.posenc = posenc


def reference(posenc, q, k, v, q_pos, k_pos, allowed):
    distance = q_pos[:, None] - k_pos[None, :]  # [q, kv]
    if isinstance(posenc, AlibiBias):
        bias = -posenc.slopes("cpu")[:, None, None].double() * distance
    else:
        buckets = relative_position_bucket(-distance, False, posenc.num_buckets, posenc.max_distance)
        bias = posenc.relative_attention_bias.double()[buckets].permute(2, 0, 1)
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["alibi", "t5_bias"])
@pytest.mark.parametrize("case", ["prefill", "cached_padded"])
def test_sdpa_bias_paths_match_explicit_attention(monkeypatch, kind, case, dtype):
    monkeypatch.setattr(attention, "BIAS_TILE_ROWS", 5)  # several tiles, one partial
    torch.manual_seed(0)
    posenc = AlibiBias(4) if kind == "alibi" else T5Bias(4, num_buckets=8, max_distance=12)
    if kind == "t5_bias":
        torch.nn.init.normal_(posenc.relative_attention_bias)
    past, q_len = (0, 23) if case == "prefill" else (17, 6)
    kv_len = past + q_len
    q = torch.randn(2, 4, q_len, 8, dtype=dtype)
    k, v = (torch.randn(2, 4, kv_len, 8, dtype=dtype) for _ in range(2))
    q_pos, k_pos = torch.arange(q_len) + past, torch.arange(kv_len)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None].expand(2, 1, q_len, kv_len).clone()
    mask = None
    if case == "cached_padded":
        allowed[1, :, :, :4] = False  # row 1 left-padded by 4 tokens
        mask = allowed
    got, _ = attention.posenc_sdpa_attention(Layer(posenc), q, k, v, mask, posenc_past=past)
    expected = reference(posenc, q, k, v, q_pos, k_pos, allowed)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_t5_table_gradient_through_tiles(monkeypatch):
    """The learned table gets the gradient of explicit attention although each tile builds its own bias."""
    monkeypatch.setattr(attention, "BIAS_TILE_ROWS", 4)
    torch.manual_seed(1)
    posenc = T5Bias(2, num_buckets=6, max_distance=9)
    torch.nn.init.normal_(posenc.relative_attention_bias)
    q, k, v = (torch.randn(1, 2, 15, 8) for _ in range(3))
    positions = torch.arange(15)
    allowed = (positions[None, :] <= positions[:, None])[None, None]
    got, _ = attention.posenc_sdpa_attention(Layer(posenc), q, k, v, None)
    (grad,) = torch.autograd.grad(got.sum(), posenc.relative_attention_bias)
    (expected,) = torch.autograd.grad(reference(posenc, q, k, v, positions, positions, allowed).sum(),
                                      posenc.relative_attention_bias)
    torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-5)
