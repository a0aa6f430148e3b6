"""GPT-J and Falcon against stock transformers: what their rows say beyond the table-parametrised matrix.

GPT-J rotates an absolute ``rotary_dim`` in the interleaved layout and hands its attention ``(sin, cos)``.
Falcon fuses q/k/v in one of three layouts chosen by its config, and its ALiBi variants (``alibi=True``) add
their own bias in the model's forward: that ALiBi converts to the plug-in's exactly (:func:`hf_posenc.native_alibi`)
and back (:func:`hf_posenc.revert`, or a reload of the saved checkpoint).
"""

import json

import pytest
import torch
import transformers
from test_persistence import run_python
from tiny_models import FALCON, REFUSED_HERE, input_ids, randomize_position_tables, tiny_model
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig

# Where this transformers computes their attention in classes of its own (5.5), conversion refuses both rows:
# test_architectures checks that refusal; everything below needs the rows to run.
pytestmark = pytest.mark.skipif(bool(REFUSED_HERE), reason=f"transformers {transformers.__version__} runs "
                                f"{REFUSED_HERE} attention outside AttentionInterface: conversion refuses them")

#: Falcon's three fused q/k/v layouts: the new decoder (grouped, 2 kv heads), multi-query, one block per head.
LAYOUTS = {
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
    "multi_query": dict(multi_query=True),
    "per_head": dict(multi_query=False),
}


def falcon(layout: str = "grouped", backend: str = "eager", seed: int = 0, **overrides):
    """A tiny random Falcon with the fused layout ``layout`` (same seed: same weights whatever ``alibi`` says)."""
    torch.manual_seed(seed)
    config = transformers.FalconConfig(**FALCON, **LAYOUTS[layout], **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=backend).eval()


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


# ----------------------------------------------------------------------------------------------------
# GPT-J
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gptj_plugin_rope_equals_stock(backend):
    """The plug-in's interleaved partial rotation (forced off the native route) is GPT-J's own, and stays so in
    the half layout after rope_layout permutes the rows."""
    x = input_ids()
    expected = logits(tiny_model("gptj", backend), x)
    model = hf_posenc.convert(tiny_model("gptj", backend), PosEncConfig(kind="rope", native=False))
    assert type(model).__name__ == "HfPosencGPTJForCausalLM"
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-6)
    hf_posenc.rope_layout(model, "half")
    assert hf_posenc.posenc_of(model).layout == "half"
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


def test_gptj_rotates_only_rotary_dim():
    """rotary_dim=4 of 8: the identity request is native; rotating the whole head is another model."""
    x = input_ids()
    stock = tiny_model("gptj")
    native = hf_posenc.convert(tiny_model("gptj"), PosEncConfig(kind="rope"))
    assert type(native) is type(stock) and hf_posenc.posenc_of(native).partial_rotary_factor is None
    whole = hf_posenc.convert(tiny_model("gptj"), PosEncConfig(kind="rope", partial_rotary_factor=1.0))
    assert type(whole).__name__.startswith("HfPosenc")
    assert (logits(whole, x) - logits(stock, x)).abs().max() > 1e-4


def test_gptj_nope_takes_sin_cos_in_its_order():
    """The identity rotation is handed as (sin=0, cos=1): in the (cos, sin) order every rotated dimension would
    be zeroed instead, and the outputs would move."""
    model = hf_posenc.convert(tiny_model("gptj"), PosEncConfig(kind="nope"))
    seen = []
    attn = model.transformer.h[0].attn
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_embeddings"]), with_kwargs=True)
    logits(model, input_ids())
    handle.remove()
    sin, cos = seen[0]
    assert torch.equal(sin, torch.zeros_like(sin)) and torch.equal(cos, torch.ones_like(cos))


