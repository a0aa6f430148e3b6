"""Conversion on every architecture: parity with stock, cache invariants, padding, attention weights."""


import pytest
import torch
from tiny_models import (
    ATTENTION_KINDS,
    DECODERS,
    KINDS,
    NOOP_KINDS,
    REPRESENTATIVE,
    ROPE_ARCHS,
    TESTED,
    allowed_kinds,
    assert_cache_equals_no_cache,
    converted,
    input_ids,
    randomize_position_tables,
    stock_backend,
    tiny_model,
)

import hf_posenc
from hf_posenc import PosEncConfig


def stock_nope(arch: str, attn_implementation: str = "eager"):
    """Independent NoPE reference built from stock transformers only: zero rotary frequencies give
    cos=1/sin=0 (identity rotation); zeroed absolute tables add nothing."""
    model = tiny_model(arch, attn_implementation)
    with torch.no_grad():
        rotary = getattr(model.base_model, "rotary_emb", None)
        if rotary is not None:
            # One `inv_freq` buffer, or one per layer type (Gemma 3, ModernBERT: `sliding_attention_inv_freq`).
            frequencies = [b for n, b in rotary.named_buffers() if n.endswith("inv_freq")]
            # GPT-J keeps a table of [sin | cos] per position instead: sin = 0, cos = 1.
            tables = [b for n, b in rotary.named_buffers() if n == "embed_positions"]
            assert frequencies or tables
            for buffer in frequencies:
                buffer.zero_()
            for table in tables:
                table[:, : table.shape[-1] // 2] = 0.0
                table[:, table.shape[-1] // 2:] = 1.0
        for name in ("wpe", "embeddings.position_embeddings"):
            module = model.base_model
            try:
                for part in name.split("."):
                    module = getattr(module, part)
            except AttributeError:
                continue
            module.weight.zero_()
    return model


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_identity_rope_conversion_is_bitwise(arch):
    stock = tiny_model(arch)
    model = hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="rope"))
    x = input_ids()
    with torch.no_grad():
        assert torch.equal(stock(x)[0], model(x)[0])
    assert type(model).__name__ == type(stock).__name__  # native: still a stock class
    # ... and back: revert gives the stock config (per-layer-type bases included) and the same outputs.
    hf_posenc.revert(model)
    # (GPT-J's config has none: its RoPE is fixed in code.)
    assert getattr(model.config, "rope_parameters", None) == getattr(stock.config, "rope_parameters", None)
    with torch.no_grad():
        assert torch.equal(stock(x)[0], model(x)[0])


# Refused kinds (CoPE on encoders) are checked in test_architectures.
NOOP_CASES = [(arch, kind) for arch in TESTED for kind in NOOP_KINDS if kind in allowed_kinds(arch)]


@pytest.mark.parametrize("arch,kind", NOOP_CASES)
def test_noop_encodings_equal_stock_nope(arch, kind):
    reference = stock_nope(arch)
    converted = hf_posenc.convert(tiny_model(arch), PosEncConfig(kind=kind))
    x = input_ids()
    with torch.no_grad():
        expected = reference(x)[0]
        got = converted(x)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def matrix(archs):
    """(arch, kind, backend): both backends for the representative architectures, sdpa for the others
    (every row still gets every kind it takes)."""
    return [(arch, kind, backend) for arch in archs for kind in allowed_kinds(arch)
            for backend in (sorted({"eager", stock_backend(arch, "sdpa")}) if arch in REPRESENTATIVE
                            else (stock_backend(arch, "sdpa"),))]


@pytest.mark.parametrize("arch,kind,backend", matrix(DECODERS))
def test_generate_cache_invariants(arch, kind, backend):
    """Greedy generation with a dynamic and a static cache equals no cache; past the window of the
    architectures with sliding-window layers (5 + 10 tokens, window 6)."""
    model = converted(arch, kind, backend)
    randomize_position_tables(model)
    assert_cache_equals_no_cache(model, input_ids(1, 5), 10)


