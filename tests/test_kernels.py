"""The kernel selector on its own, and the exactness of ALiBi's tiled head-dimension fold against fp64.

ALiBi (Press et al. 2022, https://arxiv.org/abs/2108.12409): causal head ``h`` adds ``-m_h (i - j)``. The
references compute it in fp64 from that equation, with no fold and no tiles.
"""

import pytest
import torch
from test_bias_fast import attention_case

from hf_posenc import attention, kernels
from hf_posenc.encodings import AlibiBias
from hf_posenc.kernels import cpu_fused
from hf_posenc.registry import Capabilities

ROTATE = Capabilities(route="rotate")
NOPE = Capabilities()
ALIBI_LIKE = Capabilities(route="bias", bias_form="diagonal", kernels=("dense", "diagonal_tiles", "key_fold"))
BANDED = Capabilities(route="bias", bias_form="banded", tables=("table",), kernels=("dense", "diagonal_tiles"))
DENSE = Capabilities(route="bias", bias_form="dense", kernels=("dense",))
ATTEND = Capabilities(route="attend", needs_logits=True, causal_only=True)
TWO_POSITION_ROPE = Capabilities(route="two_position_rope", causal_only=True, extends_rope=True)
COPE = Capabilities(route="attend", needs_logits=True, causal_only=True, kernels=("cope_triton",))
FOX_LIKE = Capabilities(route="bias", bias_form="rows", kernels=("dense", "key_term_fold", "flex_rows"), rotates=True,
                        causal_only=True)
FIRE_LIKE = Capabilities(route="bias", bias_form="rows", kernels=("dense", "row_tiles", "flex_rows"))
PREFILL = kernels.Call(device="cpu", dtype=torch.float32, backend="sdpa", queries=16)


def call(**changes) -> kernels.Call:
    return kernels.Call(**{**PREFILL.__dict__, **changes})


