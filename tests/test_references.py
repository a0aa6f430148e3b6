"""Encodings against independent references: the papers' equations and transformers' own functions."""

import math

import pytest
import torch
from tiny_models import ROPE_DECODERS, input_ids, tiny_config, tiny_model
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.t5.modeling_t5 import T5Attention

import hf_posenc
from hf_posenc import PosEncConfig
from hf_posenc.architectures import ARCHITECTURES
from hf_posenc.encodings import AlibiBias, RotaryPosition, alibi_slopes, relative_position_bucket


# --- ALiBi (Press et al. 2022, section 3) --------------------------------------------------------
def test_alibi_slopes_match_the_paper():
    # "For 8 heads the slopes are 1/2^1, 1/2^2, ..., 1/2^8"; for 16 heads 1/2^0.5 ... 1/2^8.
    assert torch.allclose(alibi_slopes(8).double(), torch.tensor([2.0 ** -(i + 1) for i in range(8)]).double())
    expected = torch.tensor([2.0 ** -(0.5 * (i + 1)) for i in range(16)])
    assert torch.allclose(alibi_slopes(16).double(), expected.double())
    # Non-power of two (the paper's code): 8-head slopes, then every other slope of the 16-head list.
    twelve = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 * (i + 1)) for i in range(16)][0::2][:4]
    assert torch.allclose(alibi_slopes(12).double(), torch.tensor(twelve).double())


def test_alibi_bias_is_minus_slope_times_distance():
    module = AlibiBias(num_heads=4)
    q_pos, k_pos = torch.arange(3, 6), torch.arange(6)
    bias = module.bias(q_pos, k_pos, causal=True)[0]  # [H, q, kv]
    for h, m in enumerate([0.25, 0.0625, 0.015625, 0.00390625]):
        for i in range(3):
            for j in range(6):
                if j <= i + 3:
                    assert bias[h, i, j].item() == pytest.approx(-m * (i + 3 - j))
    symmetric = module.bias(torch.arange(4), torch.arange(4), causal=False)[0]
    assert torch.allclose(symmetric, symmetric.transpose(-1, -2)) and symmetric[0, 0, 3].item() == pytest.approx(-0.75)


def test_alibi_attention_matches_a_manual_computation():
    """One GPT-2 layer's attention probabilities equal softmax(qk/sqrt(d) - m|i-j|) computed by hand."""
    model = hf_posenc.convert(tiny_model("gpt2", "eager"), PosEncConfig(kind="alibi"))
    attn = model.transformer.h[0].attn
    x = input_ids(1, 6)
    with torch.no_grad():
        out = model(x, output_attentions=True)
        hidden = model.transformer.h[0].ln_1(model.transformer.wte(x))  # no wpe after conversion
        q, k, _ = attn.c_attn(hidden).split(32, dim=2)
        q = q.view(1, 6, 4, 8).transpose(1, 2)
        k = k.view(1, 6, 4, 8).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        slopes = torch.tensor([2.0 ** -(2 * (h + 1)) for h in range(4)])
        distance = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).float()
        scores = scores - slopes[:, None, None] * distance
        scores = scores.masked_fill(distance < 0, float("-inf"))
    torch.testing.assert_close(out.attentions[0], scores.softmax(-1), rtol=1e-5, atol=1e-6)


# --- T5 buckets (Raffel et al. 2020) vs transformers' T5 ---------------------------------------
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_t5_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-300, 301)[None, :] + torch.zeros(3, 1, dtype=torch.long)
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)


# --- RoPE variants vs transformers' ROPE_INIT_FUNCTIONS --------------------------------------------
VARIANTS = {
    "linear": dict(factor=4.0),
    "dynamic": dict(factor=4.0),
    "yarn": dict(factor=4.0, beta_fast=32.0, beta_slow=1.0),
    "llama3": dict(factor=8.0, original_max_position_embeddings=32, low_freq_factor=1.0, high_freq_factor=4.0),
    "longrope": dict(short_factor=[1.0, 1.5, 2.0, 2.5], long_factor=[2.0, 3.0, 4.0, 5.0],
                     original_max_position_embeddings=32),
}


