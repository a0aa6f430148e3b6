"""Attention temperature (``PosEncConfig(..., attention_temperature=...)``) against fp64 references of its two forms.

The references are written from the published formulas, not from :mod:`hf_posenc.temperature`:

* Llama 4 (transformers' ``modeling_llama4``, ``attn_temperature_tuning``): the query at position ``i`` is
  multiplied by ``attn_scale * ln(floor((i + 1) / floor_scale) + 1) + 1``.
* Qwen's LogN-scaling (Bai et al. 2023, https://arxiv.org/abs/2309.16609, §2.3; Qwen's ``logn_list``):
  ``log_L(i + 1)`` for ``i + 1 > L``, else 1.

Model level: a tiny Llama's logits equal the same weights in fp64 with a reference attention (rotation where the
layer has RoPE, scaled queries, causal softmax) written here. Every registered kind takes it (the matrix reads the
registry): cached decoding (dynamic and static) equals recomputing the sequence, and save/reload keeps it.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import converted, example_params, input_ids, randomize_position_tables, tiny_model, token_kinds
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig

LLAMA4 = {"type": "llama4", "floor_scale": 4, "attn_scale": 0.5}
LOG_N = {"type": "log_n", "length": 6}
THETA = 10000.0


def reference_factor(form: dict, position: int) -> float:
    """The factor of the query at 0-based position ``position``, from the formulas above (Python floats)."""
    if form["type"] == "llama4":
        return form["attn_scale"] * math.log(math.floor((position + 1) / form["floor_scale"]) + 1) + 1
    return math.log(position + 1, form["length"]) if position + 1 > form["length"] else 1.0


@pytest.mark.parametrize("form", [LLAMA4, LOG_N, {"type": "llama4"}])
def test_factors_match_the_published_formulas(form):
    temperature = PosEncConfig(kind="nope", attention_temperature=form).attention_temperature
    full = {"floor_scale": 8192, "attn_scale": 0.1, **form}  # Llama 4's defaults where not given
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 10, 50, 8190, 8191, 20000, 100000])
    expected = torch.tensor([reference_factor(full, int(p)) for p in positions], dtype=torch.float64)
    torch.testing.assert_close(temperature.factors(positions).double(), expected, rtol=1e-6, atol=0)


# --- fp64 reference model -----------------------------------------------------------------------------------------
class IdentityRotary(nn.Module):
    """Stands in for the Llama's rotary module: cos = 1, sin = 0 (the reference attention rotates itself)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, position_ids):
        shape = (*position_ids.shape, self.head_dim)
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)


def _rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al.), half layout: pair ``i`` with ``i + d/2`` at angle ``position * THETA^(-2i/d)``, fp64."""
    d = x.shape[-1]
    angles = positions.double()[:, None] * THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [n, d/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference_attention(rotated: set[int], scaled: set[int], form: dict):
    """An attention function (transformers' interface): fp64, RoPE on the ``rotated`` layers, the form's factor on
    the queries of the ``scaled`` layers, causal softmax (no cache, no padding)."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, H, T, D], key/value [B, Hkv, T, D]
        n = query.shape[2]
        positions = torch.arange(n)
        if module.layer_idx in rotated:
            query, key = _rotate(query, positions), _rotate(key, positions)
        if module.layer_idx in scaled:
            factors = torch.tensor([reference_factor(form, i) for i in range(n)], dtype=torch.float64)
            query = query * factors[:, None]
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        logits = query @ key.transpose(-1, -2) * scaling  # [B, H, T, T]
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return (logits.softmax(-1) @ value).transpose(1, 2), None

    return attend


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         initializer_range=0.15, rope_parameters={"rope_type": "default", "rope_theta": THETA})
    return LlamaForCausalLM(config).eval()


