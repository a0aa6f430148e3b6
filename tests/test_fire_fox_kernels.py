"""FIRE's and FoX's bounded-memory kernels (issue 25) against the papers' equations in fp64 and the dense bias.

* FoX (Lin et al. 2025, https://arxiv.org/abs/2503.02130), kernel ``key_term_fold_cpu``: ``F_i - F_j`` folded
  into an extra head dimension as the per-key term ``-F_j``, re-centred on each tile's last visible key.
* FIRE (Li et al. 2024, https://arxiv.org/abs/2310.04418), kernel ``row_tiles``: the bias and attention of one
  tile of query rows at a time, recomputed in backward.

The references are the fp64 equations of ``tests/test_fox.py`` and ``tests/test_fire.py`` (written from the
papers, with no fold and no tiles) and the dense kernel (``sdpa`` with the whole ``[B, H, q, kv]`` bias). The
lengths span several tiles (128 query rows a tile). Every comparison checks the output and the gradients of
q, k, v and each of the encoding's parameters.
"""

import pytest
import test_fire
import test_fox
import torch
from test_bias_fast import Layer, attention_case
from test_kerple import reference
from tiny_models import input_ids, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig, attention, kernels
from hf_posenc.kernels import cpu_fused

#: q (no past), past and q, spare StaticCache slots: every case spans several 128-row tiles.
SHAPES = {"prefill": (0, 300, 0), "left_padded": (0, 300, 0), "gqa": (0, 300, 0), "cached": (40, 261, 0),
          "static_cache": (20, 270, 9)}


def run(module, case, monkeypatch, kernel: str | None):
    """The module's attention on ``case``, with the kernel the selector picks (None, which must be the
    encoding's bounded-memory kernel) or ``kernel`` forced. Returns the inputs and output, and the kernel that ran."""
    torch.manual_seed(2)
    past, q_len, spare = SHAPES[case]
    q, k, v, q_pos, k_pos, allowed, mask = attention_case(case, past, q_len, spare,
                                                          padded=("left_padded", "static_cache"))
    ran = []
    if kernel is not None:
        monkeypatch.setattr(kernels, "select", lambda capabilities, call: kernel)
    monkeypatch.setattr(kernels, "KERNELS", {name: (lambda call, name=name, f=f: ran.append(name) or f(call))
                                             for name, f in kernels.KERNELS.items()})
    got, _ = attention.posenc_sdpa_attention(Layer(module).train(), q, k, v, mask, posenc_past=past)
    monkeypatch.undo()
    return (q, k, v, q_pos, k_pos, allowed), got, ran


def grads(got, inputs, module, params, allowed):
    """The output's gradients in q, k, v and every parameter of ``params``, from a fixed upstream gradient that is
    zero on rows without a visible key."""
    q, k, v = inputs[:3]
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    upstream[~allowed.any(-1).squeeze(1)] = 0
    return torch.autograd.grad(got.double(), (q, k, v, *(getattr(module, n) for n in params)), upstream)


def assert_matches(got, expected, got_grads, expected_grads, names, allowed, tol):
    visible = allowed.any(-1).squeeze(1)
    torch.testing.assert_close(got.double()[visible], expected.double()[visible], rtol=tol[0], atol=tol[0])
    for name, a, b in zip(("q", "k", "v", *names), got_grads, expected_grads):
        # Relative to the gradient's largest entry: the parameters' gradients are sums over every (query, key)
        # pair that cancel down to a few entries' size.
        scale = float(b.abs().max())
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=tol[1] * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


#: (output atol, gradient atol over the gradient's largest entry). fp32 logits carry FoX's gate sums (the fold's
#: within a tile, the dense bias's ``F_i - F_j``), whose rounding the gates' gradients sum over the causal
#: triangle: measured against fp64 (worst case and tensor) 2.5e-6 on outputs and 1.9e-5 of the scale on
#: gradients for the fold, 1.7e-6 and 9.3e-6 for the dense fp32 bias; the two differ by up to their sum.
FOX_TOL = (1e-5, 5e-5)
#: FIRE's fp32 MLP bias is the same on both paths (the tiles sum the parameters' gradients in another order):
#: measured 6.6e-7 on outputs, 5.9e-6 (tiles) and 8.0e-6 (dense) of the scale on gradients.
FIRE_TOL = (1e-5, 3e-5)


