"""Converted models under transformers' own switches: stock attention names, output_attentions, torch.compile.

Each of these was found by transformers' model-test expectations run on converted models: the stock names
were accepted and the next forward raised, ``config.output_attentions = True`` was refused on our eager
backend, and ``torch.compile(fullgraph=True)`` failed on StaticCache's tensor counter.
"""

import pytest
import torch
from test_core_models import stock_nope
from tiny_models import (
    ATTENTION_KINDS,
    KINDS,
    example_params,
    input_ids,
    randomize_position_tables,
    tiny_model,
)
from transformers import AutoModelForCausalLM, StaticCache

import hf_posenc
from hf_posenc import PosEncConfig, _hf

ALLOWED = (r"allowed: \['eager', 'flex_attention', 'hf_posenc_eager', 'hf_posenc_flex_attention', 'hf_posenc_sdpa', "
           r"'sdpa'\]")


def converted(kind, backend="sdpa", arch="llama"):
    # Each kind's example: every encoding through its plug-in route (the RoPE example has the interleaved layout,
    # which is not native), windows shorter than the tests' sequences (the extensions run both regimes).
    model = hf_posenc.convert(tiny_model(arch, backend), PosEncConfig(**example_params(kind)))
    randomize_position_tables(model)
    return model


# --- 1. stock attention names ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_stock_names_map_to_ours(kind):
    references = {backend: converted(kind, backend) for backend in ("eager", "sdpa")}
    model = converted(kind, "sdpa")
    x = input_ids()
    for name, ours in (("eager", "hf_posenc_eager"), ("sdpa", "hf_posenc_sdpa")):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == ours
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, references[name](x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3", "paged|eager"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_backends_that_drop_the_encoding_are_refused_when_set(kind, name):
    model = converted(kind, "eager")
    with pytest.raises(ValueError, match=ALLOWED) as error:
        model.set_attn_implementation(name)
    assert f"attn_implementation={name!r}" in str(error.value) and repr(kind) in str(error.value)
    assert model.config._attn_implementation == "hf_posenc_eager"  # unchanged: the model still runs
    with torch.no_grad():
        model(input_ids())


def test_nope_keeps_every_stock_backend():
    # NoPE runs the stock attention (only the rotation is neutralised): stock names stay, ours map back.
    model = converted("nope", "sdpa")
    reference = stock_nope("llama", "eager")
    x = input_ids()
    for name, expected in (("eager", "eager"), ("hf_posenc_sdpa", "sdpa"), ("hf_posenc_eager", "eager")):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == expected
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["alibi", "cope"])
def test_from_pretrained_with_a_stock_name_gives_ours(tmp_path, kind):
    model = converted(kind, "sdpa")
    model.save_pretrained(tmp_path)
    x = input_ids()
    for name in ("eager", "sdpa"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
        assert loaded.config._attn_implementation == f"hf_posenc_{name}"
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=ALLOWED):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_revert_restores_the_stock_backend_name():
    model = tiny_model("llama", "sdpa")
    hf_posenc.convert(model, PosEncConfig(kind="alibi"), attn_implementation="eager")
    hf_posenc.revert(model)
    assert model.config._attn_implementation == "sdpa"


# --- 2. config.output_attentions ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_config_output_attentions_on_our_eager(tmp_path, kind):
    model = converted(kind, "eager")
    x = input_ids(2, 9)
    with torch.no_grad():
        expected = model(x, output_attentions=True).attentions
    model.config.output_attentions = True
    with torch.no_grad():
        got = model(x).attentions
    assert len(got) == 2
    for weights, reference in zip(got, expected):
        assert weights.shape == (2, 4, 9, 9)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))
        assert torch.equal(weights, reference)
    model.save_pretrained(tmp_path)  # transformers' strict save-time validation accepts it too
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.output_attentions


def test_config_output_attentions_equals_stock_eager_weights():
    # A fresh T5 bias is zero: its weights are those of the stock NoPE model on the stock eager backend.
    model = hf_posenc.convert(tiny_model("llama", "eager"), PosEncConfig(kind="t5_bias"))
    reference = stock_nope("llama", "eager")
    model.config.output_attentions = reference.config.output_attentions = True
    x = input_ids(2, 9)
    with torch.no_grad():
        for got, expected in zip(model(x).attentions, reference(x).attentions, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_config_output_attentions_still_refused_on_sdpa():
    model = converted("alibi", "sdpa")
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.output_attentions = True


# --- 3. torch.compile -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# The README promises fullgraph compile for every encoding with the default (inductor) backend: the sdpa backend's
# kernels are compiled by inductor (CoPE once failed to lower a data-dependent width there, which dynamo's eager
# backend did not see). Our eager backend's tracing is checked with dynamo's eager backend, to keep the suite's time.
COMPILERS = [("sdpa", "inductor"), ("eager", "eager")]


@pytest.mark.slow
@pytest.mark.parametrize("backend, compiler", COMPILERS)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_forward_equals_eager(kind, backend, compiler):
    model = converted(kind, backend)
    assert type(model)._can_compile_fullgraph  # the flag transformers' own tests read
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


# The first eight rows (Llama is the test above), on which this test was checked. The 22 rows added beside
# them (Gemma, MoE, encoders of the BERT family, ...) fail it: compiling them is an open item, not a claim.
COMPILE_CHECKED = ["bert", "gpt2", "gpt_neox", "mistral", "phi", "qwen2", "qwen3"]


@pytest.mark.parametrize("kind", ["alibi", "t5_bias", "cope"])
@pytest.mark.parametrize("arch", COMPILE_CHECKED)
def test_compiled_forward_on_every_architecture(arch, kind):
    # The converted classes keep the stock `_can_compile_fullgraph` claim (BERT makes none, yet compiles).
    if kind == "cope" and arch == "bert":
        pytest.skip("CoPE is causal-only")
    model = converted(kind, "sdpa", arch)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)


def _decode(forward, model, prompt, steps):
    """Greedy decoding with a StaticCache through ``forward``; returns the tokens."""
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 2)
    tokens, graphs = prompt, []
    with torch.no_grad():
        logits = forward(tokens, **_hf.cache_kwargs(model, cache), use_cache=True).logits
        for _ in range(steps):
            token = logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, token], 1)
            logits = forward(token, **_hf.cache_kwargs(model, cache), use_cache=True).logits
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return tokens, graphs


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_static_cache_decoding_equals_no_cache_without_recompiles(kind):
    model = converted(kind, "sdpa")
    prompt = input_ids(2, 7)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    tokens, graphs = _decode(torch.compile(model, fullgraph=True, backend="eager"), model, prompt, 6)
    assert torch.equal(tokens, expected)
    # Prefill and the first decode step compile (two shapes); every later step reuses the decode graph.
    assert graphs == [graphs[0]] * len(graphs), graphs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nope", "alibi", "cope"])
def test_generate_with_a_compiled_forward_and_static_cache(kind):
    model = converted(kind, "sdpa")
    prompt = input_ids(1, 7)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = model.generate(prompt, use_cache=False, **kwargs)
        model.forward = torch.compile(model.forward, fullgraph=True)  # inductor, prefill and decode graphs
        assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), expected)
