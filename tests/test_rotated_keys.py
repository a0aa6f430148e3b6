"""Decode with rotated keys kept beside the cache (``hf_posenc.rotated_keys``) and CoPE's decode without flipped
copies of the cache: exact against recomputing without a cache and against the full re-rotation.

References: every logit of a cached decode step equals the logits of one forward over the whole sequence without a
cache (an independent computation: no store, no cache, prefill kernels), and equals the same step with the store
switched off (every key rotated again, the implementation before the store). Boundaries: the tiny windows and
groups (Self-Extend G=2, W=3; ReRoPE w=3) are crossed many times by the generated lengths.
"""

import pytest
import torch
from test_cope_fast import assert_close_to_scale, causal, make_inputs, naive_cope
from tiny_models import converted, input_ids, randomize_position_tables, tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

import hf_posenc
from hf_posenc import rotated_keys
from hf_posenc._hf import cache_kwargs
from hf_posenc.encodings import contextual_rope, cope, rope, windowed_rope_attention
from hf_posenc.encodings.cope import cope_attention
from hf_posenc.encodings.rerope import ReRoPE
from hf_posenc.encodings.self_extend import SelfExtend
from hf_posenc.kernels import flex_attention, two_position
from hf_posenc.kernels.two_position import two_pass_attention

KINDS = {
    "self_extend": dict(group_size=2, neighbor_window=3),
    "rerope": dict(window=3),
    "leaky_rerope": dict(window=3, leak=2.0),
    "contextual_rope": {},
    "cope": dict(npos_max=16),
}
#: Kinds that keep a store (CoPE's positions depend on the query: nothing to keep).
STORED = ("self_extend", "rerope", "leaky_rerope", "contextual_rope")
TOL = 2e-5


def model_of(name: str, backend: str = "sdpa", arch: str = "llama"):
    kind = "rerope" if name == "leaky_rerope" else name
    model = converted(arch, kind, backend, **KINDS[name])
    randomize_position_tables(model)
    return model


