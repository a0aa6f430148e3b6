"""Self-Extend and ReRoPE (issue 10): the paper equations against the kernel, then the model matrix.

The references below are written from the papers' distance rules alone: a dense fp64 ``[q, kv]``
relative-distance matrix, each query rotated by its pair's distance (``R(a)^T R(b) = R(b - a)``, so the
score of a pair is ``(R(d_ij) q_i) . k_j``), a masked softmax. No code of the kernel is used.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import ROPE_DECODERS, input_ids, stock_backend, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig, kernels
from hf_posenc.encodings.rerope import ReRoPE
from hf_posenc.encodings.self_extend import SelfExtend
from hf_posenc.kernels import two_position as two_position_kernels

#: The RoPE architectures the issue names; the tiny configs cover GQA, q/k norms and partial rotary.
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi", "gpt_neox"]
#: Small windows, so that the tiny tests' 5-20 tokens reach the far regime.
VARIANTS = {
    "self_extend": dict(kind="self_extend", group_size=2, neighbor_window=3),
    "rerope": dict(kind="rerope", window=3),
    "leaky_rerope": dict(kind="rerope", window=3, leak=2.0),
}


def converted(arch, variant, backend="sdpa", **overrides):
    backend = stock_backend(arch, backend)  # Gemma 2: eager (stock sdpa cannot soft-cap)
    model = tiny_model(arch, backend)
    return hf_posenc.convert(model, PosEncConfig(**{**VARIANTS[variant], **overrides}), attn_implementation=backend)


# ---------------------------------------------------------------------------------------------------
# The papers' distances, dense, in fp64
# ---------------------------------------------------------------------------------------------------
def self_extend_distance(i, j, group_size, neighbor_window):
    """Jin et al. 2024, eq. of section 3: exact inside the neighbour window, grouped and shifted beyond."""
    grouped = i // group_size - j // group_size + neighbor_window - neighbor_window // group_size
    return torch.where(i - j < neighbor_window, i - j, grouped)


def rerope_distance(i, j, window, leak=None):
    """Su 2023: exact below the window; the window itself beyond (or w + (d - w) / k, Leaky ReRoPE)."""
    d = i - j
    far = torch.full_like(d, window) if leak is None else window + (d - window) / leak
    return torch.where(d < window, d, far)


def rotate_pairs(x, angles):
    """Half layout: dimension m pairs with m + r/2; ``angles`` ``[..., r/2]``."""
    half = angles.shape[-1]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()), -1)


def reference_attention(query, key, value, distance, allowed, scale, inv_freq, rope_scaling, rotary_dim):
    """Dense fp64 attention with RoPE at per-pair distances.

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, H, kv, D]`` (unrotated).
        distance: ``[B, q, kv]`` fp64 relative distances.
        allowed: Bool ``[B, q, kv]``.
        inv_freq: ``[rotary_dim / 2]`` fp64; rope_scaling: the cos/sin factor (YaRN's attention factor).
    """
    angles = distance[:, None, :, :, None] * inv_freq  # [B, 1, q, kv, r/2]
    q_rot = rotate_pairs(query[..., :rotary_dim][:, :, :, None, :], angles)  # [B, H, q, kv, r]
    scores = (q_rot * key[..., :rotary_dim][:, :, None]).sum(-1) * rope_scaling**2
    scores = scores + query[..., rotary_dim:] @ key[..., rotary_dim:].transpose(-1, -2)
    # The dtype's minimum, not -inf: a fully padded row stays finite (its output is not compared).
    scores = (scores * scale).masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    return scores.softmax(-1) @ value


ROPE = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}


def frequencies(module, params, head_dim):
    """The frequency table the reference rotates with: the module's (fp32; that it is the model's own,
    bitwise, is tested below), checked against theta^(-2m/r) by hand for default RoPE."""
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq, scaling = module.frequencies(32, torch.device("cpu"))
    if params["rope_type"] == "default":
        m = torch.arange(rotary_dim // 2, dtype=torch.float64)
        torch.testing.assert_close(inv_freq.double(), params["rope_theta"] ** (-2 * m / rotary_dim), rtol=1e-6, atol=0)
        assert scaling == 1.0
    return inv_freq.double(), scaling, rotary_dim


CASES = [
    # (module, distance rule, rope params)
    ("self_extend", lambda: dict(group_size=3, neighbor_window=5), ROPE),
    ("self_extend", lambda: dict(group_size=4, neighbor_window=2), YARN),
    ("rerope", lambda: dict(window=7), ROPE),
    ("rerope", lambda: dict(window=4, leak=3.0), YARN),
]


def two_position(module, query, key, value, q_pos, k_pos, allowed, scaling, position_ids=None, explicit=False):
    """The two-position kernel (tiled, or explicit scores) on a call at cache positions ``q_pos``, ``k_pos``."""
    call = kernels.Call(
        device=query.device.type, dtype=query.dtype, backend="sdpa", queries=query.shape[2], query=query, key=key,
        value=value, attention_mask=allowed, q_pos=q_pos, k_pos=k_pos, past=int(q_pos[0]), scaling=scaling,
        posenc=module, capabilities=module.registry_entry().capabilities, position_ids=position_ids)
    return kernels.KERNELS["two_position_explicit" if explicit else "two_position_tiled"](call)


def build(kind, params, rope, head_dim):
    cls = SelfExtend if kind == "self_extend" else ReRoPE
    return cls(dict(rope), head_dim, 32, "half", **params)


def distance_of(kind, params, i, j):
    if kind == "self_extend":
        return self_extend_distance(i, j, params["group_size"], params["neighbor_window"])
    return rerope_distance(i, j, params["window"], params.get("leak"))


@pytest.mark.parametrize("path", ["kernel", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("q_len,kv_len", [(70, 70), (3, 75)])  # prefill, and queries after a cache
@pytest.mark.parametrize("case", range(len(CASES)))
def test_attention_matches_the_papers_equations(monkeypatch, case, q_len, kv_len, dtype, path):
    """Forward and gradients of q/k/v against the dense fp64 reference; padded rows (position_ids from the
    mask, as generate makes them), GQA (4 query heads on 2 key heads), partial rotary, YaRN's scaling."""
    monkeypatch.setattr(two_position_kernels, "TILE_ROWS", 16)  # several tiles, edges included
    kind, params, rope = CASES[case][0], CASES[case][1](), CASES[case][2]
    head_dim, batch, heads, kv_heads, pads = 16, 2, 4, 2, 6
    module = build(kind, params, rope, head_dim)
    generator = torch.Generator().manual_seed(case)
    make = lambda h, n: torch.randn(batch, h, n, head_dim, generator=generator, dtype=torch.float64)  # noqa: E731
    query, key, value = make(heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)
    q_pos, k_pos = torch.arange(kv_len - q_len, kv_len), torch.arange(kv_len)
    # Row 1 is left-padded by `pads` tokens: its model positions start after them.
    offsets = torch.tensor([0, pads])
    real = k_pos[None, :] >= offsets[:, None]  # [B, kv]
    allowed = (k_pos[None, None, :] <= q_pos[None, :, None]) & real[:, None, :]  # [B, q, kv]
    position_ids = q_pos[None] - offsets[:, None]
    scale = head_dim**-0.5

    inv_freq, rope_scaling, rotary_dim = frequencies(module, rope, head_dim)
    i = (q_pos[None, :, None] - offsets[:, None, None]).double()
    j = (k_pos[None, None, :] - offsets[:, None, None]).double()
    distance = distance_of(kind, params, i, j)  # [B, q, kv]
    leaves = [t.clone().requires_grad_() for t in (query, key, value)]
    expected = reference_attention(leaves[0], leaves[1].repeat_interleave(2, 1), leaves[2].repeat_interleave(2, 1),
                                   distance, allowed, scale, inv_freq, rope_scaling, rotary_dim)
    grad_out = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    grad_out[1, :, : max(0, pads - (kv_len - q_len))] = 0  # fully padded query rows have no defined output
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    ours = [t.clone().to(dtype).requires_grad_() for t in (query, key, value)]
    got, _ = two_position(module, *ours, q_pos, k_pos, allowed[:, None], scale, position_ids=position_ids,
                          explicit=path == "explicit")
    got_grads = torch.autograd.grad(got, ours, grad_out.to(dtype))
    tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=0, atol=2e-5)
    rows = torch.ones(batch, 1, q_len, 1, dtype=torch.bool)
    rows[1, :, : max(0, pads - (kv_len - q_len))] = False
    torch.testing.assert_close(torch.where(rows, got.double(), 0), torch.where(rows, expected, 0), **tol)
    for name, ours_grad, theirs in zip("qkv", got_grads, expected_grads):
        torch.testing.assert_close(ours_grad.double(), theirs, **tol, msg=lambda m, name=name: f"d{name}: {m}")