@pytest.mark.parametrize(
    "capabilities, changes, expected",
    [
        (ALIBI_LIKE, {}, "key_fold_cpu"),
        # The fold's folded term exceeds what bf16/fp16 resolve: low precision takes the fp32-bias tiles.
        (ALIBI_LIKE, {"dtype": torch.bfloat16}, "diagonal_tiles_cpu"),
        (ALIBI_LIKE, {"dtype": torch.float16}, "diagonal_tiles_cpu"),
        (ALIBI_LIKE, {"queries": 1}, "diagonal_tiles_sdpa"),  # decode step
        (ALIBI_LIKE, {"device": "mps"}, "diagonal_tiles_sdpa"),  # other devices (CUDA: its rows below)
        (ALIBI_LIKE, {"dropout": 0.1}, "diagonal_tiles_sdpa"),  # the fused CPU paths run without dropout
        (ALIBI_LIKE, {"fused_cpu": False}, "diagonal_tiles_sdpa"),
        (ALIBI_LIKE, {"compiling": True}, "sdpa"),
        (ALIBI_LIKE, {"causal": False}, "sdpa"),  # symmetric ALiBi does not decompose
        (ALIBI_LIKE, {"backend": "eager"}, "eager"),
        (ALIBI_LIKE, {"softcap": True}, "eager"),
        (BANDED, {}, "diagonal_tiles_cpu"),
        (BANDED, {"dtype": torch.bfloat16}, "diagonal_tiles_cpu"),
        (BANDED, {"queries": 1}, "diagonal_tiles_sdpa"),
        (BANDED, {"causal": False}, "sdpa"),
        (DENSE, {}, "sdpa"),
        (DENSE, {"backend": "eager"}, "eager"),
        (ROTATE, {}, "sdpa"),
        (ROTATE, {"backend": "eager"}, "eager"),
        (ROTATE, {"softcap": True}, "eager"),
        (NOPE, {}, "sdpa"),
        (ATTEND, {}, "attend"),
        (ATTEND, {"backend": "eager", "dtype": torch.bfloat16}, "attend"),
        (TWO_POSITION_ROPE, {}, "two_position_tiled"),
        (TWO_POSITION_ROPE, {"compiling": True}, "two_position_explicit"),
        # The flex_attention backend: flex for every route but the encodings' own attention kernels; the
        # compiled kernel for long CPU forwards without gradient (no fused CPU backward).
        (ALIBI_LIKE, {"backend": "flex_attention"}, "flex"),
        (ALIBI_LIKE, {"backend": "flex_attention", "queries": 4096}, "flex_compiled"),
        (ALIBI_LIKE, {"backend": "flex_attention", "queries": 4096, "grad": True}, "flex"),
        (ALIBI_LIKE, {"backend": "flex_attention", "compiling": True}, "flex"),  # the outer compile fuses it
        (ALIBI_LIKE, {"backend": "flex_attention", "causal": False}, "flex"),
        (ALIBI_LIKE, {"backend": "flex_attention", "dropout": 0.1}, "diagonal_tiles_sdpa"),  # flex has no dropout
        (ALIBI_LIKE, {"backend": "flex_attention", "softcap": True}, "eager"),
        (BANDED, {"backend": "flex_attention", "queries": 1}, "flex"),
        (DENSE, {"backend": "flex_attention"}, "flex"),
        (ROTATE, {"backend": "flex_attention"}, "flex"),
        (NOPE, {"backend": "flex_attention"}, "flex"),
        (ATTEND, {"backend": "flex_attention"}, "attend"),
        (TWO_POSITION_ROPE, {"backend": "flex_attention"}, "two_position_tiled"),
        # CUDA: the bias encodings on compiled flex (score_mod), decode steps on a bias row; Self-Extend/ReRoPE
        # as two compiled flex passes with their log-sum-exp (the fused pieces' ATen op is CPU-only).
        (ALIBI_LIKE, {"device": "cuda"}, "flex_compiled"),
        (ALIBI_LIKE, {"device": "cuda", "dtype": torch.bfloat16, "grad": True}, "flex_compiled"),
        (ALIBI_LIKE, {"device": "cuda", "causal": False}, "flex_compiled"),
        (ALIBI_LIKE, {"device": "cuda", "queries": 1}, "diagonal_tiles_sdpa"),
        (ALIBI_LIKE, {"device": "cuda", "dropout": 0.1}, "diagonal_tiles_sdpa"),
        (ALIBI_LIKE, {"device": "cuda", "compiling": True}, "flex"),
        (ALIBI_LIKE, {"device": "cuda", "backend": "eager"}, "eager"),
        (BANDED, {"device": "cuda", "dtype": torch.bfloat16}, "flex_compiled"),
        (DENSE, {"device": "cuda"}, "flex_compiled"),
        (ROTATE, {"device": "cuda"}, "sdpa"),
        (NOPE, {"device": "cuda"}, "sdpa"),
        (ATTEND, {"device": "cuda"}, "attend"),
        (TWO_POSITION_ROPE, {"device": "cuda"}, "two_position_flex"),
        (TWO_POSITION_ROPE, {"device": "cuda", "dtype": torch.bfloat16, "grad": True}, "two_position_flex"),
        (TWO_POSITION_ROPE, {"device": "cuda", "backend": "eager"}, "two_position_explicit"),
        (TWO_POSITION_ROPE, {"device": "cuda", "dropout": 0.1}, "two_position_explicit"),
        (TWO_POSITION_ROPE, {"device": "cuda", "compiling": True}, "two_position_explicit"),
        # CoPE: its Triton kernel on CUDA where triton imports; the weights (eager), torch.compile, float64 and
        # other devices take its PyTorch path.
        (COPE, {}, "attend"),
        (COPE, {"device": "cuda"}, "cope_triton"),
        (COPE, {"device": "cuda", "dtype": torch.bfloat16, "grad": True}, "cope_triton"),
        (COPE, {"device": "cuda", "dtype": torch.float16, "queries": 1}, "cope_triton"),
        (COPE, {"device": "cuda", "backend": "flex_attention"}, "cope_triton"),
        (COPE, {"device": "cuda", "backend": "eager"}, "attend"),
        (COPE, {"device": "cuda", "compiling": True}, "attend"),
        (COPE, {"device": "cuda", "triton": False}, "attend"),
        (COPE, {"device": "cuda", "dtype": torch.float64}, "attend"),
        (COPE, {"device": "mps"}, "attend"),
        # FoX: its per-key term folded on the fused CPU kernel in fp32 prefills; a decode step, other dtypes and
        # devices keep the dense bias.
        (FOX_LIKE, {}, "key_term_fold_cpu"),
        (FOX_LIKE, {"grad": True}, "key_term_fold_cpu"),
        (FOX_LIKE, {"backend": "flex_attention"}, "flex"),  # its per-key terms as a score_mod
        (FOX_LIKE, {"dtype": torch.bfloat16}, "sdpa"),
        (FOX_LIKE, {"queries": 1}, "sdpa"),
        (FOX_LIKE, {"device": "cuda"}, "flex_compiled"),
        (FOX_LIKE, {"device": "cuda", "queries": 1}, "sdpa"),  # a decode step: a [B, H, 1, kv] bias row
        (FOX_LIKE, {"fused_cpu": False}, "sdpa"),
        (FOX_LIKE, {"dropout": 0.1}, "sdpa"),
        (FOX_LIKE, {"compiling": True}, "sdpa"),
        (FOX_LIKE, {"backend": "eager"}, "eager"),
        # FIRE: tiles of query rows on any device and dtype, but for decode steps, dropout, encoders, weights.
        (FIRE_LIKE, {}, "row_tiles"),
        (FIRE_LIKE, {"dtype": torch.bfloat16, "grad": True}, "row_tiles"),
        (FIRE_LIKE, {"device": "cuda"}, "flex_compiled"),  # its MLP as a score_mod
        (FIRE_LIKE, {"device": "cuda", "queries": 1}, "sdpa"),  # a decode step: a [B, H, 1, kv] bias row
        (FIRE_LIKE, {"backend": "flex_attention"}, "flex"),
        (FIRE_LIKE, {"queries": 1}, "sdpa"),
        (FIRE_LIKE, {"dropout": 0.1}, "sdpa"),
        (FIRE_LIKE, {"causal": False}, "sdpa"),
        (FIRE_LIKE, {"compiling": True}, "sdpa"),
        (FIRE_LIKE, {"backend": "eager"}, "eager"),
    ],
)
def test_selector(capabilities, changes, expected):
    assert kernels.select(capabilities, call(**changes)) == expected


