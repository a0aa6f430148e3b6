"""The fast CoPE path against a naive reference written here from the paper's equations.

Golovneva et al. 2024, https://arxiv.org/abs/2405.18719, section 3: gates ``sigmoid(q_i . k_j)``, positions
as the sum of gates from key j to query i, linear interpolation of ``q_i @ E`` between integer positions.
The reference loops over positions with explicit one-hot weights instead of a gather, so it shares no
code or trick with the implementation (no reversed keys, no run boundaries, no custom backward).
"""

import pytest
import torch

from hf_posenc.encodings.cope import CoPE, cope_attention


def naive_cope(query, key, value, allowed, pos_emb, scaling):
    """The paper's formulation with full ``[B, H, q, kv]`` tensors, differentiated by autograd."""
    q, k, v, e = query.double(), key.double(), value.double(), pos_emb.double()
    npos = e.shape[-1]
    logits = q @ k.transpose(-1, -2) * scaling
    gates = torch.sigmoid(logits)
    if allowed is not None:
        gates = gates * allowed
    # p_ij = sum_{m >= j} g_im: explicit suffix sums via an upper-triangular matrix of ones.
    kv = k.shape[-2]
    suffix = torch.tril(torch.ones(kv, kv, dtype=torch.float64))  # suffix[m, j] = 1 if m >= j
    positions = (gates @ suffix).clamp(max=npos - 1)
    z = q @ e  # [B, H, q, npos]
    # Hat-function weights: position n gets max(0, 1 - |p - n|) (linear interpolation).
    grid = torch.arange(npos, dtype=torch.float64)
    hat = (1 - (positions[..., None] - grid).abs()).clamp(min=0)  # [B, H, q, kv, npos]
    term = (hat * z[..., None, :]).sum(-1)
    logits = logits + term
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1)
    return probs @ v, probs


def causal(q_len, kv_len):
    return (torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len))[None, None]


def make_inputs(batch=2, heads=3, q_len=37, kv_len=37, dim=8, npos=6, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, heads, n, dim, generator=g) * s for n, s in
               ((q_len, spread), (kv_len, spread), (kv_len, 1.0))]
    pos_emb = torch.randn(dim, npos, generator=g)
    return [t.requires_grad_() for t in (*tensors, pos_emb)]


def assert_close_to_scale(got, expected, name, tol=1e-5):
    """Max error <= tol x the tensor's scale (max |expected|, at least 1): fp32 sums of many terms
    (dE adds every row of every head) carry rounding proportional to the magnitude, not per element."""
    error = (got.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= tol * scale, f"{name}: max error {error:.3g} > {tol} x scale {scale:.3g}"


def check(q, k, v, e, allowed, block_size, diagonal, mask_for_reference=None, tol=1e-5):
    scaling = q.shape[-1] ** -0.5
    reference_mask = allowed if mask_for_reference is None else mask_for_reference
    expected, expected_w = naive_cope(q, k, v, reference_mask, e, scaling)
    got, got_w = cope_attention(q, k, v, allowed, e, scaling, block_size, return_weights=True, diagonal=diagonal)
    assert_close_to_scale(got, expected, "output", tol)
    assert_close_to_scale(got_w, expected_w, "weights", tol)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
    mine = torch.autograd.grad((got * upstream).sum(), (q, k, v, e))
    ref = torch.autograd.grad((expected * upstream.double()).sum(), (q, k, v, e))
    for name, a, b in zip("qkvE", mine, ref):
        assert_close_to_scale(a, b, f"grad {name}", tol)


@pytest.mark.parametrize("block_size", [5, 16, 64])
@pytest.mark.parametrize("use_diagonal", [False, True])
def test_causal_prefill_matches_naive(block_size, use_diagonal):
    q, k, v, e = make_inputs()
    allowed = causal(37, 37)
    if use_diagonal:
        check(q, k, v, e, None, block_size, diagonal=0, mask_for_reference=allowed)
    else:
        check(q, k, v, e, allowed, block_size, diagonal=None)


def test_cached_queries_and_padding_match_naive():
    """Queries after a cache (kv > q), left padding (keys masked for one row) and long positions."""
    q, k, v, e = make_inputs(q_len=9, kv_len=40, npos=5)
    allowed = causal(9, 40).expand(2, 1, 9, 40).clone()
    allowed[1, :, :, :6] = False  # row 1 is left-padded by 6 tokens
    check(q, k, v, e, allowed, block_size=4, diagonal=31)


def test_positions_beyond_npos_are_clamped_and_small_gates_stay_exact():
    """Large spread: gates near 0/1 so positions hit the clamp and runs have length 0 or many keys."""
    q, k, v, e = make_inputs(q_len=50, kv_len=50, npos=4, spread=6.0, seed=3)
    check(q, k, v, e, causal(50, 50), block_size=13, diagonal=0)


def test_static_cache_slots_are_masked():
    """A StaticCache buffer: keys past the live length are empty (zeros) and masked; diagonal = past."""
    q, k, v, e = make_inputs(batch=1, q_len=3, kv_len=20)
    live = 12
    allowed = (torch.arange(20)[None, :] <= torch.arange(3)[:, None] + (live - 3))[None, None]
    check(q, k, v, e, allowed, block_size=2, diagonal=live - 3)


def test_bf16_inputs_keep_fp32_positions():
    """bf16 q/k/v: gates and positions are fp32 inside, so the result is the fp32 result rounded once."""
    q, k, v, e = make_inputs(batch=1, q_len=64, kv_len=64, npos=16)
    scaling = 8 ** -0.5
    with torch.no_grad():
        full, _ = cope_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), None, e,
                                 scaling, 16, diagonal=0)
        half, _ = cope_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, e, scaling, 16, diagonal=0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=1e-2, atol=1e-2)


