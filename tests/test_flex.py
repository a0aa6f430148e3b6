"""The ``flex_attention`` backend against the sdpa backend on CPU: every bias encoding as a ``score_mod``, the masks
as block masks (causal, sliding window, padding, packed sequences), forward and backward, a learned table's
gradient through ``score_mod``, and the compiled forward; Self-Extend/ReRoPE's two flex passes merged by
log-sum-exp against their explicit attention.
"""

import copy
import sys

import pytest
import torch
from tiny_models import KINDS, example_params, input_ids, randomize_position_tables, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig, kernels, registry
from hf_posenc.kernels import flex_attention as flex

LOGIT_TOL = 5e-5
GRAD_TOL = 1e-3  # relative, on each parameter's gradient
TWO_POSITION_KINDS = [k for k in KINDS if registry.get(k).capabilities.route == "two_position_rope"]
#: Biases that take flex: position biases, and row biases that give a score_mod (FoX's key terms, FIRE's MLP).
FLEX_KINDS = [k for k in KINDS if (c := registry.get(k).capabilities).route == "bias"
              and (c.bias_form != "rows" or "flex_rows" in c.kernels)]


def pair(kind, arch="llama"):
    """The same converted model on the sdpa and on the flex_attention backend (learned tables randomised)."""
    model = hf_posenc.convert(tiny_model(arch, "sdpa"), PosEncConfig(**example_params(kind)))
    randomize_position_tables(model)
    other = copy.deepcopy(model)
    other.set_attn_implementation("flex_attention")
    assert other.config._attn_implementation == "hf_posenc_flex_attention"
    return model, other


def padded_batch():
    ids = input_ids(2, 14)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on the first row
    return ids, mask


def run(model, ids, mask, **kwargs):
    """Logits and every gradient of a loss over the non-padded positions."""
    model.zero_grad()
    logits = model(ids, attention_mask=mask, **kwargs).logits
    (logits * mask[..., None]).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach() * mask[..., None], grads


