"""Decoders without a row in ``ARCHITECTURES`` convert from a layout read off their module tree.

Three transformers decoders with stock half-split RoPE and their attention behind ``AttentionInterface``, none
of which has a row: Arcee (ReLU² MLP), Seed-OSS (q/k/v biases, head_dim != hidden/heads) and Ministral
(alternating sliding-window layers). Each conversion is checked against stock transformers alone, the cache
against no cache, and a saved checkpoint against its reload in a fresh process that only imports hf_posenc.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from test_persistence import run_python
from tiny_models import (
    _COMMON,
    _TOKENS,
    NOOP_KINDS,
    WINDOW,
    assert_cache_equals_no_cache,
    input_ids,
    randomize_position_tables,
    tiny_config,
)
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig
from hf_posenc.architectures import ARCHITECTURES, Architecture, architecture_of, lora_target_modules

_ALTERNATING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
ROWLESS = {
    "arcee": lambda: transformers.ArceeConfig(**_COMMON, num_key_value_heads=2, **_TOKENS),
    "seed_oss": lambda: transformers.SeedOssConfig(**_COMMON, num_key_value_heads=2, head_dim=16, attention_bias=True,
                                                   attention_dropout=0.0, residual_dropout=0.0, **_TOKENS),
    "ministral": lambda: transformers.MinistralConfig(**_COMMON, num_key_value_heads=2, head_dim=8, **_ALTERNATING,
                                                      **_TOKENS),
}
ARCHS = sorted(ROWLESS)


def rowless_model(arch: str, backend: str = "eager", seed: int = 0, **overrides):
    """A random tiny stock model in eval mode (fp32); the same seed gives the same weights."""
    config = ROWLESS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=backend).eval()


def stock_nope(model):
    """The stock model with zero rotary frequencies: cos=1, sin=0, the identity rotation."""
    with torch.no_grad():
        model.model.rotary_emb.inv_freq.zero_()
    return model


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def test_the_three_have_no_row_and_get_one_from_their_module_tree():
    for arch in ARCHS:
        config = ROWLESS[arch]()
        assert config.model_type == arch and arch not in ARCHITECTURES
        row = architecture_of(config)
        assert (row.model_type, row.layers, row.attention, row.rope, row.rope_layout) == (
            arch, "layers", "self_attn", "native", "half")
        assert lora_target_modules(config) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_rows_stay_authoritative(monkeypatch):
    assert architecture_of(tiny_config("llama")) is ARCHITECTURES["llama"]
    row = Architecture("arcee", layers="layers", attention="self_attn", rope="native", name="Arcee, by row")
    monkeypatch.setitem(ARCHITECTURES, "arcee", row)
    assert architecture_of(ROWLESS["arcee"]()) is row


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_rope_is_bitwise_native_and_reverts(arch):
    stock, model = rowless_model(arch), rowless_model(arch)
    hf_posenc.convert(model, PosEncConfig(kind="rope"))
    x = input_ids()
    assert type(model) is type(stock) and torch.equal(logits(model, x), logits(stock, x))
    hf_posenc.revert(model)
    assert torch.equal(logits(model, x), logits(stock, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_plug_in_rope_and_the_interleaved_layout_equal_stock(arch):
    """The plug-in rotation (attention-time, not the stock one) and the q/k row permutation to the interleaved
    layout both leave the stock logits unchanged: the inferred row names the right projections and layout."""
    x = input_ids()
    expected = logits(rowless_model(arch), x)
    plug_in = hf_posenc.convert(rowless_model(arch), PosEncConfig(kind="rope", native=False))
    assert type(plug_in).__name__.startswith("HfPosenc")
    torch.testing.assert_close(logits(plug_in, x), expected, rtol=1e-5, atol=1e-5)
    interleaved = hf_posenc.rope_layout(rowless_model(arch), "interleaved")
    assert not torch.equal(interleaved.model.layers[0].self_attn.q_proj.weight,
                           rowless_model(arch).model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(logits(interleaved, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", NOOP_KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_noop_encodings_equal_stock_nope(arch, kind):
    x = input_ids()
    expected = logits(stock_nope(rowless_model(arch)), x)
    got = logits(hf_posenc.convert(rowless_model(arch), PosEncConfig(kind=kind)), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_alibi_equals_stock_nope_with_an_alibi_mask(arch, backend):
    """Reference: stock eager attention without rotation, given the causal ALiBi bias as a 4-D additive mask
    (slopes 2^(-8h/H) of Press et al. for H = 4, written out here). A window longer than the input: the custom
    mask replaces stock's sliding-window mask."""
    window = dict(sliding_window=64) if arch == "ministral" else {}
    x = input_ids()
    length = x.shape[1]
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / 4) for h in range(4)])
    distance = torch.arange(length)[:, None] - torch.arange(length)[None]  # [q, kv]: i - j
    bias = -slopes[:, None, None] * distance  # [H, q, kv]
    bias = bias.masked_fill(distance < 0, torch.finfo(torch.float32).min)
    expected = logits(stock_nope(rowless_model(arch, **window)), x, attention_mask=bias.expand(x.shape[0], -1, -1, -1))
    model = hf_posenc.convert(rowless_model(arch, **window), PosEncConfig(kind="alibi"), attn_implementation=backend)
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)
    assert math.isclose(slopes[-1].item(), 2.0 ** -8)


