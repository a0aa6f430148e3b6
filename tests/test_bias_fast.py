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
from hf_posenc.kernels import cpu_fused, tiling


class Layer(torch.nn.Module):
    is_causal = True

    def __init__(self, posenc):
        super().__init__()
        self.posenc = posenc


def attention_case(case: str, past: int, q_len: int, spare: int, padded=("left_padded", "static_cache")):
    """q ``[2, 4, q, 8]``, k/v (2 heads for ``"gqa"``) requiring grad, positions, the causal ``allowed``
    ``[2, 1, q, kv]`` (row 1 left-padded by 3 keys in the ``padded`` cases) and the mask the call gets
    (``allowed`` in the ``padded`` cases, else None). A StaticCache hands over its whole buffer: ``spare``
    slots past the live ones, empty."""
    kv_heads = 2 if case == "gqa" else 4
    kv_len = past + q_len + spare
    q = torch.randn(2, 4, q_len, 8, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, kv_len, 8, requires_grad=True) for _ in range(2))
    q_pos, k_pos = torch.arange(q_len) + past, torch.arange(kv_len)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None].expand(2, 1, q_len, kv_len).clone()
    mask = None
    if case in padded:
        allowed[1, :, :, :3] = False
        mask = allowed
    return q, k, v, q_pos, k_pos, allowed, mask


def reference(posenc, q, k, v, q_pos, k_pos, allowed):
    distance = q_pos[:, None] - k_pos[None, :]  # [q, kv]
    if isinstance(posenc, AlibiBias):
        bias = -posenc.slopes("cpu")[:, None, None].double() * distance
    else:
        buckets = relative_position_bucket(-distance, False, posenc.num_buckets, posenc.max_distance)
        bias = posenc.relative_attention_bias.double()[buckets].permute(2, 0, 1)
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    # The most negative double rather than -inf: a row with no visible key (left padding) stays finite.
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float64).min)
    return (torch.softmax(scores, -1) @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["alibi", "t5_bias"])
@pytest.mark.parametrize("case", ["prefill", "cached_padded"])
def test_sdpa_bias_paths_match_explicit_attention(monkeypatch, kind, case, dtype):
    monkeypatch.setattr(tiling, "TILE_ROWS", 5)  # several tiles, one partial
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
    monkeypatch.setattr(tiling, "TILE_ROWS", 4)
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


@pytest.mark.parametrize(
    "case",
    ["prefill", "cached", "decode", "left_padded", "static_cache", "gqa", "band_wider_than_cache"],
)
def test_t5_gradients_from_the_band_match_explicit_attention(monkeypatch, case):
    """TiledBiasAttention (fused kernel, detached mask, table gradient from the band of diagonals) gives
    the gradients of explicit attention for q, k, v and the table; tiles and band blocks are small here
    so that several of each, partial ones included, are exercised."""
    monkeypatch.setattr(tiling, "TILE_ROWS", 8)
    monkeypatch.setattr(cpu_fused, "BAND_ROWS", 4)
    torch.manual_seed(2)
    num_buckets, max_distance = (8, 12) if case != "band_wider_than_cache" else (32, 4096)
    posenc = T5Bias(4, num_buckets=num_buckets, max_distance=max_distance)
    torch.nn.init.normal_(posenc.relative_attention_bias)
    past, q_len, spare = {"cached": (13, 7, 0), "decode": (30, 1, 0), "static_cache": (9, 5, 6)}.get(case, (0, 29, 0))
    q, k, v, q_pos, k_pos, allowed, mask = attention_case(case, past, q_len, spare)
    kv_heads = k.shape[1]
    layer = Layer(posenc).train()
    got, _ = attention.posenc_sdpa_attention(layer, q, k, v, mask, posenc_past=past)
    groups = 4 // kv_heads
    expected = reference(posenc, q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), q_pos, k_pos,
                         allowed)
    # Rows with no visible key (left padding) are garbage in every kernel; a loss never reads them.
    visible = allowed.any(-1).squeeze(1)  # [B, q]
    torch.testing.assert_close(got.double()[visible], expected[visible], rtol=1e-5, atol=1e-5)
    upstream = torch.randn(got.shape, dtype=torch.float64)
    upstream[~visible] = 0
    inputs = (q, k, v, posenc.relative_attention_bias)
    got_grads = torch.autograd.grad(got.double(), inputs, upstream)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    for name, a, b in zip(("q", "k", "v", "table"), got_grads, expected_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_t5_band_covers_every_distance_below_the_last_bucket():
    for num_buckets, max_distance in [(32, 128), (8, 12), (6, 9), (32, 4096), (2, 2)]:
        posenc = T5Bias(2, num_buckets=num_buckets, max_distance=max_distance)
        band = posenc.band_width()
        buckets = relative_position_bucket(-torch.arange(3 * max_distance + 2), False, num_buckets, max_distance)
        assert (buckets[band:] == num_buckets - 1).all() and buckets[band - 1] < num_buckets - 1


def test_diagonal_sums_is_the_adjoint_of_toeplitz():
    """<toeplitz(d), A> = <d, diagonal_sums(A)>: diagonal_sums is the gradient of the Toeplitz expansion."""
    torch.manual_seed(3)
    d, block = torch.randn(3, 5 + 7 - 1, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close((tiling.toeplitz(d, 5, 7) * block).sum(), (d * tiling.diagonal_sums(block)).sum())


@pytest.mark.parametrize("user_flush", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alibi_flushes_denormals_only_inside_its_kernels(monkeypatch, user_flush, dtype):
    """ALiBi's kernels run with denormals flushed (fast on x86) and give explicit attention's gradients;
    the caller's flush setting is the same afterwards, on or off. fp32 takes the head-dimension fold,
    bf16 the tiles."""
    monkeypatch.setattr(tiling, "TILE_ROWS", 8)
    if not torch.set_flush_denormal(user_flush) and user_flush:
        pytest.skip("this CPU cannot flush denormals")
    try:
        torch.manual_seed(4)
        posenc = AlibiBias(4)
        q = torch.randn(1, 4, 40, 8, requires_grad=True)
        k, v = (torch.randn(1, 4, 40, 8, requires_grad=True) for _ in range(2))
        positions = torch.arange(40)
        allowed = (positions[None, :] <= positions[:, None])[None, None]
        got, _ = attention.posenc_sdpa_attention(Layer(posenc).train(), *(x.to(dtype) for x in (q, k, v)), None)
        expected = reference(posenc, q, k, v, positions, positions, allowed)
        upstream = torch.randn(expected.shape, dtype=torch.float64)
        got_grads = torch.autograd.grad(got.double(), (q, k, v), upstream)
        expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)
        for a, b in zip(got_grads, expected_grads):
            torch.testing.assert_close(a.double(), b.double(), rtol=tolerance, atol=tolerance)
        assert cpu_fused._flush_enabled() == user_flush
    finally:
        torch.set_flush_denormal(False)
