"""CoPE on a soft-capping model (Gemma 2's ``attn_logit_softcapping``), against an fp64 reference written here.

The reference follows the paper's equations (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719, §3) with
full ``[B, H, q, kv]`` tensors and Gemma 2's cap ``tanh(x / c) * c`` on the whole logit before the mask; the gates
keep the raw ``q . k * scale`` (``hf_posenc.encodings.cope``'s docstring gives the reasons).
"""

import pytest
import torch
from tiny_models import input_ids, randomize_position_tables, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig
from hf_posenc.encodings.cope import cope_attention

CAP = 2.0


def capped_cope_fp64(query, key, value, pos_emb, scaling, cap, capped_gates=False):
    """CoPE with soft-capped logits, fp64, causal (queries aligned to the last keys), differentiated by autograd.

    ``capped_gates``: gate on the capped content logits instead (the variant not chosen; the test shows it
    differs, so the reference can tell the two apart).
    """
    q, k, v, e = (t.double() for t in (query, key, value, pos_emb))
    q_len, kv_len, npos = q.shape[-2], k.shape[-2], e.shape[-1]
    visible = torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)  # [q, kv]
    content = q @ k.transpose(-1, -2) * scaling  # [B, H, q, kv]
    gate_logits = torch.tanh(content / cap) * cap if capped_gates else content
    gates = torch.sigmoid(gate_logits) * visible
    # Position of key j for query i: the gates of keys j..i, summed (a loop over keys, no cumsum trick).
    positions = torch.stack([gates[..., j:].sum(-1) for j in range(kv_len)], dim=-1).clamp(max=npos - 1)
    scores = q @ e  # [B, H, q, npos]: one score per integer position
    low = positions.floor().long().clamp(max=npos - 1)
    high = (low + 1).clamp(max=npos - 1)
    frac = positions - low
    term = scores.gather(-1, low) * (1 - frac) + scores.gather(-1, high) * frac
    logits = torch.tanh((content + term) / cap) * cap
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, -1) @ v


def _inputs(q_len=23, kv_len=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, q_len, 8, generator=g) * 2
    k = torch.randn(2, 3, kv_len, 8, generator=g) * 2
    v = torch.randn(2, 3, kv_len, 8, generator=g)
    e = torch.randn(8, 6, generator=g)
    return [t.requires_grad_() for t in (q, k, v, e)]


@pytest.mark.parametrize("block_size,q_len", [(64, 23), (5, 23), (4, 7)])
def test_capped_cope_matches_the_fp64_reference_forward_and_gradients(block_size, q_len):
    q, k, v, e = _inputs(q_len=q_len)
    scaling = 8 ** -0.5
    got, _ = cope_attention(q, k, v, None, e, scaling, block_size, diagonal=k.shape[-2] - q_len, softcap=CAP)
    expected = capped_cope_fp64(q, k, v, e, scaling, CAP)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad(got, (q, k, v, e), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v, e), grad.double())
    for name, g, x in zip("qkvE", got_grads, expected_grads):
        torch.testing.assert_close(g.double(), x.double(), rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # The cap matters here, and a reference gating on capped logits would be told apart.
    uncapped, _ = cope_attention(q, k, v, None, e, scaling, block_size, diagonal=k.shape[-2] - q_len)
    assert (uncapped.double() - expected).abs().max() > 1e-2
    assert (capped_cope_fp64(q, k, v, e, scaling, CAP, capped_gates=True) - expected).abs().max() > 1e-3


def test_capped_cope_weights_match_with_a_mask():
    """The eager path's weights (and the bool-mask path of padding/StaticCache) under the cap."""
    q, k, v, e = _inputs()
    visible = torch.ones(23, 23, dtype=torch.bool).tril()[None, None]
    out, weights = cope_attention(q, k, v, visible, e, 8 ** -0.5, 64, return_weights=True, softcap=CAP)
    expected = capped_cope_fp64(q, k, v, e, 8 ** -0.5, CAP)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((weights @ v).double(), expected, rtol=1e-5, atol=1e-5)


def _nope_reference(model):
    with torch.no_grad():
        for name, buffer in model.base_model.rotary_emb.named_buffers():
            if name.endswith("inv_freq"):
                buffer.zero_()
    return model


def test_cope_on_gemma2_starts_as_stock_soft_capped_nope():
    """Converted with the cap on (it was refused): a fresh CoPE layer (E = 0) is stock Gemma 2 eager without RoPE,
    cap included; trained tables move it, and the cap acts on them (removing it changes the outputs)."""
    x = input_ids()
    model = hf_posenc.convert(tiny_model("gemma2"), PosEncConfig(kind="cope", npos_max=8))
    assert model.config.attn_logit_softcapping == CAP
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, _nope_reference(tiny_model("gemma2"))(x).logits, rtol=0,
                                   atol=1e-5)
        randomize_position_tables(model)
        capped = model(x).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (model(x).logits - capped).abs().max() > 1e-3
