"""Contextual RoPE (issue 10, part 2): the equations against the attention functions, then the model.

The reference below is written from the equations alone, in fp64: widths ``2 sigmoid(k_j . u_h)``, positions
as their running sum, RoPE pair by pair with explicit cos/sin of ``position * inv_freq``, a masked softmax.
No code of the module is used. The model matrix (caches, padding, persistence, PEFT, dtypes, generation
features) takes the kind from the registry in the shared test files.
"""

import pytest
import torch
import yaml
from peft import get_peft_model
from tiny_models import ROPE_ARCHS, input_ids, stock_backend, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig, attention
from hf_posenc.encodings.contextual_rope import ContextualRope

ROPE = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
HEAD_DIM, HEADS, KV_HEADS = 16, 4, 2


# ---------------------------------------------------------------------------------------------------
# The equations, dense, in fp64
# ---------------------------------------------------------------------------------------------------
def reference_rotation(x, positions, inv_freq, scaling, rotary_dim, layout):
    """RoPE from its definition: pair ``m`` (dims ``m, m + r/2``, or ``2m, 2m + 1`` interleaved) turned by
    ``positions * inv_freq[m]``, times the cos/sin factor; dims past ``rotary_dim`` pass.

    Args:
        x: ``[B, H, n, D]``; positions: ``[B, H, n]``.
    """
    half = rotary_dim // 2
    pairs = [(m, m + half) if layout == "half" else (2 * m, 2 * m + 1) for m in range(half)]
    columns = list(x.unbind(-1))
    for m, (a, b) in enumerate(pairs):
        angle = positions * inv_freq[m]
        cos, sin = angle.cos() * scaling, angle.sin() * scaling
        columns[a], columns[b] = x[..., a] * cos - x[..., b] * sin, x[..., b] * cos + x[..., a] * sin
    return torch.stack(columns, -1)


def reference_attention(query, key, value, u, first, q_index, allowed, scale, inv_freq, scaling, rotary_dim, layout):
    """Attention with RoPE at contextual positions.

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, Hkv, kv, D]`` (unrotated); u: ``[Hkv, D]``.
        first: Cache index of the first key; q_index: ``[q]`` key index of each query's own token.
        allowed: Bool ``[B, q, kv]``.
    """
    groups = query.shape[1] // key.shape[1]
    widths = 2 * torch.sigmoid(torch.einsum("bhnd,hd->bhn", key, u))  # [B, Hkv, kv]
    positions = first + widths.cumsum(-1) - 1  # with every width 1: first, first + 1, ...
    positions = positions.repeat_interleave(groups, 1)  # query head h reads KV head h // groups
    q_rot = reference_rotation(query, positions[..., q_index], inv_freq, scaling, rotary_dim, layout)
    k_rot = reference_rotation(key.repeat_interleave(groups, 1), positions, inv_freq, scaling, rotary_dim, layout)
    scores = (q_rot @ k_rot.transpose(-1, -2) * scale).masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ value.repeat_interleave(groups, 1)


def module_for(rope, layout, dtype=torch.float64, seed=0):
    module = ContextualRope(dict(rope), HEAD_DIM, 16, layout, num_key_value_heads=KV_HEADS).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from zero: widths spread over (0, 2)
        module.width_direction.copy_(torch.randn(KV_HEADS, HEAD_DIM, generator=generator, dtype=dtype))
    return module


def layer_with(module):
    layer = torch.nn.Module()
    layer.is_causal, layer.posenc = True, module
    return layer