CASES = {  # PosEncConfig parameters, layers with RoPE, layers with the temperature
    "nope_llama4": (dict(kind="nope", attention_temperature=LLAMA4), set(), {0, 1}),
    "rope_log_n": (dict(kind="rope", attention_temperature=LOG_N), {0, 1}, {0, 1}),
    "rope_llama4_on_nope_layers": (dict(kind="rope", layers=[0], attention_temperature={**LLAMA4, "layers": "nope"}),
                                   {0}, {1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_the_fp64_reference(case):
    params, rotated, scaled = CASES[case]
    form = {**params["attention_temperature"]}
    ids = input_ids(batch=2, length=24)
    with torch.no_grad():
        ours = hf_posenc.convert(base_model(), PosEncConfig(**params))(ids).logits
        name = f"test_temperature_reference_{case}"
        AttentionInterface.register(name, reference_attention(rotated, scaled, form))
        reference = base_model().double()
        reference.model.rotary_emb = IdentityRotary(64 // 4)
        reference.set_attn_implementation(name)
        expected = reference(ids).logits
        without = hf_posenc.convert(base_model(), PosEncConfig(**{**params, "attention_temperature": None}))(ids).logits
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=2e-4)
    assert (ours - without).abs().max() > 1e-2  # the temperature is visible at these lengths


# --- every registered kind ----------------------------------------------------------------------------------------
def _greedy(model, prompt, **kwargs):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("kind", token_kinds())
def test_every_kind_takes_it_exactly_with_a_cache_and_through_save_and_reload(kind, tmp_path):
    """Prompt of 4 tokens, 10 new ones: the log-n factor starts past position 5. Cached decoding (dynamic, static)
    equals recomputing; the saved checkpoint reloads with the temperature and the same logits."""
    params = {**example_params(kind), "attention_temperature": LOG_N}
    model = converted("llama", backend="sdpa", **params)
    randomize_position_tables(model)
    prompt = input_ids(batch=2, length=4)
    expected_tokens, expected_logits = _greedy(model, prompt, use_cache=False)
    for kwargs in ({}, {"cache_implementation": "static"}):
        tokens, logits = _greedy(model, prompt, **kwargs)
        assert torch.equal(tokens, expected_tokens), kwargs
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=2e-5, msg=str(kwargs))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_posenc.posenc_of(reloaded) == hf_posenc.posenc_of(model)
    assert hf_posenc.posenc_of(reloaded).attention_temperature.to_dict() == {**LOG_N, "layers": "all"}
    ids = input_ids(batch=2, length=14)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        plain = converted("llama", backend="sdpa", **example_params(kind))
        randomize_position_tables(plain)
        assert (model(ids).logits - plain(ids).logits).abs().max() > 1e-5  # applied, whatever the kind (0 if not)


def test_revert_removes_it_and_the_record():
    model = converted("llama", "nope", backend="sdpa", attention_temperature=LOG_N)
    hf_posenc.revert(model)
    assert not any(hasattr(m, "posenc_temperature") for m in model.modules())
    ids = input_ids(length=14)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model("llama", "sdpa")(ids).logits, rtol=0, atol=0)


def test_a_rope_request_with_a_temperature_takes_the_plugin_and_native_true_is_refused():
    model = converted("llama", "rope", backend="sdpa", attention_temperature=LOG_N)
    assert type(model).__name__.startswith("HfPosenc")
    with pytest.raises(ValueError, match=r"invalid native=True"):
        converted("llama", "rope", backend="sdpa", native=True, attention_temperature=LOG_N)


@pytest.mark.parametrize("value,match", [
    ({"type": "tanh"}, r"invalid attention_temperature=\{'type': 'tanh'\}; allowed: None or a dict"),
    ({"type": "log_n"}, r"'length': the training length, an integer >= 2 \(required\)"),
    ({"type": "log_n", "length": 1.5}, r"'length': the training length"),
    ({"type": "llama4", "floor_scale": 0}, r"'floor_scale': a positive finite number"),
    ({"type": "llama4", "attn_scale": float("nan")}, r"'attn_scale': a positive finite number"),
    ({"type": "llama4", "length": 8}, r"keys \['attn_scale', 'floor_scale', 'layers'\] for type 'llama4'"),
    ({"type": "log_n", "length": 8, "layers": "odd"}, r"'layers': one of \['all', 'nope'\]"),
    ("log_n", r"allowed: None or a dict"),
])
def test_bad_values_fail_in_one_line_naming_the_allowed_values(value, match):
    with pytest.raises(ValueError, match=match) as error:
        PosEncConfig(kind="alibi", attention_temperature=value)
    assert "\n" not in str(error.value) and len(str(error.value)) <= 300