def test_the_far_regime_really_differs_from_rope():
    """Guards the reference test: with these windows the far keys change the attention."""
    module = SelfExtend(dict(ROPE), 16, 32, group_size=3, neighbor_window=5)
    plain = SelfExtend(dict(ROPE), 16, 32, group_size=3, neighbor_window=100)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    pos = torch.arange(40)
    a, _ = two_position(module, q, k, v, pos, pos, None, 0.25)
    b, _ = two_position(plain, q, k, v, pos, pos, None, 0.25)
    assert (a - b).abs().max() > 1e-2


def test_no_full_score_matrix_is_kept_for_backward():
    """Memory bound: what autograd keeps is O(T * D) (rotated q/k, v, output, row lse), not O(T^2)."""
    module = ReRoPE(dict(ROPE), 16, 32, window=64)
    length = 1024
    q, k, v = (torch.randn(1, 2, length, 16, requires_grad=True) for _ in range(3))
    saved = []
    pos = torch.arange(length)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out, _ = two_position(module, q, k, v, pos, pos, None, 0.25)
    out.sum().backward()
    assert max(saved) <= 2 * length * 16  # the largest saved tensor is one [B, H, T, D]


# ---------------------------------------------------------------------------------------------------
# Configs and conversion rules
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,params,field", [
    ("self_extend", dict(group_size=0), "group_size"),
    ("self_extend", dict(group_size=2.5), "group_size"),
    ("self_extend", dict(neighbor_window=-1), "neighbor_window"),
    ("self_extend", dict(layers=[0]), "layers"),
    ("rerope", dict(window=0), "window"),
    ("rerope", dict(leak=1.0), "leak"),
    ("rerope", dict(leak=float("inf")), "leak"),
])
def test_bad_parameters_name_the_field_and_the_allowed_values(kind, params, field):
    with pytest.raises(ValueError, match=rf"kind={kind!r}\): invalid {field}=.*allowed: "):
        PosEncConfig(kind=kind, **params)
    with pytest.raises(ValueError, match="unknown parameter"):
        PosEncConfig(kind=kind, factor=2.0)