def frequencies(module, rope):
    """The table the reference rotates with: the module's (that it is the model's own, bitwise, is tested
    below), checked against theta^(-2m/r) by hand for default RoPE."""
    inv_freq, scaling = module.frequencies(16, torch.device("cpu"))
    rotary_dim = int(HEAD_DIM * rope.get("partial_rotary_factor", 1.0))
    if rope["rope_type"] == "default":
        m = torch.arange(rotary_dim // 2, dtype=torch.float64)
        torch.testing.assert_close(inv_freq.double(), rope["rope_theta"] ** (-2 * m / rotary_dim), rtol=1e-6, atol=0)
        assert scaling == 1.0
    else:
        assert scaling != 1.0  # YaRN's attention factor: the reference must apply it too
    return inv_freq.double(), scaling, rotary_dim


#: (queries, live keys, key buffer): prefill; queries after a dynamic cache; a StaticCache buffer with
#: empty (zero) slots after the live keys.
SHAPES = {"prefill": (18, 18, 18), "cache": (3, 20, 20), "static": (3, 20, 26)}


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rope", [ROPE, YARN], ids=["default_partial", "yarn"])
def test_attention_matches_the_equations(rope, layout, shape, dtype, backend):
    """Output and gradients (q, k, v and u) of our attention functions against the fp64 reference, at
    nonzero u; GQA (4 query heads on 2 KV heads), partial rotary, YaRN's cos/sin factor, a left-padded row."""
    q_len, live, buffer = SHAPES[shape]
    module = module_for(rope, layout)
    generator = torch.Generator().manual_seed(1)
    make = lambda h, n: torch.randn(2, h, n, HEAD_DIM, generator=generator, dtype=torch.float64)  # noqa: E731
    query, key, value = make(HEADS, q_len), make(KV_HEADS, live), make(KV_HEADS, live)
    past = live - q_len
    q_index = torch.arange(past, live)
    pads = 4  # row 1: its first keys are padding
    allowed = (torch.arange(live)[None, None, :] <= q_index[None, :, None]).repeat(2, 1, 1)  # [B, q, kv]
    allowed[1, :, :pads] = False
    # A query that is itself a pad sees only itself (no row may be empty: its softmax would be undefined).
    allowed[1] |= torch.eye(live, dtype=torch.bool)[q_index] & ~allowed[1].any(-1, keepdim=True)
    scale = HEAD_DIM**-0.5
    inv_freq, scaling, rotary_dim = frequencies(module, rope)

    u = module.width_direction.detach().clone().requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (query, key, value)]
    expected = reference_attention(*leaves, u, 0.0, q_index, allowed, scale, inv_freq, scaling, rotary_dim, layout)
    grad_out = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, [*leaves, u], grad_out)

    module = module.to(dtype)
    ours = [t.clone().to(dtype).requires_grad_() for t in (query, key, value)]
    k_in, v_in = ours[1], ours[2]
    mask = allowed
    if buffer > live:  # the StaticCache buffer: zero slots after the live keys, masked
        empty = torch.zeros(2, KV_HEADS, buffer - live, HEAD_DIM, dtype=dtype)
        k_in, v_in = torch.cat((k_in, empty), 2), torch.cat((v_in, empty), 2)
        mask = torch.cat((allowed, torch.zeros(2, q_len, buffer - live, dtype=torch.bool)), -1)
    if backend == "eager":  # transformers' eager masks are additive floats
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    function = attention.posenc_eager_attention if backend == "eager" else attention.posenc_sdpa_attention
    got, _ = function(layer_with(module), ours[0], k_in, v_in, mask[:, None], scaling=scale, posenc_past=past)
    got = got.transpose(1, 2)  # [B, H, q, D]
    got_grads = torch.autograd.grad(got, [*ours, module.width_direction], grad_out.to(dtype))
    # fp64 sdpa is fp64 throughout; eager's softmax runs in fp32 whatever the input (as stock eager does).
    exact = dtype == torch.float64 and backend == "sdpa"
    tol = dict(rtol=0, atol=1e-10) if exact else dict(rtol=0, atol=1e-6 if dtype == torch.float64 else 3e-5)
    torch.testing.assert_close(got.double(), expected, **tol)
    for name, ours_grad, theirs in zip(("q", "k", "v", "u"), got_grads, expected_grads):
        torch.testing.assert_close(ours_grad.double(), theirs, **tol, msg=lambda m, name=name: f"d{name}: {m}")