# ----------------------------------------------------------------------------------------------------
# Falcon: fused layouts
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_falcon_layouts_rotate_like_stock(layout):
    """Plug-in RoPE equals stock; rope_layout permutes the q and k rows of this layout (not v) and keeps the
    logits, and the interleaved layout without the permutation is another model."""
    x = input_ids()
    expected = logits(falcon(layout), x)
    plugin = hf_posenc.convert(falcon(layout), PosEncConfig(kind="rope", native=False))
    torch.testing.assert_close(logits(plugin, x), expected, rtol=0, atol=1e-6)
    model = falcon(layout)
    before = model.transformer.h[0].self_attention.query_key_value.weight.detach().clone()
    hf_posenc.rope_layout(model, "interleaved")
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)
    after = model.transformer.h[0].self_attention.query_key_value.weight
    d = 8
    assert torch.equal(after[-d:], before[-d:])  # the last rows are a value head in every layout
    assert not torch.equal(after, before)
    unpermuted = hf_posenc.convert(falcon(layout), PosEncConfig(kind="rope", layout="interleaved"))
    assert (logits(unpermuted, x) - expected).abs().max() > 1e-4
    hf_posenc.revert(model)
    assert torch.equal(model.transformer.h[0].self_attention.query_key_value.weight, before)


# ----------------------------------------------------------------------------------------------------
# Falcon: native ALiBi <-> the plug-in's
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_falcon_native_alibi_converts_to_the_plugin_exactly(layout, backend):
    """native_alibi(model) on a Falcon ALiBi model keeps its logits, on a left-padded batch too; the paper's
    slopes (no bf16 rounding, no 1/sqrt(head_dim)) are another model; revert gives the stock model back."""
    x = input_ids()
    stock = falcon(layout, backend, alibi=True)
    request = hf_posenc.native_alibi(stock)
    model = hf_posenc.convert(falcon(layout, backend, alibi=True), request)
    assert model.transformer.use_alibi is False and model.config.alibi is True
    torch.testing.assert_close(logits(model, x), logits(stock, x), rtol=0, atol=1e-6)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(logits(model, x, attention_mask=mask, position_ids=position_ids)[1, 4:],
                               logits(stock, x, attention_mask=mask)[1, 4:], rtol=0, atol=1e-6)
    paper = hf_posenc.convert(falcon(layout, backend, alibi=True), PosEncConfig(kind="alibi"))
    assert (logits(paper, x) - logits(stock, x)).abs().max() > 1e-3
    hf_posenc.revert(model)
    assert model.transformer.use_alibi is True and not hasattr(model.config, "posenc")
    assert torch.equal(logits(model, x), logits(stock, x))


def test_falcon_native_alibi_slopes():
    """4 heads: the paper's 2^-2, 2^-4, 2^-6, 2^-8 (exact in bf16) over sqrt(head_dim=8); 16 heads (as in the
    32 of Falcon-RW-1B, slopes 2^(-k/2)): rounded to bf16 first."""
    slopes = hf_posenc.native_alibi(falcon(alibi=True)).slopes
    assert slopes == pytest.approx([2.0**-k / 8**0.5 for k in (2, 4, 6, 8)], rel=1e-7)
    sixteen = transformers.FalconConfig(**{**FALCON, "hidden_size": 128, "num_attention_heads": 16}, alibi=True)
    paper = hf_posenc.encodings.alibi_slopes(16)
    assert torch.tensor(hf_posenc.native_alibi(sixteen).slopes) * 8**0.5 == pytest.approx(
        paper.bfloat16().float().tolist(), rel=1e-6)
    assert not torch.equal(paper.bfloat16().float(), paper)  # the rounding matters there
    with pytest.raises(ValueError, match="native_alibi needs a model whose own encoding is ALiBi; this 'falcon'"):
        hf_posenc.native_alibi(falcon())