def test_selector_only_picks_declared_kernels():
    """A bias that does not declare the fold never gets it, whatever the call."""
    no_fold = Capabilities(route="bias", bias_form="diagonal", kernels=("dense", "diagonal_tiles"))
    assert kernels.select(no_fold, PREFILL) == "diagonal_tiles_cpu"
    assert kernels.select(Capabilities(route="bias", bias_form="diagonal", kernels=("dense",)), PREFILL) == "sdpa"


def test_selector_gives_a_softcap_to_the_encoding_that_computes_the_logits():
    """CoPE applies Gemma 2's cap inside its own attention (tests/test_cope_softcap.py)."""
    assert kernels.select(ATTEND, call(softcap=True)) == "attend"


def test_every_kernel_is_reachable():
    cases = [(c, call(**k)) for c in (ALIBI_LIKE, BANDED, ATTEND, TWO_POSITION_ROPE, COPE, FOX_LIKE, FIRE_LIKE) for k in
             ({}, {"queries": 1}, {"backend": "eager"}, {"compiling": True}, {"dtype": torch.bfloat16},
              {"device": "cuda"}, {"backend": "flex_attention"})]
    assert {kernels.select(c, x) for c, x in cases} == set(kernels.KERNELS)


# ---------------------------------------------------------------------------------------------------
# ALiBi's fold against fp64
# ---------------------------------------------------------------------------------------------------
class Layer(torch.nn.Module):
    is_causal = True

    def __init__(self, posenc):
        super().__init__()
        self.posenc = posenc