def decode_logits(model, ids: torch.Tensor, prompt: int, cache=None) -> list[torch.Tensor]:
    """Last-position logits after the prompt and after each following token fed one at a time (teacher forcing)."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad():
        out = [model(ids[:, :prompt], **cache_kwargs(model, cache), use_cache=True).logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True).logits[:, -1])
    return out


def full_logits(model, ids: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return [logits[:, t - 1] for t in range(prompt, ids.shape[1] + 1)]


def without_store(monkeypatch):
    """Switch the store off: every decode step rotates every cached key again (the previous implementation)."""
    monkeypatch.setattr(rotated_keys, "for_cache_layer", lambda cache, layer_idx: None)


def assert_all_close(got, expected, what):
    for step, (a, b) in enumerate(zip(got, expected)):
        error = (a - b).abs().max().item()
        assert error <= TOL, f"{what}: step {step} differs by {error:.3g}"


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(KINDS))
def test_cached_decode_equals_no_cache_and_the_full_rerotation(monkeypatch, name, backend):
    model = model_of(name, backend)
    ids = input_ids(2, 17)
    cached = decode_logits(model, ids, prompt=4)
    assert_all_close(cached, full_logits(model, ids, prompt=4), "cache vs no cache")
    with monkeypatch.context() as patch:
        without_store(patch)
        assert_all_close(cached, decode_logits(model, ids, prompt=4), "store vs full re-rotation")


@pytest.mark.parametrize("name", STORED)
def test_a_decode_step_rotates_its_new_key_only(monkeypatch, name):
    """With the store a decode step rotates one row per rotation (the query, the key that just became far; for
    Self-Extend/ReRoPE also the near band, ``window`` rows, rotated relative to the query); the store then covers
    every cached key. Without the store (before it existed) the step rotated the whole cache."""
    rows = []

    def counting(original):
        def rotate_pairs(x, cos, sin, *args, **kwargs):
            rows.append(x.shape[-2])
            return original(x, cos, sin, *args, **kwargs)
        return rotate_pairs

    for module in (rope, contextual_rope, windowed_rope_attention):
        monkeypatch.setattr(module, "rotate_pairs", counting(module.rotate_pairs))
    model = model_of(name)
    ids = input_ids(1, 12)
    cache = DynamicCache(config=model.config)
    decode_logits(model, ids[:, :11], prompt=8, cache=cache)
    rows.clear()
    with torch.no_grad():
        model(ids[:, 11:], **cache_kwargs(model, cache), use_cache=True)
    band = KINDS[name].get("window", KINDS[name].get("neighbor_window", 1))
    assert rows and max(rows) == band < 12, rows
    for layer in cache.layers:
        store = rotated_keys._STORES[layer]
        assert store.rows == 12 and store.holds(layer.keys)


@pytest.mark.parametrize("name", STORED)
def test_reordered_cropped_or_edited_caches_rotate_again(name):
    """Beam search's reorder, crop and an in-place edit of the cached keys each make the store stale: the next
    step equals a fresh cache built from the same keys."""
    model = model_of(name)
    ids = input_ids(3, 12)
    reference = DynamicCache(config=model.config)
    decode_logits(model, ids, prompt=6, cache=reference)
    order = torch.tensor([2, 0, 1])
    for change in ("reorder", "crop", "edit"):
        cache = DynamicCache(config=model.config)
        decode_logits(model, ids, prompt=6, cache=cache)
        token = ids[:, -1:]
        if change == "reorder":
            cache.reorder_cache(order)
            token = token[order]
        elif change == "crop":
            cache.crop(-3)  # back to 9 tokens
        else:
            for layer in cache.layers:
                layer.keys.mul_(1.5)
        rebuilt = DynamicCache(config=model.config)
        for index, layer in enumerate(cache.layers):  # a new cache holding the same keys: no store yet
            rebuilt.update(layer.keys.clone(), layer.values.clone(), index)
        with torch.no_grad():
            got = model(token, **cache_kwargs(model, cache), use_cache=True).logits
            expected = model(token, **cache_kwargs(model, rebuilt), use_cache=True).logits
        assert (got - expected).abs().max() <= TOL, change


@pytest.mark.parametrize("name", list(KINDS))
def test_beam_search_and_left_padding_equal_no_cache(name):
    model = model_of(name)
    batch = input_ids(2, 7)
    mask = torch.ones_like(batch)
    mask[1, :3] = 0  # row 1 left-padded by 3 tokens
    batch[1, :3] = 0
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, attention_mask=mask)
    with torch.no_grad():
        for extra in ({}, {"num_beams": 3}):
            cached = model.generate(batch, **kwargs, **extra)
            assert torch.equal(cached, model.generate(batch, use_cache=False, **kwargs, **extra)), extra


def test_dynamic_rope_scaling_past_the_pretraining_length_rotates_again():
    """Dynamic NTK scaling changes the frequencies with the length past max_position_embeddings: the stored rows
    are stale then, and each step still equals the forward of its prefix without a cache."""
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config.max_position_embeddings = 10
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    hf_posenc.convert(model, hf_posenc.PosEncConfig(kind="self_extend", **KINDS["self_extend"]))
    ids = input_ids(1, 16)
    with torch.no_grad():  # the frequencies depend on the length: one forward per prefix
        prefixes = [model(ids[:, :t], use_cache=False).logits[:, -1] for t in range(4, 17)]
    assert_all_close(decode_logits(model, ids, prompt=4), prefixes, "dynamic scaling")


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("padded", [False, True])
def test_cope_decode_without_flipped_cache_matches_naive(q_len, padded):
    """Fewer query rows than head dimensions take the path that flips the logits instead of the keys; gradients
    through it (the backward is shared) match the paper's equations too."""
    kv_len = 40
    q, k, v, e = make_inputs(q_len=q_len, kv_len=kv_len, npos=5)
    allowed = causal(q_len, kv_len).expand(2, 1, q_len, kv_len).clone()
    if padded:
        allowed[1, :, :, :6] = False
    scaling = q.shape[-1] ** -0.5
    diagonal = kv_len - q_len
    expected, _ = naive_cope(q, k, v, allowed, e, scaling)
    got, weights = cope_attention(q, k, v, allowed if padded else None, e, scaling, 64, diagonal=diagonal)
    assert weights is None
    assert_close_to_scale(got, expected, "output")
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
    mine = torch.autograd.grad((got * upstream).sum(), (q, k, v, e))
    ref = torch.autograd.grad((expected * upstream.double()).sum(), (q, k, v, e))
    for name, a, b in zip("qkvE", mine, ref):
        assert_close_to_scale(a, b, f"grad {name}")


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_len,diagonal,window", [(40, 39, 8), (40, 39, 64), (40, 5, 3), (40, 2, 8), (40, -1, 4)])
def test_a_decode_row_of_two_position_attention_equals_the_definition(kv_len, diagonal, window, padded):
    """The one-row path (decode, no gradient: one softmax over the far keys' and the near band's scores) against
    the definition in fp64: key ``c`` is visible iff ``c <= diagonal``, near iff ``diagonal - c < window``;
    windows wider than the cache, a row that sees a few keys and a row that sees none included."""
    g = torch.Generator().manual_seed(kv_len + diagonal + window)
    q_near, q_far = (torch.randn(2, 3, 1, 8, generator=g) for _ in range(2))
    k_near, k_far, value = (torch.randn(2, 3, kv_len, 8, generator=g) for _ in range(3))
    allowed = None
    if padded:  # the second row's first 4 keys are left pads
        allowed = torch.ones(2, 1, 1, kv_len, dtype=torch.bool)
        allowed[1, ..., :4] = False
    with torch.no_grad():
        out = two_pass_attention(q_near, k_near, q_far, k_far, value, allowed, diagonal, window, 0.3)

    c = torch.arange(kv_len)
    visible = (c <= diagonal)[None, None, None] & (True if allowed is None else allowed)  # [B|1, 1, 1, kv]
    near = (diagonal - c) < window
    scores = torch.where(near, q_near.double() @ k_near.double().mT, q_far.double() @ k_far.double().mT) * 0.3
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    expected = probs @ value.double()  # a row that sees no key at all (diagonal -1): zeros, as the tiled path gives
    # A query whose visible keys are all pads is itself a pad (left padding): its output is never read, and
    # neither stock SDPA nor the tiled path gives it a defined value.
    read = (visible.any(-1, keepdim=True) | (diagonal < 0)).expand_as(out)  # [B, H, 1, D]
    torch.testing.assert_close(out.double()[read], expected[read], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_len,diagonal", [(40, 39), (40, 20), (40, 8), (300, 299)])
@pytest.mark.parametrize("padded", [False, True])
def test_a_cope_decode_row_without_gradient_equals_the_definition(monkeypatch, kv_len, diagonal, padded):
    """One query row without gradient (a decode step) takes CoPE's one-row path, not the blocked autograd function
    (whose per-block machinery costs more than a row's arithmetic), and equals the paper's equations in fp64:
    keys after ``diagonal`` unseen (a cache longer than what it holds), left pads, positions past ``npos_max``."""
    calls = []
    monkeypatch.setattr(cope._CopeAttention, "apply", lambda *args: calls.append(args))
    q, k, v, e = (t.detach() for t in make_inputs(q_len=1, kv_len=kv_len, npos=5))
    allowed = (torch.arange(kv_len) <= diagonal)[None, None, None].expand(2, 1, 1, kv_len).clone()
    if padded:
        allowed[1, ..., :6] = False
    scaling = q.shape[-1] ** -0.5
    expected, _ = naive_cope(q, k, v, allowed, e, scaling)
    with torch.no_grad():
        got, weights = cope_attention(q, k, v, allowed if padded else None, e, scaling, 64, diagonal=diagonal)
    assert weights is None and not calls
    assert_close_to_scale(got, expected, "output")


@pytest.mark.parametrize("dtype,softcap", [(torch.float32, 5.0), (torch.bfloat16, None), (torch.float32, None)])
def test_the_cope_decode_row_equals_the_blocked_path(dtype, softcap):
    """Against the blocked path (with a gradient): soft-capping, bf16 inputs (fp32 inside, as the blocked path) and a
    padded row that sees no key at all (both give it the same finite output)."""
    q, k, v, e = (t.detach() for t in make_inputs(q_len=1, kv_len=300, npos=16))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for diagonal in (299, 3):
        allowed = torch.ones(2, 1, 1, 300, dtype=torch.bool)
        allowed[1, ..., :6] = False  # with diagonal 3, row 1 sees no key
        with torch.no_grad():
            got, _ = cope_attention(q, k, v, allowed, e, 0.3, 64, diagonal=diagonal, softcap=softcap)
        blocked, _ = cope_attention(q.clone().requires_grad_(), k, v, allowed, e, 0.3, 64, diagonal=diagonal,
                                    softcap=softcap)
        assert got.dtype == blocked.dtype == dtype
        torch.testing.assert_close(got.float(), blocked.detach().float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,partial", [("half", 1.0), ("half", 0.5), ("interleaved", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotating_at_several_position_sets_equals_one_set_at_a_time(layout, partial, dtype):
    """``rotate_at_sets`` (one cos/sin table and one pass for the near and far rotations of a decode step) gives,
    set by set, exactly what ``rotate_at`` gives: shared positions ``[S, n]`` and per-row positions ``[B, S, n]``,
    integer and fractional (Leaky ReRoPE)."""
    module = rope.RotaryPosition({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial},
                                 16, 64, layout)
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    shared = torch.stack((torch.arange(40, 45), torch.arange(5) // 2 + 7))  # [2, 5]
    per_row = torch.stack((shared, shared.double() / 3 + 1.5))  # [B=2, S=2, 5]
    with torch.no_grad():
        for positions in (shared, per_row):
            both = module.rotate_at_sets(x, positions, 45)
            assert both.shape == (2, 3, 2, 5, 16)
            for s in range(2):
                assert torch.equal(both[:, :, s], module.rotate_at(x, positions[..., s, :], 45))
    x.requires_grad_()  # the differentiable form (training) too
    torch.testing.assert_close(module.rotate_at_sets(x, shared, 45)[:, :, 1], module.rotate_at(x, shared[1], 45))


def test_rerope_keeps_no_rotated_copy_of_its_far_keys():
    """ReRoPE rotates far keys at position 0, the identity (cos/sin factor 1): the far keys are the cached keys
    themselves and the store keeps the near rotation only. With a cos/sin factor (YaRN's attention factor) they
    are rotated and kept."""
    for rope_parameters, unrotated in (({"rope_type": "default", "rope_theta": 10000.0}, True),
                                       ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}, False)):
        module = ReRoPE(rope_parameters, 16, 64, window=3)
        store = rotated_keys.RotatedKeys()
        query, key = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 9, 16)
        with torch.no_grad():
            q_near, k_near, q_far, k_far = module.near_and_far(query, key, torch.tensor([8]), torch.arange(9),
                                                               live=True, store=store)
            reference = module.near_and_far(query, key, torch.tensor([8]), torch.arange(9), live=True)
        assert (k_far is key) == unrotated and set(store._buffers) == ({"near"} if unrotated else {"near_and_far"})
        for got, expected in zip((q_near, k_near, q_far, k_far), reference):
            assert torch.equal(got, expected)
        assert torch.equal(reference[3], module.rotate_at(key, torch.zeros(9, dtype=torch.long), 9))


def _rotate_fp64(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE (half layout) in fp64 at ``positions`` (``[n]`` or ``[B, n]``), written from the paper's definition."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * inv_freq  # [(B,) n, D / 2]
    if angles.dim() == 3:
        angles = angles[:, None]  # per row: broadcast over heads
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    x1, x2 = x.double()[..., : dim // 2], x.double()[..., dim // 2:]
    return x.double() * cos + torch.cat((-x2, x1), -1) * sin


DECODE_MODULES = {
    "self_extend": lambda p: SelfExtend(p, 16, 64, group_size=3, neighbor_window=7),
    "rerope": lambda p: ReRoPE(p, 16, 64, window=7),
    "leaky_rerope": lambda p: ReRoPE(p, 16, 64, window=7, leak=2.5),
}


def _far_fp64(name: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The far regime's rotation positions from the papers: Self-Extend (G=3, W=7), ReRoPE (w=7), Leaky (k=2.5)."""
    if name == "self_extend":
        return torch.div(q, 3, rounding_mode="floor") + 7 - 7 // 3, torch.div(k, 3, rounding_mode="floor")
    if name == "rerope":
        return torch.full_like(q, 7.0, dtype=torch.float64), torch.zeros_like(k, dtype=torch.float64)
    return q / 2.5 + 7 - 7 / 2.5, k / 2.5


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("pads", [(0, 0), (0, 5), (5, 5)])
@pytest.mark.parametrize("name", list(DECODE_MODULES))
def test_a_decode_step_is_one_attention_call_equal_to_the_definition(monkeypatch, name, pads, kv_heads):
    """A Self-Extend/ReRoPE decode step (one query row, no gradient) is one SDPA call over one key tensor: far keys
    rotated at their far positions, the near band rotated relative to the query's far position. Consecutive steps
    with the store (far rows kept, pairs of the prefill freed) and without it equal the papers' definition in fp64:
    distance ``i - j`` below the window, the far positions beyond; left pads, per row or the same for the batch
    (Self-Extend groups a padded row by its model positions); GQA read in place, no expanded copy of the cache."""
    from hf_posenc.kernels.call import Call

    module = DECODE_MODULES[name]({"rope_type": "default", "rope_theta": 10000.0})
    padded = any(pads)
    g = torch.Generator().manual_seed(kv_heads + 10 * sum(pads))
    key, value = torch.randn(2, kv_heads, 40, 16, generator=g), torch.randn(2, kv_heads, 40, 16, generator=g)
    pads = torch.tensor(pads)
    store = rotated_keys.RotatedKeys()
    cache = key[:, :, :30].clone()
    with torch.no_grad():  # a prefill of 30 keys leaves its pairs in the store: the first step takes the far half
        module.near_and_far(torch.randn(2, 4, 30, 16), cache, torch.arange(30), torch.arange(30), live=True,
                            position_ids=(torch.arange(30) - pads[:, None]).clamp(min=0), store=store)
    calls, expanded = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[1].shape) or sdpa(*a, **k))
    monkeypatch.setattr(two_position, "expand_kv", lambda x, heads: expanded.append(x) or x)
    for i in range(30, 40):
        old, cache = cache, torch.cat((cache, key[:, :, i:i + 1]), dim=2)  # as a DynamicLayer appends
        if not store.holds(old):
            store.clear()
        query = torch.randn(2, 4, 1, 16, generator=g)
        mask = (torch.arange(i + 1) >= pads[:, None])[:, None, None]  # [B, 1, 1, kv]
        outs = []
        for kept in (store, None):
            call = Call(device="cpu", dtype=torch.float32, backend="sdpa", queries=1, query=query, key=cache,
                        value=value[:, :, :i + 1], attention_mask=mask if padded else None,
                        q_pos=torch.tensor([i]), k_pos=torch.arange(i + 1), past=i, scaling=0.3, posenc=module,
                        position_ids=torch.tensor([[i]]) - pads[:, None], rotated_keys=kept)
            with torch.no_grad():
                outs.append(two_position.two_position_tiled(call)[0])
                if kept is None:  # the CUDA kernel takes a decode step the same way (run here on CPU tensors)
                    outs.append(flex_attention.two_position_flex(call)[0])
        assert set(store._buffers) == {"far"} and store.rows_of("far") == i + 1 - 7 and store.holds(cache)
        # The definition in fp64: model positions per row, the regime by cache distance.
        q_model, k_model = torch.tensor([i]) - pads[:, None], torch.arange(i + 1) - pads[:, None]  # [B, 1], [B, kv]
        q_far, k_far = _far_fp64(name, q_model, k_model)
        group = 4 // kv_heads
        k_all, v_all = key[:, :, :i + 1].repeat_interleave(group, 1), value[:, :, :i + 1].repeat_interleave(group, 1)
        near = (i - torch.arange(i + 1)) < 7
        scores = torch.where(near, _rotate_fp64(query, q_model) @ _rotate_fp64(k_all, k_model).mT,
                             _rotate_fp64(query, q_far) @ _rotate_fp64(k_all, k_far).mT) * 0.3
        scores = scores.masked_fill(~mask, float("-inf"))
        expected = torch.softmax(scores, -1) @ v_all.double()
        for out in outs:
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-6)
    assert calls == [(2, kv_heads, i + 1, 16) for i in range(30, 40) for _ in range(3)] and not expanded