@pytest.mark.parametrize("kind", ["self_extend", "rerope"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_models_without_rope_are_refused(kind, arch):
    with pytest.raises(ValueError, match=rf"kind={kind!r}\) cannot be applied to {arch!r}: the model has no RoPE "
                                         r"to extend .*allowed: causal architectures with RoPE \(llama, "):
        hf_posenc.convert(tiny_model(arch), PosEncConfig(kind=kind))


@pytest.mark.parametrize("kind", ["self_extend", "rerope"])
def test_encoders_are_refused(kind):
    with pytest.raises(ValueError, match=r"is causal-only \(.*\) and cannot be applied to the encoder 'modernbert'; "
                                         r"allowed kinds on encoders: rope, nope, alibi, t5_bias"):
        hf_posenc.convert(tiny_model("modernbert"), PosEncConfig(kind=kind))


@pytest.mark.parametrize("kind", ["self_extend", "rerope"])
def test_flash_attention_backend_is_refused(kind):
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' cannot express .*"
                                         r"allowed: \['eager', 'flex_attention', 'sdpa'\]"):
        hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind=kind), attn_implementation="flash_attention_2")


def test_rotation_uses_the_models_own_frequencies_and_scaling():
    """Any rope_type: the module's inverse frequencies and cos/sin factor are the model's own (bitwise)."""
    config = tiny_config("llama")
    config.rope_parameters = {**YARN, "original_max_position_embeddings": 64}
    stock = AutoModelForCausalLM.from_config(config)
    model = hf_posenc.convert(AutoModelForCausalLM.from_config(config), PosEncConfig(kind="self_extend"))
    module = model.model.layers[0].self_attn.posenc
    inv_freq, scaling = module.frequencies(16, torch.device("cpu"))
    assert torch.equal(inv_freq, stock.model.rotary_emb.inv_freq)
    assert scaling == stock.model.rotary_emb.attention_scaling != 1.0
    phi = hf_posenc.convert(tiny_model("phi"), PosEncConfig(kind="rerope"))
    assert phi.model.layers[0].self_attn.posenc.rotary_dim == tiny_model("phi").model.rotary_emb.inv_freq.numel() * 2