@pytest.mark.parametrize("rope_type", list(VARIANTS))
def test_native_variants_use_stock_frequencies(rope_type):
    # native=True: dynamic and longrope take the plug-in by default (their stock form is stateful).
    posenc = PosEncConfig(kind="rope", rope_type=rope_type, native=True, **VARIANTS[rope_type])
    model = hf_posenc.convert(tiny_model("llama"), posenc)
    config = model.config
    expected, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    assert torch.equal(model.model.rotary_emb.inv_freq, expected)
    assert model.model.rotary_emb.attention_scaling == scaling
    assert config.rope_parameters["rope_theta"] == 10000.0  # never dropped


@pytest.mark.parametrize("rope_type", list(VARIANTS))
def test_plugin_rotary_frequencies_match_stock(rope_type):
    """The in-attention RoPE (GPT-2, BERT, hybrids) takes its frequencies from ROPE_INIT_FUNCTIONS too."""
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": rope_type, "rope_theta": 10000.0, **VARIANTS[rope_type]}
    config.standardize_rope_params()
    module = RotaryPosition(dict(config.rope_parameters), 8, config.max_position_embeddings)
    for seq_len in (16, 1000):  # below and above the original context (dynamic / longrope switch)
        ours, our_scaling = module.frequencies(seq_len, torch.device("cpu"))
        kwargs = {"seq_len": seq_len} if seq_len > config.max_position_embeddings else {}
        theirs, their_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0)
        assert our_scaling == pytest.approx(their_scaling)


@pytest.mark.parametrize("arch", ROPE_DECODERS)
@pytest.mark.parametrize("rope_type", ["default", "yarn"])
def test_layout_conversion_keeps_logits_and_round_trips(arch, rope_type):
    params = {"rope_type": rope_type, **({"factor": 2.0} if rope_type == "yarn" else {})}
    reference = hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="rope", **params))
    model = hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="rope", **params))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    own = ARCHITECTURES[arch].rope_layout
    other = "half" if own == "interleaved" else "interleaved"
    assert hf_posenc.posenc_of(model).layout == own  # no layout requested: the architecture's own
    x = input_ids()
    with torch.no_grad():
        expected = reference(x).logits
        hf_posenc.rope_layout(model, other)
        assert hf_posenc.posenc_of(model).layout == other
        assert any(not torch.equal(original[k], v) for k, v in model.state_dict().items())
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
        hf_posenc.rope_layout(model, own)
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    for key, value in original.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_interleaved_rotation_pairs_adjacent_dimensions():
    """GPT-J layout: dimension 2i and 2i+1 rotate together by angle pos * theta^(-2i/d)."""
    module = RotaryPosition({"rope_type": "default", "rope_theta": 100.0}, 4, 64, layout="interleaved")
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    rotated, _ = module.rotate(x, x, torch.tensor([3]), torch.tensor([3]))
    a0, a1 = 3.0, 3.0 / 10.0  # theta^(-0/4) = 1, theta^(-2/4) = 0.1
    expected = torch.tensor([math.cos(a0), math.sin(a0), -math.sin(a1), math.cos(a1)])
    torch.testing.assert_close(rotated.flatten(), expected)


def test_rope_on_gpt2_is_relative():
    """RoPE added to GPT-2: shifting every position by the same offset (left pads) changes nothing."""
    model = hf_posenc.convert(tiny_model("gpt2"), PosEncConfig(kind="rope"))
    attn = model.transformer.h[0].attn.posenc
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 4, 5, 8)
    pos = torch.arange(5)
    q1, k1 = attn.rotate(q, k, pos, pos)
    q2, k2 = attn.rotate(q, k, pos + 7, pos + 7)
    torch.testing.assert_close(q1 @ k1.transpose(-1, -2), q2 @ k2.transpose(-1, -2), rtol=1e-5, atol=1e-5)


def test_dynamic_rope_at_attention_time_keeps_cache_consistent_past_the_context():
    """Plug-in RoPE rotates cached keys at attention time, so dynamic NTK scaling applies one scale to all
    keys: generating past max_position_embeddings (128) with a cache equals recomputing without one
    (stock dynamic RoPE caches keys rotated under older scales)."""
    model = hf_posenc.convert(tiny_model("gpt2"), PosEncConfig(kind="rope", rope_type="dynamic", factor=2.0))
    prompt = input_ids(1, 120)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))
    module = model.transformer.h[0].attn.posenc
    short, _ = module.frequencies(100, torch.device("cpu"))
    long, _ = module.frequencies(200, torch.device("cpu"))
    assert not torch.equal(short, long)  # the scale did change on the way