GENERATE_KINDS = ["alibi", "cope", "t5_bias", "nope"]


@pytest.mark.parametrize("kind", GENERATE_KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_a_cache_equals_no_cache(arch, kind):
    """Greedy generation (5 + 10 tokens: past Ministral's window of 6) with a dynamic and a static cache equals
    generation without one, with random position tables."""
    model = hf_posenc.convert(rowless_model(arch, "sdpa"), PosEncConfig(kind=kind))
    randomize_position_tables(model)
    assert_cache_equals_no_cache(model, input_ids(1, 5), 10)


YARN = dict(kind="rope", rope_type="yarn", factor=2.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("arch", ARCHS)
def test_native_yarn_equals_a_stock_yarn_model(arch):
    x = input_ids(1, 40)
    model = hf_posenc.convert(rowless_model(arch), PosEncConfig(**YARN))
    params = {key: value for key, value in YARN.items() if key != "kind"}
    reference = rowless_model(arch, rope_parameters={**ROWLESS[arch]().rope_parameters, **params})
    assert type(model) is type(reference)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=1e-6)
    assert not torch.allclose(logits(model, x), logits(rowless_model(arch), x), atol=1e-4)


RELOAD = """
import json, sys, torch
import hf_posenc
from transformers import AutoModelForCausalLM
results = {}
for path in json.loads(sys.argv[1]):
    for route, kwargs in (("eager", {"attn_implementation": "eager"}), ("default", {})):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        with torch.no_grad():
            torch.save(model(torch.load(path + "/inputs.pt")).logits, path + f"/out-{route}.pt")
    results[path] = type(model).__name__
print("RESULTS", json.dumps(results))
"""
#: A plug-in kind per architecture (learned tables on two of them) and native YaRN on each.
SAVED = [("arcee", dict(kind="alibi")), ("seed_oss", dict(kind="cope")), ("ministral", dict(kind="t5_bias"))]
SAVED += [(arch, YARN) for arch in ARCHS]


def test_saved_checkpoints_reload_in_a_fresh_process(tmp_path):
    """``import hf_posenc`` alone registers ``hf_posenc_<type>`` of a rowless type when transformers first reads
    such a config: the reload runs the saved encoding, bit for bit."""
    x = input_ids()
    expected = {}
    for arch, params in SAVED:
        model = hf_posenc.convert(rowless_model(arch), PosEncConfig(**params))
        randomize_position_tables(model)
        path = tmp_path / f"{arch}-{params.get('rope_type', params['kind'])}"
        model.save_pretrained(path)
        torch.save(x, path / "inputs.pt")
        expected[str(path)] = (logits(model, x), params)
    result = run_python(f"import sys; sys.argv[1:] = [{json.dumps(list(expected))!r}]\n" + RELOAD)
    assert result.returncode == 0, result.stderr[-3000:]
    classes = json.loads(result.stdout.split("RESULTS ", 1)[1])
    for path, (out, params) in expected.items():
        config = json.loads(Path(path, "config.json").read_text())
        native = params is YARN
        assert config["model_type"].startswith("hf_posenc_") != native, path
        assert classes[path].startswith("HfPosenc") != native, (path, classes[path])
        assert torch.equal(torch.load(Path(path, "out-eager.pt")), out), path
        # transformers' default kernel (sdpa) as a user would load it: equal to rounding.
        torch.testing.assert_close(torch.load(Path(path, "out-default.pt")), out, rtol=1e-5, atol=1e-5)


UNREADABLE = {
    # q/k norms beside the projections: where they run relative to RoPE is not in the tree.
    "apertus": (lambda: transformers.ApertusConfig(**_COMMON, num_key_value_heads=2, **_TOKENS), "q_norm"),
    # Interleaved pairs behind a rotate_half of the same name: the probe of apply_rotary_pos_emb tells.
    "helium": (lambda: transformers.HeliumConfig(**_COMMON, num_key_value_heads=2, head_dim=8, **_TOKENS),
               "half-split RoPE"),
}


@pytest.mark.parametrize("arch", sorted(UNREADABLE))
def test_a_tree_that_cannot_be_read_unambiguously_is_refused(arch):
    make, missing = UNREADABLE[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make(), attn_implementation="eager")
    with pytest.raises(ValueError) as error:
        hf_posenc.convert(model, PosEncConfig(kind="alibi"))
    message = str(error.value)
    assert "\n" not in message and missing in message
    assert message.startswith(f"Unsupported architecture model_type={arch!r}; hf_posenc supports: [")
    assert "'llama'" in message and message.endswith("this one does not.")
    assert type(model).__name__ == type(model).__name__.removeprefix("HfPosenc")  # left unconverted