# ---------------------------------------------------------------------------------------------------
# The model matrix
# ---------------------------------------------------------------------------------------------------
def identity_cases():
    """Both backends on the named architectures, the stock-supported one on every other RoPE decoder."""
    return [(arch, kind, backend) for arch in ROPE_DECODERS for kind in ("self_extend", "rerope")
            for backend in (("eager", "sdpa") if arch in ARCHS else (stock_backend(arch, "sdpa"),))]


@pytest.mark.parametrize("arch,kind,backend", identity_cases())
def test_windows_beyond_the_sequence_equal_the_models_own_rope(arch, kind, backend):
    """W (or w) >= length: every key is near, so the logits are stock RoPE's (max abs diff <= 1e-5);
    small windows do change them."""
    # Soft-capping rows (Gemma 2) against stock eager: stock sdpa of older transformers drops the soft-cap
    # (measured on 5.5: stock eager vs stock sdpa differ by 1.59; ours matches stock eager to 2e-6).
    softcaps = getattr(tiny_config(arch), "attn_logit_softcapping", None)
    stock = tiny_model(arch, "eager" if softcaps else backend)
    x = input_ids(2, 20)
    with torch.no_grad():
        expected = stock(x).logits
        wide = converted(arch, kind, backend, **({"neighbor_window": 64} if kind == "self_extend" else {"window": 64}))
        assert (wide(x).logits - expected).abs().max() <= 1e-5
        assert (converted(arch, kind, backend)(x).logits - expected).abs().max() > 1e-5


def test_scaled_base_rope_is_kept():
    """On a YaRN-scaled model, the identity holds against that model (its scaling is the one extended)."""
    config = tiny_config("llama")
    config.rope_parameters = dict(YARN)
    stock = AutoModelForCausalLM.from_config(config).eval()
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(stock.state_dict())
    hf_posenc.convert(model, PosEncConfig(kind="rerope", window=64))
    x = input_ids(2, 20)
    with torch.no_grad():
        assert (model(x).logits - stock(x).logits).abs().max() <= 1e-5


