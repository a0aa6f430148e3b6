"""FoX (Lin et al. 2025, https://arxiv.org/abs/2503.02130) against the paper's equation, in fp64.

The reference sums ``log f_l`` over ``l = j+1 .. i`` for every (query, key) pair with a plain loop, the gate
``f_l = sigmoid(w . k_l + b) ** a`` (the key-read gate of :mod:`hf_posenc.encodings.fox`), then explicit
softmax attention; the module goes through the attention functions (a dense per-call bias).
"""

import pytest
import torch
from test_bias_fast import Layer, attention_case
from test_kerple import reference
from tiny_models import input_ids, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig, attention
from hf_posenc.encodings.fox import ForgetGate

PARAMS = ("gate_weight", "gate_bias", "gate_scale")


def trained_module(heads: int = 4, head_dim: int = 8, seed: int = 0) -> ForgetGate:
    """A module without RoPE, random gate weights and biases, exponents in (0.5, 1.5)."""
    generator = torch.Generator().manual_seed(seed)
    module = ForgetGate(heads, head_dim)
    with torch.no_grad():
        module.gate_weight.copy_(torch.randn(heads, head_dim, generator=generator))
        module.gate_bias.copy_(torch.randn(heads, generator=generator) + 1)
        module.gate_scale.copy_(0.5 + torch.rand(heads, generator=generator))
    return module


def paper_bias(params: dict, key: torch.Tensor, q_pos, k_pos) -> torch.Tensor:
    """``[B, H, q, kv]`` fp64: ``sum_{l=j+1..i} log f_l`` for key index ``j`` and the query's key index ``i``."""
    heads = params["gate_weight"].shape[0]
    key = key.double().repeat_interleave(heads // key.shape[1], 1)  # [B, H, kv, D]
    gate = torch.sigmoid(torch.einsum("bhkd,hd->bhk", key, params["gate_weight"]) + params["gate_bias"][:, None])
    log_f = params["gate_scale"][:, None] * torch.log(gate)  # [B, H, kv]
    rows = []
    for position in q_pos.tolist():
        i = position - int(k_pos[0])
        row = [log_f[..., j + 1:i + 1].sum(-1) if j < i else torch.zeros_like(log_f[..., 0])
               for j in range(key.shape[2])]
        rows.append(torch.stack(row, -1))  # [B, H, kv]
    return torch.stack(rows, -2)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ["prefill", "cached", "decode", "left_padded", "static_cache", "gqa"])
def test_causal_attention_matches_the_paper(backend, case):
    torch.manual_seed(2)
    module = trained_module()
    past, q_len, spare = {"cached": (13, 7, 0), "decode": (30, 1, 0), "static_cache": (9, 5, 6)}.get(case, (0, 19, 0))
    q, k, v, q_pos, k_pos, allowed, mask = attention_case(case, past, q_len, spare)
    function = attention.posenc_eager_attention if backend == "eager" else attention.posenc_sdpa_attention
    got, _ = function(Layer(module).train(), q, k, v, mask, posenc_past=past)
    params = {name: getattr(module, name).detach().double().requires_grad_(True) for name in PARAMS}
    expected = reference(q, k, v, paper_bias(params, k, q_pos, k_pos), allowed)
    visible = allowed.any(-1).squeeze(1)
    torch.testing.assert_close(got.double()[visible], expected[visible], rtol=1e-5, atol=1e-5)
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    upstream[~visible] = 0
    got_grads = torch.autograd.grad(got.double(), (q, k, v, *(getattr(module, n) for n in PARAMS)), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v, *params.values()), upstream)
    for name, a, b in zip(("q", "k", "v", *PARAMS), got_grads, expected_grads):
        # Relative to the largest entry: the gates' gradients sum the rounding of fp32 logits that carry gate sums
        # of ~30 here (strongly forgetting random gates) over the causal triangle; the sdpa prefills' fused fold
        # (kernel key_term_fold_cpu) measured up to 1.9e-5 of it, the dense bias 4e-6.
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=3e-5 * float(b.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_a_converted_model_is_the_model_itself_bitwise(arch, backend):
    stock = tiny_model(arch, backend)
    x = input_ids(2, 11)
    with torch.no_grad():
        expected = stock(x).logits
        model = hf_posenc.convert(stock, PosEncConfig(kind="fox"), attn_implementation=backend)
        assert torch.equal(model(x).logits, expected)
        for layer in model.model.layers:  # forgetting on: a different model
            layer.self_attn.posenc.gate_scale.fill_(1.0)
        assert not torch.allclose(model(x).logits, expected, atol=1e-3)


def test_dropping_rope_starts_as_the_nope_model():
    x = input_ids(2, 11)
    with torch.no_grad():
        nope = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="nope"))(x).logits
        fox = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="fox", rope="drop"))(x).logits
    torch.testing.assert_close(fox, nope, rtol=1e-6, atol=1e-6)


def test_encoders_and_unknown_options_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="causal architectures with RoPE"):
        hf_posenc.convert(tiny_model("bert"), PosEncConfig(kind="fox"))
    with pytest.raises(ValueError, match="rope"):
        PosEncConfig(kind="fox", rope="half")


def test_a_fresh_layer_learns_its_exponent_first():
    module = trained_module()
    module.reset_parameters()
    layer = Layer(module)
    q, k, v = (torch.randn(1, 4, 9, 8) for _ in range(3))
    call_bias = module.decay(k, torch.arange(9))
    assert not call_bias.any()  # a = 0: log f = 0 exactly
    with torch.no_grad():
        identity, _ = attention.posenc_sdpa_attention(layer, q, k, v, None)  # a = 0: no bias at all
    out, _ = attention.posenc_sdpa_attention(layer, q, k, v, None)  # training from a = 0 exactly
    torch.testing.assert_close(out, identity, rtol=0, atol=1e-6)  # a zero bias: another kernel, same values
    out.square().sum().backward()
    assert module.gate_scale.grad.abs().sum() > 0  # the exponent learns first ...
    assert module.gate_weight.grad is None or not module.gate_weight.grad.any()  # ... w and b after it