def test_the_widths_really_move_the_positions():
    """Guards the reference test: at its u the attention is far from plain RoPE's (u = 0)."""
    moved, plain = module_for(ROPE, "half"), module_for(ROPE, "half")
    with torch.no_grad():
        plain.width_direction.zero_()
    q, k, v = (torch.randn(1, h, 30, HEAD_DIM, dtype=torch.float64) for h in (HEADS, KV_HEADS, KV_HEADS))
    a, _ = attention.posenc_sdpa_attention(layer_with(moved), q, k, v, None)
    b, _ = attention.posenc_sdpa_attention(layer_with(plain), q, k, v, None)
    assert (a - b).abs().max() > 1e-2
    widths, positions = moved.positions(k, torch.arange(30))
    assert widths.min() < 0.5 and widths.max() > 1.5  # the reference's widths span (0, 2)
    assert torch.equal(plain.positions(k, torch.arange(30) + 7)[1], (torch.arange(30.0) + 7).expand(1, 2, 30).double())


def test_backward_keeps_no_unrotated_copy_or_per_head_table():
    """Memory: what the rotation keeps for backward is its two outputs (the kernel keeps them anyway) and
    ``[B, Hkv, kv]`` widths and positions; no unrotated key, no cos/sin."""
    module = module_for(ROPE, "half", torch.float32)
    length = 256
    q = torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=True)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q_rot, k_rot = module.rotate(q, k, torch.arange(length), torch.arange(length))
    big = [t for t in saved if t.numel() > KV_HEADS * length]
    assert sorted(t.data_ptr() for t in big) == sorted((q_rot.data_ptr(), k_rot.data_ptr()))


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def outputs(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def identity_cases():
    return [(arch, backend) for arch in ROPE_ARCHS for backend in sorted({"eager", stock_backend(arch, "sdpa")})]


@pytest.mark.parametrize("arch,backend", identity_cases())
def test_conversion_equals_the_models_own_rope(arch, backend):
    """u = 0 at conversion: every width is 1, the positions are the stock ones and the logits the stock
    model's (max abs diff <= 1e-5) on every RoPE architecture; a nonzero u changes them by more."""
    # Soft-capping rows (Gemma 2) against stock eager: stock sdpa of older transformers drops the soft-cap
    # (5.5: stock eager and stock sdpa differ by 1.59 on this config), ours applies it on both backends.
    softcaps = getattr(tiny_config(arch), "attn_logit_softcapping", None)
    stock = tiny_model(arch, "eager" if softcaps else backend)
    model = hf_posenc.convert(tiny_model(arch, backend), PosEncConfig(kind="contextual_rope"),
                              attn_implementation=backend)
    x = input_ids(2, 20)
    with torch.no_grad():
        expected = outputs(stock, x)
        assert (outputs(model, x) - expected).abs().max() <= 1e-5
        for name, param in model.named_parameters():
            if name.endswith("width_direction"):  # large: the tiny models' keys are small
                param.normal_(std=100.0)
        assert (outputs(model, x) - expected).abs().max() > 1e-5


def test_rotation_uses_the_models_own_frequencies_and_scaling():
    """Any rope_type: the module's inverse frequencies and cos/sin factor are the model's own (bitwise), and
    a partial rotary model rotates only its rotary dimensions."""
    config = tiny_config("llama")
    config.rope_parameters = {**YARN, "original_max_position_embeddings": 64}
    stock = AutoModelForCausalLM.from_config(config)
    model = hf_posenc.convert(AutoModelForCausalLM.from_config(config), PosEncConfig(kind="contextual_rope"))
    module = model.model.layers[0].self_attn.posenc
    inv_freq, scaling = module.frequencies(16, torch.device("cpu"))
    assert torch.equal(inv_freq, stock.model.rotary_emb.inv_freq)
    assert scaling == stock.model.rotary_emb.attention_scaling != 1.0
    assert module.width_direction.shape == (config.num_key_value_heads, config.head_dim)
    phi = hf_posenc.convert(tiny_model("phi"), PosEncConfig(kind="contextual_rope"))
    assert phi.model.layers[0].self_attn.posenc.rotary_dim == tiny_model("phi").model.rotary_emb.inv_freq.numel() * 2


def test_lora_moves_the_widths_and_the_loss_falls():
    """20 LoRA steps with hf_posenc.lora_config (posenc in modules_to_save): u leaves zero, the widths leave
    1, and the loss falls."""
    from test_peft import train

    base = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(kind="contextual_rope"))
    config = hf_posenc.lora_config(base, r=4, alpha=8)
    assert "posenc" in config.modules_to_save
    model, losses = train(get_peft_model(base, config), steps=20)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses
    trained = [p for n, p in model.named_parameters() if n.endswith("width_direction") and "modules_to_save" in n]
    assert len(trained) == tiny_config("llama").num_hidden_layers
    key = torch.randn(1, KV_HEADS, 50, 8)
    for direction in trained:
        assert direction.abs().max() > 1e-3
        widths = 2 * torch.sigmoid(torch.einsum("bhnd,hd->bhn", key, direction.detach()))
        assert (widths - 1).abs().max() > 1e-3