def test_module_is_plain_attention_when_fresh():
    """E starts at zero: CoPE then equals ordinary causal softmax attention."""
    q, k, v, _ = make_inputs(batch=1, q_len=10, kv_len=10)
    module = CoPE(head_dim=8, npos_max=6, block_size=4)
    with torch.no_grad():
        got, _ = module.attend(q, k, v, None, 8 ** -0.5, diagonal=0)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_backward_keeps_no_quadratic_tensor():
    """Flash-style memory: what autograd keeps for backward is O(q + kv), never O(q * kv)."""
    q, k, v, e = make_inputs(batch=1, heads=2, q_len=96, kv_len=96)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = cope_attention(q, k, v, None, e, 8 ** -0.5, 32, diagonal=0)
    assert saved and max(saved) < 96 * 96
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v, e))


def test_torch_compile_gives_the_same_values_and_gradients():
    q, k, v, e = make_inputs(batch=1, heads=2, q_len=40, kv_len=40)

    def run(q, k, v, e):
        return cope_attention(q, k, v, None, e, 8 ** -0.5, 16, diagonal=0)[0]

    expected = run(q, k, v, e)
    grads = torch.autograd.grad(expected.sum(), (q, k, v, e))
    got = torch.compile(run, backend="aot_eager")(q, k, v, e)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v, e)), grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("use_output", [True, False])
def test_returned_weights_carry_the_naive_gradient(use_output):
    """Attribution methods differentiate the attention weights: a loss on the weights (and the output, or
    the weights alone) gives the naive reference's gradients for q, k, v and E."""
    q, k, v, e = make_inputs(q_len=21, kv_len=21, npos=5)
    allowed = causal(21, 21)
    scaling = q.shape[-1] ** -0.5
    got, got_w = cope_attention(q, k, v, None, e, scaling, 8, return_weights=True, diagonal=0)
    expected, expected_w = naive_cope(q, k, v, allowed, e, scaling)
    generator = torch.Generator().manual_seed(9)
    upstream_w = torch.randn(got_w.shape, generator=generator)
    upstream = torch.randn(got.shape, generator=generator) if use_output else torch.zeros(got.shape)
    inputs = (q, k, v, e)
    # Without the output in the loss, backward gets no output gradient at all (None), only the weights'.
    loss = (got_w * upstream_w).sum() + ((got * upstream).sum() if use_output else 0)
    mine = torch.autograd.grad(loss, inputs, allow_unused=True)
    ref = torch.autograd.grad((expected_w * upstream_w.double()).sum() + (expected * upstream.double()).sum(),
                              inputs)
    for name, a, b in zip("qkvE", mine, ref):
        if name == "v" and not use_output:  # the weights do not depend on v
            assert a is None or not a.any()
            continue
        assert_close_to_scale(a, b, f"grad {name}")


def test_model_attention_weights_are_differentiable():
    """Eager backend, output_attentions: the weights of a converted model backpropagate to its projections."""
    from tiny_models import input_ids, randomize_position_tables, tiny_model

    import hf_posenc

    model = hf_posenc.convert(tiny_model("llama"), hf_posenc.PosEncConfig(kind="cope"))
    randomize_position_tables(model)
    attentions = model(input_ids(1, 9), output_attentions=True).attentions
    assert attentions[-1].requires_grad
    attentions[-1][..., 0].sum().backward()  # attribution to the first token
    layer = model.model.layers[-1].self_attn
    assert layer.q_proj.weight.grad.abs().sum() > 0 and layer.posenc.pos_emb.grad.abs().sum() > 0


@pytest.mark.parametrize("spread,clamps", [(2.0, True), (-2.0, False)])
@pytest.mark.parametrize("padded", [False, True])
def test_gates_stop_where_every_row_is_clamped(monkeypatch, spread, clamps, padded):
    """Gates and running positions are computed only up to the key where every row of a tile has reached
    ``npos_max - 1`` (chunks of 256 keys here): past it every key takes the top score, so tiles of 600 keys whose
    gates clamp within their first chunk compute one chunk of gates per row, and values and gradients still equal
    the paper's equations in fp64 (within 1e-4 of scale: 600-key rows; the path before this one is 4.5e-5 off too).
    Gates near 0 (positions never clamp) run every chunk; left pads count 0."""
    q, k, v, e = make_inputs(batch=2, heads=2, q_len=560, kv_len=600, dim=8, npos=8, spread=abs(spread), seed=3)
    if spread < 0:  # every logit strongly negative: gates near 0, positions stay below the clamp
        with torch.no_grad():
            q.copy_(q.abs() + 1.0)
            k.copy_(-(k.abs() + 1.0))
    allowed = causal(560, 600).expand(2, 1, 560, 600).clone()
    if padded:
        allowed[1, :, :, :40] = False  # the second row's first 40 keys are left pads (its queries come after them)
    check(q, k, v, e, allowed if padded else None, 64, diagonal=40, mask_for_reference=allowed, tol=1e-4)
    widths = []
    sigmoid = torch.sigmoid
    monkeypatch.setattr(torch, "sigmoid", lambda x: widths.append(x.shape[-1]) or sigmoid(x))
    with torch.no_grad():
        cope_attention(q, k, v, allowed if padded else None, e, q.shape[-1] ** -0.5, 64, diagonal=40)
    seen = sum(min(600, min(start + 64, 560) + 40) for start in range(0, 560, 64))  # keys the 9 tiles may see
    if clamps:  # one chunk (<= 256 keys) per tile
        assert len(widths) == 9 and max(widths) <= 256 and sum(widths) < seen, widths
    else:  # every key, in chunks
        assert len(widths) > 9 and sum(widths) == seen, widths