def assert_grads_close(got, expected):
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        error = (got[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert error < GRAD_TOL, f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("kind", FLEX_KINDS)
def test_flex_equals_sdpa_forward_and_backward_on_a_padded_batch(monkeypatch, kind):
    """Every bias that takes flex (FoX as its per-key terms ``-F_j``, FIRE's MLP of the normalised distance with a
    padded row's own normaliser; learned parameters' gradients through score_mod) runs the flex kernel and equals
    the sdpa backend, forward and backward."""
    sdpa_model, flex_model = pair(kind)
    ids, mask = padded_batch()
    logits, grads = run(sdpa_model, ids, mask)
    used = []
    kernel = kernels.KERNELS["flex"]
    monkeypatch.setitem(kernels.KERNELS, "flex", lambda call: used.append(call.queries) or kernel(call))
    flex_logits, flex_grads = run(flex_model, ids, mask)
    assert used, "the flex kernel ran"
    torch.testing.assert_close(flex_logits, logits, rtol=0, atol=LOGIT_TOL)
    assert_grads_close(flex_grads, grads)
    tables = [n for n in grads if ".posenc." in n]
    if registry.get(kind).capabilities.tables:
        assert tables, "a learned table gets its gradient through score_mod"


@pytest.mark.parametrize("kind", ["alibi", "t5_bias", "fire"])
def test_flex_sliding_window_and_packed_sequences(kind):
    # starcoder2's tiny config has a sliding window shorter than the sequence; packed sequences are position_ids
    # that restart, which transformers turns into a block-diagonal mask.
    sdpa_model, flex_model = pair(kind, "starcoder2")
    ids = input_ids(1, 14)
    position_ids = torch.cat([torch.arange(8), torch.arange(6)])[None]
    with torch.no_grad():
        expected = sdpa_model(ids, position_ids=position_ids).logits
        got = flex_model(ids, position_ids=position_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize("kind", ["alibi", "t5_bias", "fire"])
def test_flex_on_an_encoder_equals_sdpa(kind):
    """Bidirectional (symmetric) biases, with padding."""
    sdpa_model, flex_model = pair(kind, "modernbert")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = sdpa_model(ids, attention_mask=mask).last_hidden_state * mask[..., None]
        got = flex_model(ids, attention_mask=mask).last_hidden_state * mask[..., None]
    torch.testing.assert_close(got, expected, rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize("kind", ["alibi", "kerple", "rope", "cope", "fox", "fire"])
def test_flex_backend_generates_with_a_cache_like_sdpa(kind):
    sdpa_model, flex_model = pair(kind)
    ids = input_ids(1, 8)
    expected = sdpa_model.generate(ids, max_new_tokens=5, do_sample=False)
    got = flex_model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", TWO_POSITION_KINDS)
def test_two_position_flex_equals_explicit_attention(kind):
    """The CUDA kernel of Self-Extend/ReRoPE, run on CPU through flex's reference path: forward and backward."""
    model = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(**example_params(kind)))
    layer = model.model.layers[0].self_attn
    torch.manual_seed(0)
    query = torch.randn(2, 4, 14, 8, dtype=torch.float64, requires_grad=True)
    key = torch.randn(2, 2, 14, 8, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 2, 14, 8, dtype=torch.float64, requires_grad=True)
    allowed = torch.ones(2, 1, 14, 14, dtype=torch.bool).tril()
    allowed[0, :, :, :3] = False
    allowed[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # padded rows see themselves only

    def attention(name, mask):
        positions = torch.arange(14)
        call = kernels.Call(device="cpu", dtype=torch.float64, backend="sdpa", queries=14, query=query, key=key,
                            value=value, attention_mask=mask, q_pos=positions, k_pos=positions, scaling=8 ** -0.5,
                            posenc=layer.posenc, capabilities=registry.get(kind).capabilities)
        out = kernels.KERNELS[name](call)[0]
        grads = torch.autograd.grad(out.square().sum(), (query, key, value))
        return out, grads

    for mask in (None, allowed):
        expected, expected_grads = attention("two_position_explicit", mask)
        got, got_grads = attention("two_position_flex", mask)
        # Flex's reference path keeps its log-sum-exp in fp32 even for fp64 inputs.
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_score_mod_of_a_dense_bias_and_of_a_module_that_gives_its_own():
    class Dense(torch.nn.Module):
        def bias(self, q_pos, k_pos, causal):
            return (q_pos[:, None] * 0.1 - k_pos[None, :] * 0.2).expand(2, -1, -1)[None]  # [1, H, q, kv]

    class Own(Dense):
        def flex_score_mod(self, q_pos, k_pos, causal, heads=None):
            return (lambda score, b, h, q_idx, kv_idx, scale: score * scale), (torch.tensor(2.0),)

    caps = registry.Capabilities(route="bias", bias_form="dense", kernels=("dense",))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    positions = torch.arange(5)
    mask = flex.block_mask_of(None, positions, positions, True, 1)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    for module, expected_scores in ((Dense(), q @ k.transpose(-1, -2) / 8 ** 0.5 + Dense().bias(positions, positions,
                                                                                                  True)),
                                    (Own(), 2 * q @ k.transpose(-1, -2) / 8 ** 0.5)):
        mod = flex.score_mod_of(module, caps, positions, positions, True)
        got = flex.run_flex(q, k, v, mod, mask, 8 ** -0.5)
        expected = torch.softmax(expected_scores.masked_fill(~causal, float("-inf")), -1) @ v
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_flex_forward_equals_sdpa(monkeypatch):
    """A CPU forward without gradient from FLEX_CPU_COMPILED_FROM query rows takes the compiled kernel."""
    sdpa_model, flex_model = pair("t5_bias")
    ids, mask = padded_batch()
    monkeypatch.setattr(sys.modules["hf_posenc.kernels.select"], "FLEX_CPU_COMPILED_FROM", 1)
    ran = []
    monkeypatch.setitem(kernels.KERNELS, "flex_compiled", lambda call: ran.append(1) or flex.flex_compiled(call))
    with torch.no_grad():
        expected = sdpa_model(ids, attention_mask=mask).logits * mask[..., None]
        got = flex_model(ids, attention_mask=mask).logits * mask[..., None]
    assert len(ran) == flex_model.config.num_hidden_layers
    torch.testing.assert_close(got, expected, rtol=0, atol=LOGIT_TOL)
