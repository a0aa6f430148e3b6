"""KERPLE (Chi et al. 2022, https://arxiv.org/abs/2205.09921) against the paper's equations, in fp64.

The reference builds the full ``[H, q, kv]`` bias from the positions and the paper's kernels (§4):
``-r1 log(1 + r2 |i - j|)`` and ``-r1 |i - j| ** r2``, then explicit softmax attention; the module gives its
bias once per diagonal, which the causal path runs tile by tile on the fused CPU kernel (its parameters'
gradients from :func:`hf_posenc.kernels.cpu_fused.tiles_backward`) and the eager and encoder paths as a
dense bias.
"""

import pytest
import torch
from test_bias_fast import Layer, attention_case

from hf_posenc import PosEncConfig, attention
from hf_posenc.encodings.kerple import KerpleBias
from hf_posenc.kernels import cpu_fused, tiling

KERNELS = ("log", "power")


def paper_bias(r1: torch.Tensor, r2: torch.Tensor, kernel: str, q_pos, k_pos) -> torch.Tensor:
    """``[H, q, kv]`` fp64 bias of the paper's kernel, ``r1``/``r2`` ``[H]`` inside their ranges."""
    distance = (q_pos[:, None] - k_pos[None, :]).abs().double()  # [q, kv]
    r1, r2 = r1[:, None, None], r2[:, None, None]
    if kernel == "log":
        return -r1 * torch.log(1 + r2 * distance)
    return -r1 * distance ** r2


def reference(q, k, v, bias, allowed):
    """Explicit fp64 softmax attention with an additive bias, ``[B, q, H, D]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = q.double() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    if allowed is not None:
        # The most negative double rather than -inf: a row with no visible key (left padding) stays finite.
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float64).min)
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


def trained_module(kernel: str, heads: int = 4, seed: int = 0) -> KerpleBias:
    """A module with per-head values inside the paper's ranges (r1 in (0.2, 1.2), r2 in (0.3, 1.8))."""
    generator = torch.Generator().manual_seed(seed)
    module = KerpleBias(heads, kernel)
    with torch.no_grad():
        module.r1.copy_(0.2 + torch.rand(heads, generator=generator))
        module.r2.copy_(0.3 + 1.5 * torch.rand(heads, generator=generator))
    return module


def compare(module, got, q, k, v, q_pos, k_pos, allowed):
    """Output and gradients (q, k, v, r1, r2) of ``got`` against the fp64 reference of ``module``'s kernel."""
    r1, r2 = (p.detach().double().requires_grad_(True) for p in (module.r1, module.r2))
    expected = reference(q, k, v, paper_bias(r1, r2, module.kernel, q_pos, k_pos), allowed)
    # Rows with no visible key (left padding) are garbage in every kernel; a loss never reads them.
    visible = allowed.any(-1).squeeze(1) if allowed is not None else torch.ones(got.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(got.double()[visible], expected[visible], rtol=1e-5, atol=1e-5)
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    upstream[~visible] = 0
    got_grads = torch.autograd.grad(got.double(), (q, k, v, module.r1, module.r2), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v, r1, r2), upstream)
    for name, a, b in zip(("q", "k", "v", "r1", "r2"), got_grads, expected_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def tiled_calls(monkeypatch):
    """Small tiles and band blocks (several of each, partial ones included), and a count of the calls that
    reach the fused tiled kernel."""
    monkeypatch.setattr(tiling, "TILE_ROWS", 8)
    monkeypatch.setattr(cpu_fused, "BAND_ROWS", 4)
    calls = []
    apply = cpu_fused.TiledBiasAttention.apply
    monkeypatch.setattr(cpu_fused.TiledBiasAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["prefill", "cached", "decode", "left_padded", "static_cache", "gqa"])
def test_causal_tiles_match_the_paper(tiled_calls, kernel, case):
    torch.manual_seed(2)
    module = trained_module(kernel)
    past, q_len, spare = {"cached": (13, 7, 0), "decode": (30, 1, 0), "static_cache": (9, 5, 6)}.get(case, (0, 29, 0))
    q, k, v, q_pos, k_pos, allowed, mask = attention_case(case, past, q_len, spare)
    got, _ = attention.posenc_sdpa_attention(Layer(module).train(), q, k, v, mask, posenc_past=past)
    # Decode steps take SDPA with one bias row (the tiles reverse the whole cache for nothing there).
    assert len(tiled_calls) == (0 if case == "decode" else 1)
    compare(module, got, q, k, v, q_pos, k_pos, allowed)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["prefill", "left_padded"])
def test_dense_eager_matches_the_paper(kernel, case):
    torch.manual_seed(3)
    module = trained_module(kernel, seed=1)
    q, k, v, q_pos, k_pos, allowed, mask = attention_case(case, 0, 17, 0)
    got, weights = attention.posenc_eager_attention(Layer(module).train(), q, k, v, mask)
    assert weights is not None  # explicit scores: the dense bias
    compare(module, got, q, k, v, q_pos, k_pos, allowed)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_encoder_uses_the_symmetric_distance(backend, kernel):
    torch.manual_seed(4)
    module = trained_module(kernel, seed=2)
    layer = Layer(module).train()
    layer.is_causal = False
    q = torch.randn(2, 4, 13, 8, requires_grad=True)
    k, v = (torch.randn(2, 4, 13, 8, requires_grad=True) for _ in range(2))
    positions = torch.arange(13)
    function = attention.posenc_eager_attention if backend == "eager" else attention.posenc_sdpa_attention
    got, _ = function(layer, q, k, v, None)
    compare(module, got, q, k, v, positions, positions, None)