def alibi_fp64(q, k, v, slopes, rows, past=0, allowed=None):
    """Causal ALiBi of query ``rows`` in fp64 from the equation; ``allowed`` [B, 1, q, kv] optional."""
    kv_len = k.shape[2]
    q_pos = rows + past
    distance = (q_pos[:, None] - torch.arange(kv_len)[None, :]).double()  # [r, kv]
    scores = q[:, :, rows].double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = scores - slopes.double()[:, None, None] * distance
    visible = distance >= 0
    if allowed is not None:
        visible = visible & allowed[:, :, rows]
    scores = scores.masked_fill(~visible, torch.finfo(torch.float64).min)
    return torch.softmax(scores, -1) @ v.double()  # [B, H, r, D]


def worst_row_error(got, expected):
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()


#: Eager fp32 attention stays near 1e-6 against fp64 at every length (benchmarks/attention.py --fold-error);
#: the fold must too. The untiled fold measured 1.3e-4 at this length.
FOLD_TOLERANCE = 4e-6


def test_fold_is_exact_to_fp32_rounding_at_long_range(monkeypatch):
    """T=4096: the first rows (where one fold for all keys put the largest offsets, ``m * T``), a middle block
    and the last rows, against fp64. A single tile (the untiled fold) fails the same bound."""
    torch.manual_seed(0)
    length, heads = 4096, 4
    q, k, v = (torch.randn(1, heads, length, 16) for _ in range(3))
    posenc = AlibiBias(heads)
    rows = torch.cat([torch.arange(128), torch.arange(2048, 2112), torch.arange(length - 64, length)])
    expected = alibi_fp64(q, k, v, posenc.slopes("cpu"), rows)
    with torch.no_grad():
        got, _ = attention.posenc_sdpa_attention(Layer(posenc), q, k, v, None)
    assert worst_row_error(got.transpose(1, 2)[:, :, rows].double(), expected) <= FOLD_TOLERANCE
    monkeypatch.setattr(cpu_fused, "FOLD_TILE_ROWS", length)  # one tile: keys measured from the last one
    with torch.no_grad():
        untiled = cpu_fused.TiledFoldAttention.apply(q, k, v, posenc.slopes("cpu"), None, 0, 16 ** -0.5)
    assert worst_row_error(untiled[:, :, rows].double(), expected) > 5 * FOLD_TOLERANCE


@pytest.mark.parametrize("case", ["prefill", "cached", "left_padded", "static_cache", "gqa", "partial_tile"])
def test_fold_forward_and_gradients_match_fp64(monkeypatch, case):
    """Several tiles (8 rows), partial ones included, with and without the caller's mask: the output and the
    q/k/v gradients equal the fp64 equations."""
    monkeypatch.setattr(cpu_fused, "FOLD_TILE_ROWS", 8)
    torch.manual_seed(1)
    default = (0, 37 if case == "partial_tile" else 32, 0)
    past, q_len, spare = {"cached": (13, 21, 0), "static_cache": (9, 20, 6)}.get(case, default)
    q, k, v, q_pos, k_pos, allowed, mask = attention_case(case, past, q_len, spare)
    if case == "cached":  # the caller's mask, nothing padded
        mask = allowed
    kv_heads = k.shape[1]
    posenc = AlibiBias(4)
    chosen = []
    fold = kernels.KERNELS["key_fold_cpu"]
    monkeypatch.setitem(kernels.KERNELS, "key_fold_cpu", lambda *a: chosen.append(True) or fold(*a))
    got, _ = attention.posenc_sdpa_attention(Layer(posenc).train(), q, k, v, mask, posenc_past=past)
    assert chosen, "the fold did not run"
    groups = 4 // kv_heads
    expected = alibi_fp64(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), posenc.slopes("cpu"),
                          torch.arange(q_len), past, allowed).transpose(1, 2)
    # Rows with no visible key (left padding) are garbage in every kernel; a loss never reads them.
    visible = allowed.any(-1).squeeze(1)  # [B, q]
    torch.testing.assert_close(got.double()[visible], expected[visible], rtol=1e-5, atol=1e-5)
    upstream = torch.randn(got.shape, dtype=torch.float64)
    upstream[~visible] = 0
    got_grads = torch.autograd.grad(got.double(), (q, k, v), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    for name, a, b in zip("qkv", got_grads, expected_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