def test_generation_with_trained_widths_follows_its_positions():
    """Nonzero u: greedy decoding with a dynamic, a static and a cropped cache gives the no-cache tokens (the
    positions are recomputed from the cached keys every step)."""
    from transformers import DynamicCache

    model = hf_posenc.convert(tiny_model("qwen3", "sdpa"), PosEncConfig(kind="contextual_rope"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("width_direction"):
                param.normal_(std=2.0)
    prompt = input_ids(1, 6)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        expected = model.generate(prompt, use_cache=False, **kwargs)
        assert torch.equal(model.generate(prompt, **kwargs), expected)
        assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), expected)
        cache = DynamicCache(config=model.config)
        model(expected[:, :12], **hf_posenc._hf.cache_kwargs(model, cache), use_cache=True)
        cache.crop(-4)  # back to 8 tokens: the next logits are those of the 9-token prefix
        step = model(expected[:, 8:9], **hf_posenc._hf.cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, model(expected[:, :9]).logits[:, -1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Rules and configs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_models_without_rope_are_refused(arch):
    with pytest.raises(ValueError, match=rf"kind='contextual_rope'\) cannot be applied to {arch!r}: the model has "
                                         r"no RoPE to extend .*allowed: architectures with RoPE "
                                         r"\(llama, .*modernbert\)"):
        hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="contextual_rope"))


def test_bad_parameters_name_the_field_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"kind='contextual_rope'\): invalid layers=.*allowed: None"):
        PosEncConfig(kind="contextual_rope", layers=[0])
    with pytest.raises(ValueError, match="unknown parameter"):
        PosEncConfig(kind="contextual_rope", width=2.0)


def test_flash_attention_backend_is_refused():
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' cannot express .*"
                                         r"allowed: \['eager', 'flex_attention', 'sdpa'\]"):
        hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="contextual_rope"),
                          attn_implementation="flash_attention_2")


def test_keys_with_other_head_counts_are_refused():
    module = module_for(ROPE, "half", torch.float32)
    q, k = torch.randn(1, HEADS, 5, HEAD_DIM), torch.randn(1, HEADS, 5, HEAD_DIM)
    with pytest.raises(ValueError, match=r"2 key/value heads but attention received keys with 4 heads"):
        module.rotate(q, k, torch.arange(5), torch.arange(5))


def test_native_nope_layers_stay_nope():
    model = hf_posenc.convert(tiny_model("smollm3"), PosEncConfig(kind="contextual_rope"))
    nope = {i for i, v in enumerate(model.config.no_rope_layers) if v == 0}
    layers = enumerate(model.model.layers)
    assert nope and all(hasattr(layer.self_attn, "posenc") == (i not in nope) for i, layer in layers)


def test_a_comparison_variant_validates(tmp_path):
    from hf_posenc.experiments.config import load_config
    from hf_posenc.experiments.context_extension.config import CompareConfig

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"variants": [{"name": "contextual", "posenc": {"kind": "contextual_rope"}}]}))
    assert load_config(CompareConfig, path).variants[0].posenc == PosEncConfig(kind="contextual_rope")