@pytest.mark.parametrize("kernel", KERNELS)
def test_long_causal_gradients_come_from_the_tiles_and_match_the_paper(monkeypatch, kernel):
    """At the default tile size and a length of several tiles (the last partial), the backward runs on the
    tiles (one tile's memory; the band of a ``diagonal`` bias is every key) and gives the fp64 reference's
    gradients for q, k, v, r1 and r2."""

    def no_band(*args):
        raise AssertionError("a diagonal bias's gradient must not come from the band: it is every key")

    monkeypatch.setattr(cpu_fused, "band_bias_gradient", no_band)
    torch.manual_seed(7)
    module = trained_module(kernel, heads=2, seed=3)
    length = 3 * tiling.TILE_ROWS + 37
    q, k, v = (torch.randn(1, 2, length, 16, requires_grad=True) for _ in range(3))
    got, _ = attention.posenc_sdpa_attention(Layer(module).train(), q, k, v, None)
    positions = torch.arange(length)
    compare(module, got, q, k, v, positions, positions, (positions[None, :] <= positions[:, None])[None, None])


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_fresh_layer_is_a_no_op(kernel):
    module = KerpleBias(4, kernel)
    module.r1.data.fill_(3.0)
    module.reset_parameters()  # what conversion and checkpoint loading call for missing tables
    positions = torch.arange(9)
    assert torch.equal(module.bias(positions, positions, True), torch.zeros(1, 4, 9, 9))


def test_tables_are_fp32_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as from_pretrained(dtype=torch.bfloat16) builds modules
    try:
        module = KerpleBias(4)
    finally:
        torch.set_default_dtype(previous)
    assert module.r1.dtype == module.r2.dtype == torch.float32


@pytest.mark.parametrize("kernel", KERNELS)
def test_learning_starts_from_the_no_op(kernel):
    """r1 = 0 leaves r2 without gradient on the first step only: once r1 has moved, both learn.

    The loss rewards attending to the query's own key (the value that matches its target), which a recency
    bias (r1 > 0) helps, so the first step must raise r1."""
    torch.manual_seed(6)
    module = KerpleBias(4, kernel)
    layer = Layer(module).train()
    q, k, v = (torch.randn(1, 4, 24, 8) for _ in range(3))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    grads = []
    for _ in range(2):
        out, _ = attention.posenc_sdpa_attention(layer, q, k, v, None)  # [B, q, H, D]
        loss = -(out * v.transpose(1, 2)).sum()
        optimizer.zero_grad()
        loss.backward()
        grads.append((module.r1.grad.clone(), module.r2.grad.clone()))
        optimizer.step()
    (r1_first, r2_first), (r1_second, r2_second) = grads
    assert (r1_first < 0).all() and torch.equal(r2_first, torch.zeros(4))
    assert (module.r1 > 0).all()
    assert (r1_second != 0).all() and (r2_second != 0).all()


def test_parameters_out_of_range_are_projected_and_keep_their_gradient():
    """Forward values are the paper's ranges (r1 >= 0, 0.01 <= r2, r2 <= 2 for the power kernel); the
    gradient passes through the projection, so a parameter pushed past a bound can come back."""
    module = KerpleBias(2, "power")
    with torch.no_grad():
        module.r1.copy_(torch.tensor([-0.5, 0.7]))
        module.r2.copy_(torch.tensor([3.0, -1.0]))
    positions = torch.arange(6)
    bias = module.bias(positions, positions, False)[0]  # [H, q, kv]
    expected = paper_bias(torch.tensor([0.0, 0.7]), torch.tensor([2.0, 0.01]), "power", positions, positions)
    torch.testing.assert_close(bias.double(), expected)
    bias.sum().backward()
    assert (module.r1.grad != 0).all()
    assert module.r2.grad[1] != 0  # r1 = 0.7: r2's projection at 0.01 still passes its gradient


def test_kernel_is_a_typed_field():
    assert PosEncConfig(kind="kerple").kernel == "log"
    assert PosEncConfig.from_dict({"kind": "kerple", "kernel": "power"}).to_dict()["kernel"] == "power"
    with pytest.raises(ValueError, match=r"kind='kerple'\): invalid kernel='exp'; allowed: one of \['log', 'power'\]"):
        PosEncConfig(kind="kerple", kernel="exp")


def test_usable_as_a_comparison_variant(tmp_path):
    from pathlib import Path

    from hf_posenc.experiments.config import load_config
    from hf_posenc.experiments.context_extension.config import CompareConfig

    preset = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "compare_tiny.yaml"
    text = preset.read_text()
    assert text.rstrip().endswith("}")  # its variants list comes last: one more item can be appended
    (tmp_path / "compare.yaml").write_text(text + "  - {name: kerple, posenc: {kind: kerple, kernel: power}}\n")
    variant = load_config(CompareConfig, tmp_path / "compare.yaml").variants[-1]
    assert variant.name == "kerple" and variant.posenc == PosEncConfig(kind="kerple", kernel="power")