def test_falcon_native_alibi_warns_where_it_cannot_be_exact(caplog):
    """16 heads: slopes that are not powers of two, whose bf16 product with the position the stock code rounds;
    the conversion says so instead of reporting nothing. 4 heads (powers of two): no warning."""
    sixteen = transformers.FalconConfig(**{**FALCON, "hidden_size": 128, "num_attention_heads": 16}, alibi=True)
    with caplog.at_level("WARNING", logger="hf_posenc.native_alibi"):
        hf_posenc.native_alibi(falcon(alibi=True))
        assert not caplog.records
        hf_posenc.native_alibi(sixteen)
    assert len(caplog.records) == 1 and "16 heads give slopes that are not powers of two" in caplog.text
    with pytest.raises(ValueError, match="allowed: one slope per attention head"):
        hf_posenc.convert(falcon(alibi=True), PosEncConfig(kind="alibi", slopes=[0.5, 0.25]))
    with pytest.raises(ValueError, match="invalid slopes"):
        PosEncConfig(kind="alibi", slopes=[0.5, -1.0])


def test_falcon_alibi_to_rope_and_nope_equal_stock_models():
    """ALiBi Falcon converted to RoPE is the stock RoPE Falcon with the same weights (alibi=False); to NoPE it is
    the stock model with its own bias switched off."""
    x = input_ids()
    rope = hf_posenc.convert(falcon(alibi=True), PosEncConfig(kind="rope"))
    assert type(rope).__name__.startswith("HfPosenc")  # the config still says alibi: the plug-in rotates
    torch.testing.assert_close(logits(rope, x), logits(falcon(alibi=False), x), rtol=0, atol=1e-6)
    no_bias = falcon(alibi=True)
    no_bias.transformer.use_alibi = False
    nope = hf_posenc.convert(falcon(alibi=True), PosEncConfig(kind="nope"))
    torch.testing.assert_close(logits(nope, x), logits(no_bias, x), rtol=0, atol=1e-6)
    assert (logits(nope, x) - logits(falcon(alibi=True), x)).abs().max() > 1e-3


def test_falcon_alibi_refuses_what_needs_its_rope():
    with pytest.raises(ValueError, match="has no RoPE to extend"):
        hf_posenc.convert(falcon(alibi=True), PosEncConfig(kind="self_extend"))
    with pytest.raises(ValueError, match="rope_layout needs a RoPE model; 'falcon' has its own ALiBi"):
        hf_posenc.rope_layout(falcon(alibi=True), "interleaved")


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_falcon_alibi_generates_like_stock_with_every_cache(backend):
    """Greedy tokens of the converted model equal the stock ALiBi model's, with no, dynamic and static caches."""
    stock = falcon(alibi=True, backend=backend)
    model = hf_posenc.convert(falcon(alibi=True, backend=backend), hf_posenc.native_alibi(stock))
    prompt = input_ids(1, 5)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        expected = stock.generate(prompt, use_cache=False, **kwargs)
        assert torch.equal(model.generate(prompt, use_cache=False, **kwargs), expected)
        assert torch.equal(model.generate(prompt, **kwargs), expected)
        assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), expected)


RELOAD = """
import sys, torch
import hf_posenc
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[1] + "/inputs.pt")).logits, sys.argv[1] + "/out.pt")
reverted = hf_posenc.revert(model)
print("CLASS", type(model).__name__, "USE_ALIBI", model.transformer.use_alibi)
"""


@pytest.mark.parametrize("kind", ["native_alibi", "t5_bias"])
def test_falcon_alibi_checkpoint_reloads_converted_and_reverts(tmp_path, kind):
    """Saved with the slopes in its config: a fresh process reloads the same logits, and revert there gives the
    stock ALiBi Falcon (its config still says alibi)."""
    x = input_ids()
    stock = falcon(alibi=True)
    request = hf_posenc.native_alibi(stock) if kind == "native_alibi" else PosEncConfig(kind=kind)
    model = hf_posenc.convert(falcon(alibi=True), request)
    randomize_position_tables(model)
    model.save_pretrained(tmp_path)
    torch.save(x, tmp_path / "inputs.pt")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hf_posenc_falcon" and config["alibi"] is True
    if kind == "native_alibi":
        assert config["posenc"]["slopes"] == pytest.approx(list(request.slopes))
    result = run_python(f"import sys; sys.argv[1:] = [{str(tmp_path)!r}]\n" + RELOAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CLASS FalconForCausalLM USE_ALIBI True" in result.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits(model, x))