def fox_module():
    """``tests/test_fox.py``'s module with gates nearer 1 (``log f`` about -0.1, as a trained FoX's): its own
    gates forget almost everything within a few tokens, which over 300 keys leaves nothing to compare."""
    module = test_fox.trained_module()
    with torch.no_grad():
        module.gate_weight.mul_(0.3)
        module.gate_bias.add_(2.0)
    return module


def check_kernel(module, case, monkeypatch, kernel, names, paper_bias, tol):
    """``module``'s attention on ``case`` takes ``kernel`` and matches the fp64 equation (``paper_bias(params,
    inputs)`` of the fp64 parameters) and the dense kernel, output and gradients."""
    inputs, got, ran = run(module, case, monkeypatch, None)
    assert ran == [kernel]
    q, k, v, q_pos, k_pos, allowed = inputs
    got_grads = grads(got, inputs, module, names, allowed)
    params = {name: getattr(module, name).detach().double().requires_grad_(True) for name in names}
    expected = reference(q, k, v, paper_bias(params, inputs), allowed)
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    upstream[~allowed.any(-1).squeeze(1)] = 0
    expected_grads = torch.autograd.grad(expected, (q, k, v, *params.values()), upstream)
    assert_matches(got, expected, got_grads, expected_grads, names, allowed, tol)
    dense_inputs, dense, ran = run(module, case, monkeypatch, "sdpa")
    assert ran == ["sdpa"]
    dense_grads = grads(dense, dense_inputs, module, names, allowed)
    assert_matches(got, dense, got_grads, dense_grads, names, allowed, tol)


@pytest.mark.parametrize("case", ["prefill", "left_padded", "gqa", "cached", "static_cache"])
def test_fox_fold_matches_the_paper_and_the_dense_bias(case, monkeypatch):
    check_kernel(fox_module(), case, monkeypatch, "key_term_fold_cpu", test_fox.PARAMS,
                 lambda params, inputs: test_fox.paper_bias(params, inputs[1], *inputs[3:5]), FOX_TOL)


@pytest.mark.parametrize("case", ["prefill", "left_padded", "gqa", "cached", "static_cache"])
def test_fire_row_tiles_match_the_paper_and_the_dense_bias(case, monkeypatch):
    module = test_fire.trained_module(threshold=150.5)  # both regimes of max(L, i) within the 300 tokens
    pads = [0, 3 if case in ("left_padded", "static_cache") else 0]  # row 1's left pads (its position 0 after)
    check_kernel(module, case, monkeypatch, "row_tiles", test_fire.PARAMS,
                 lambda params, inputs: test_fire.paper_bias(params, *inputs[3:5], pads, True), FIRE_TOL)


def test_fold_tiles_measure_keys_from_their_own_last_key(monkeypatch):
    """FoX's terms re-centred per tile equal one tile over every key (the fold's row constant cancels), and the
    gradient of the terms is the same, whatever the tile size."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 8) for _ in range(3))
    terms = torch.randn(2, 4, 70).cumsum(-1).requires_grad_(True)
    outs = []
    for rows in (70, 16):
        monkeypatch.setattr(cpu_fused, "FOLD_TILE_ROWS", rows)
        out = cpu_fused.TiledFoldAttention.apply(q, k, v, None, None, 0, 8 ** -0.5, terms)
        outs.append((out, torch.autograd.grad(out, terms, torch.ones_like(out))[0]))
    scores = q @ k.transpose(-1, -2) * 8 ** -0.5 + terms.detach()[:, :, None, :]
    scores = scores.masked_fill(~torch.ones(70, 70, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(outs[0][0], torch.softmax(scores, -1) @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fox", "fire"])
def test_cache_and_chunks_equal_one_forward(kind):
    """A converted tiny Llama: a 300-token prompt at once equals 140 tokens, a 150-token chunk on the cache
    (the bounded-memory kernels with a cache offset) and 10 decode steps (the dense bias row)."""
    model = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(kind=kind, **({"init_threshold": 100.5}
                                                                                        if kind == "fire" else {})))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".posenc." in name:
                param.copy_(torch.randn(param.shape, generator=generator).abs() * 0.5
                            + (100.5 if name.endswith("threshold") else 0))
    x = input_ids(2, 300)
    with torch.no_grad():
        whole = model(x).logits
        out = model(x[:, :140], use_cache=True)
        parts, cache = [out.logits], out.past_key_values
        out = model(x[:, 140:290], past_key_values=cache, use_cache=True)
        parts.append(out.logits)
        for t in range(290, 300):
            out = model(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-4, atol=1e-4)