def assert_caches_match_no_cache(model, prompt_length=5, new_tokens=12):
    """Greedy generation with a dynamic and with a static cache gives exactly the no-cache tokens."""
    prompt = input_ids(1, prompt_length)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        no_cache = model.generate(prompt, use_cache=False, **kwargs)
        assert torch.equal(model.generate(prompt, **kwargs), no_cache)
        assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), no_cache)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_caches_equals_no_cache(arch, variant, backend):
    """Greedy decoding far past the windows: dynamic and static caches (unrotated keys, both rotations
    recomputed per step) give exactly the tokens of recomputing without a cache."""
    assert_caches_match_no_cache(converted(arch, variant, backend))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_rows_alone(arch, variant):
    """A left-padded batch, positioned by position_ids as generate makes them, equals each row alone;
    and generating from it gives each row's own tokens."""
    model = converted(arch, variant)
    long_row, short_row = input_ids(1, 12, seed=1), input_ids(1, 7, seed=2)
    pad = long_row.shape[1] - short_row.shape[1]
    batch = torch.cat([long_row, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(padded[0], model(long_row).logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padded[1, pad:], model(short_row).logits[0], rtol=1e-4, atol=1e-5)
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        together = model.generate(batch, attention_mask=mask, **kwargs)
        assert torch.equal(together[0], model.generate(long_row, **kwargs)[0])
        assert torch.equal(together[1, pad:], model.generate(short_row, **kwargs)[0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eager_weights_and_sdpa_agree(variant):
    eager, sdpa = converted("llama", variant, "eager"), converted("llama", variant, "sdpa")
    x = input_ids(2, 15)
    with torch.no_grad():
        out = eager(x, output_attentions=True)
        torch.testing.assert_close(out.logits, sdpa(x).logits, rtol=1e-4, atol=1e-5)
    for weights in out.attentions:
        assert weights.shape == (2, 4, 15, 15) and torch.all(weights.triu(1) == 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 15))


@pytest.mark.parametrize("arch", [a for a in ROPE_DECODERS if a not in ARCHS])
def test_generate_with_caches_on_the_other_rope_decoders(arch):
    """Soft-capping (Gemma 2), per-layer-type bases (Gemma 3), native NoPE layers (SmolLM3), windows ..."""
    assert_caches_match_no_cache(converted(arch, "self_extend"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sliding_window_caches_match_no_cache(variant):
    """Mistral with a 6-token window, generating past it (cropped dynamic cache, rolling static cache)."""
    from transformers import MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert_caches_match_no_cache(hf_posenc.convert(model, PosEncConfig(**VARIANTS[variant])))


@pytest.mark.parametrize("arch,variant", [("llama", "self_extend"), ("gpt_neox", "rerope"), ("qwen3", "leaky_rerope")])
def test_save_reload_by_both_routes(tmp_path, arch, variant):
    """(a) from_pretrained of the converted folder, in a fresh process, with and without importing
    hf_posenc first; (b) the stock checkpoint converted again. Both give identical logits."""
    from test_persistence import LOAD, run_python

    model = converted(arch, variant)
    x = input_ids()
    torch.save(x, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "converted")
    for prelude, extra in (("import hf_posenc", ""), ("", ", trust_remote_code=True")):
        result = run_python(LOAD.format(prelude=prelude, is_bert=False, path=str(tmp_path / "converted"), extra=extra,
                                        inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "out.pt")))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "CLASS HfPosenc" in result.stdout
        assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    tiny_model(arch, "sdpa").save_pretrained(tmp_path / "stock")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", attn_implementation="sdpa").eval()
    hf_posenc.convert(again, PosEncConfig(**VARIANTS[variant]))
    with torch.no_grad():
        assert torch.equal(again(x).logits, expected)
    assert hf_posenc.posenc_of(again) == hf_posenc.posenc_of(model)


@pytest.mark.parametrize("variant", ["self_extend", "leaky_rerope"])
def test_lora_trains_through_the_two_pass_kernel(variant):
    """Gradients reach the LoRA adapters through both passes: the loss falls on a copying task."""
    from test_peft import train

    model = get_peft_model(converted("llama", variant),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    _, losses = train(model)  # test_peft's copying task
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses


def test_native_nope_layers_stay_nope():
    """SmolLM3's RoPE-free layers are not given RoPE by the extension."""
    model = converted("smollm3", "rerope")
    nope = {i for i, v in enumerate(model.config.no_rope_layers) if v == 0}
    layers = enumerate(model.model.layers)
    assert nope and all(hasattr(layer.self_attn, "posenc") == (i not in nope) for i, layer in layers)


def test_revert_restores_the_stock_model():
    stock = tiny_model("llama")
    model = converted("llama", "self_extend", "eager")
    hf_posenc.revert(model)
    x = input_ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, stock(x).logits)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["self_extend", "leaky_rerope"])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_low_precision_matches_fp32(one_thread, arch, variant, backend):
    """bf16/fp16 weights and autocast: the dtype is kept end to end and the logits stay within
    test_dtypes' tolerances of the fp32 model (N(0, 0.2) weights, so that positions matter)."""
    from test_dtypes import FORWARD_TOL, MODES, forward, low_precision_pair, relative_error, scale_weights

    model = scale_weights(tiny_model(arch, backend))
    hf_posenc.convert(model, PosEncConfig(**VARIANTS[variant]), attn_implementation=backend)
    x = input_ids(2, 16)
    for mode, (weights, autocast) in MODES.items():
        run, ref, precision = low_precision_pair(model, mode)
        with torch.no_grad():
            expected = forward(ref, x)
            if autocast is None:
                assert run(x).logits.dtype == weights, mode
            error = relative_error(forward(run, x, autocast), expected)
        assert error <= FORWARD_TOL[precision], f"{mode}: relative error {error:.3g}"