@pytest.mark.parametrize("arch,kind,backend", matrix(TESTED))
def test_left_padded_batch_matches_rows_alone(arch, kind, backend):
    model = converted(arch, kind, backend)
    randomize_position_tables(model)
    long_row, short_row = input_ids(1, 10, seed=1), input_ids(1, 6, seed=2)
    pad = long_row.shape[1] - short_row.shape[1]
    batch = torch.cat([long_row, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)[0]
        alone_long = model(long_row)[0]
        alone_short = model(short_row)[0]
    torch.testing.assert_close(padded[0], alone_long[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[1, pad:], alone_short[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,kind",
                         [(arch, kind) for arch in ("llama", "gpt2", "gemma2") for kind in allowed_kinds(arch)])
def test_output_attentions_on_eager(arch, kind):
    model = hf_posenc.convert(tiny_model(arch, "eager"), PosEncConfig(kind=kind))
    x = input_ids(2, 9)
    with torch.no_grad():
        out = model(x, output_attentions=True)
    assert len(out.attentions) == 2
    for weights in out.attentions:
        assert weights.shape == (2, 4, 9, 9)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))
        assert torch.all(weights.triu(1) == 0)  # causal


@pytest.mark.parametrize("kind", [k for k in ATTENTION_KINDS if k in allowed_kinds("gpt2")])
def test_eager_and_sdpa_agree(kind):
    eager = hf_posenc.convert(tiny_model("gpt2", "eager"), PosEncConfig(kind=kind))
    sdpa = hf_posenc.convert(tiny_model("gpt2", "sdpa"), PosEncConfig(kind=kind))
    randomize_position_tables(eager)
    randomize_position_tables(sdpa)
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(eager(x).logits, sdpa(x).logits, rtol=1e-4, atol=1e-5)


def test_hybrid_layers_keep_nope_elsewhere():
    """layers=[1]: layer 0 is NoPE (no module), layer 1 carries the encoding."""
    model = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi", layers=[1]))
    attn = [layer.self_attn for layer in model.model.layers]
    assert not hasattr(attn[0], "posenc") and hasattr(attn[1], "posenc")
    # Layer 0 alone must then match the stock NoPE model's layer 0 output.
    reference = stock_nope("llama")
    x = input_ids()
    with torch.no_grad():
        got = model(x, output_hidden_states=True).hidden_states[1]
        expected = reference(x, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_hybrid_rope_layers_is_not_native_and_matches_native_when_full():
    """RoPE on a subset of layers runs through the plug-in; on layer 1 it must equal stock RoPE there."""
    stock = tiny_model("llama")
    hybrid = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="rope", layers=[0]))
    assert type(hybrid).__name__.startswith("HfPosenc")
    x = input_ids()
    with torch.no_grad():
        got = hybrid(x, output_hidden_states=True).hidden_states[1]
        expected = stock(x, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_revert_restores_stock_model():
    stock = tiny_model("gpt2")
    model = tiny_model("gpt2")
    x = input_ids()
    hf_posenc.convert(model, PosEncConfig(kind="alibi"))
    hf_posenc.revert(model)
    assert type(model) is type(stock) and not hasattr(model.config, "posenc")
    with torch.no_grad():
        assert torch.equal(model(x).logits, stock(x).logits)


def test_conversion_is_per_instance():
    a, b = tiny_model("llama"), tiny_model("llama")
    hf_posenc.convert(a, PosEncConfig(kind="alibi"))
    reference = tiny_model("llama")
    x = input_ids()
    with torch.no_grad():
        assert torch.equal(b(x).logits, reference(x).logits)
        assert not torch.equal(a(x).logits, reference(x).logits)


def test_switching_to_stock_backend_is_refused():
    model = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(kind="alibi"))
    # set_attn_implementation maps stock names to ours (test_stock_backends); a config written behind its
    # back still cannot run the stock function silently.
    model.config._attn_implementation_internal = "sdpa"
    with pytest.raises(RuntimeError, match="drops its positional encoding"):
        model(input_ids())
    hf_posenc.set_backend(model, "sdpa")
    model(input_ids())


def test_bert_accepts_inputs_longer_than_its_absolute_table():
    model = hf_posenc.convert(tiny_model("bert"), PosEncConfig(kind="alibi"))
    with torch.no_grad():
        out = model(input_ids(1, 200)).last_hidden_state
    assert out.shape == (1, 200, 32) and torch.isfinite(out).all()


def test_bert_is_bidirectional_after_conversion():
    """A change to the last token must reach the first position's output (encoder)."""
    model = hf_posenc.convert(tiny_model("bert"), PosEncConfig(kind="t5_bias"))
    randomize_position_tables(model)
    x = input_ids(1, 8)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 100 + 1
    with torch.no_grad():
        assert not torch.allclose(model(x).last_hidden_state[0, 0], model(y).last_hidden_state[0, 0])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_sliding_window_caches_match_no_cache(kind, backend):
    """Mistral with a 6-token window, generating past it: the dynamic cache crops keys and the static
    cache rolls them, so key positions must come from the cache length, not from slot indices."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=backend).eval()
    hf_posenc.convert(model, PosEncConfig(kind=kind, **({"layers": [1]} if kind == "rope" else {})))
    randomize_position_tables(model)
    assert_cache_equals_no_cache(model, input_ids(1, 5), 12)
