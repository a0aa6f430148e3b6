"""FIRE (Li et al. 2024, https://arxiv.org/abs/2310.04418) against the paper's equation, in fp64.

The reference writes ``b(i, j) = f(log(c (i - j) + 1) / log(c max(L, i) + 1))`` with ``f`` a one-hidden-layer
ReLU MLP, from the positions of each batch row (a left-padded row's first real token is its position 0), then
explicit softmax attention; the module goes through the attention functions (dense bias per call).
"""

import pytest
import torch
from test_bias_fast import Layer, attention_case
from test_kerple import reference

from hf_posenc import attention
from hf_posenc.encodings.fire import FireBias

PARAMS = ("hidden_weight", "hidden_bias", "output_weight", "c", "threshold")


def trained_module(heads: int = 4, seed: int = 0, threshold: float = 9.5) -> FireBias:
    """A module with a random MLP, ``c`` in (0.2, 1.2) and the threshold given (inside the tests' lengths, off
    the integers: ``max(L, i)`` has no tie to break)."""
    generator = torch.Generator().manual_seed(seed)
    module = FireBias(heads, width=6, init_c=0.5, init_threshold=threshold)
    with torch.no_grad():
        for name in PARAMS[:3]:
            getattr(module, name).copy_(torch.randn(getattr(module, name).shape, generator=generator))
        module.c.fill_(0.2 + float(torch.rand((), generator=generator)))
    return module


def paper_bias(params: dict, q_pos, k_pos, pads: list[int], causal: bool) -> torch.Tensor:
    """``[B, H, q, kv]`` fp64 bias of the paper's equation; ``pads[b]``: left pads of row ``b``."""
    rows = []
    for pad in pads:
        i, j = (q_pos - pad).double()[:, None], (k_pos - pad).double()[None, :]  # real positions
        distance = (i - j).abs()
        if causal:
            normaliser = torch.clamp(i, min=params["threshold"])  # max(L, i)
        else:  # the farthest real key on either side of the query
            last = float(k_pos[-1] - pad)
            normaliser = torch.clamp(torch.maximum(i, last - i), min=params["threshold"])
        psi = lambda x: torch.log(params["c"] * x + 1)  # noqa: E731
        x = psi(distance) / psi(normaliser)  # [q, kv]
        hidden = torch.relu(x[..., None] * params["hidden_weight"] + params["hidden_bias"])  # [q, kv, W]
        rows.append((hidden @ params["output_weight"].t()).permute(2, 0, 1))
    return torch.stack(rows)


def compare(module, got, q, k, v, q_pos, k_pos, allowed, pads, causal=True):
    """Output and gradients (q, k, v and every FIRE parameter) against the fp64 reference."""
    params = {name: getattr(module, name).detach().double().requires_grad_(True) for name in PARAMS}
    expected = reference(q, k, v, paper_bias(params, q_pos, k_pos, pads, causal), allowed)
    visible = allowed.any(-1).squeeze(1) if allowed is not None else torch.ones(got.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(got.double()[visible], expected[visible], rtol=1e-5, atol=1e-5)
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    upstream[~visible] = 0
    ours = (q, k, v, *(getattr(module, name) for name in PARAMS))
    got_grads = torch.autograd.grad(got.double(), ours, upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v, *params.values()), upstream)
    for name, a, b in zip(("q", "k", "v", *PARAMS), got_grads, expected_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ["prefill", "cached", "decode", "left_padded", "static_cache", "gqa"])
def test_causal_attention_matches_the_paper(backend, case):
    torch.manual_seed(2)
    module = trained_module()
    past, q_len, spare = {"cached": (13, 7, 0), "decode": (30, 1, 0), "static_cache": (9, 5, 6)}.get(case, (0, 29, 0))
    q, k, v, q_pos, k_pos, allowed, mask = attention_case(case, past, q_len, spare, padded=("left_padded",))
    if case == "static_cache":  # empty slots are masked, never padding
        mask = allowed
    function = attention.posenc_eager_attention if backend == "eager" else attention.posenc_sdpa_attention
    got, _ = function(Layer(module).train(), q, k, v, mask, posenc_past=past)
    compare(module, got, q, k, v, q_pos, k_pos, allowed, [0, 3 if case == "left_padded" else 0])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_encoder_uses_the_symmetric_distance(backend):
    torch.manual_seed(4)
    module = trained_module(seed=2, threshold=4.5)
    layer = Layer(module).train()
    layer.is_causal = False
    q = torch.randn(2, 4, 13, 8, requires_grad=True)
    k, v = (torch.randn(2, 4, 13, 8, requires_grad=True) for _ in range(2))
    positions = torch.arange(13)
    function = attention.posenc_eager_attention if backend == "eager" else attention.posenc_sdpa_attention
    got, _ = function(layer, q, k, v, None)
    compare(module, got, q, k, v, positions, positions, None, [0, 0], causal=False)


def test_a_fresh_layer_is_a_no_op_and_learns():
    module = trained_module()
    module.reset_parameters()  # what conversion and checkpoint loading call for missing tables
    positions = torch.arange(9)
    bias = module.bias(positions, positions, True)
    assert torch.equal(bias, torch.zeros(1, 4, 9, 9))
    bias.square().sum().backward()  # zero: no gradient yet; a loss through attention gives one
    q, k, v = (torch.randn(1, 4, 9, 8) for _ in range(3))
    out, _ = attention.posenc_sdpa_attention(Layer(module), q, k, v, None)
    out.sum().backward()
    assert module.output_weight.grad.abs().sum() > 0


def test_tables_are_fp32_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        module = FireBias(4)
    finally:
        torch.set_default_dtype(previous)
    assert all(p.dtype == torch.float32 for p in module.parameters())
