"""Generation and training features users reach for, on every encoding (tiny Llama).

Each compares against an independent reference: the same call without a cache, greedy decoding without an
assistant, the same gradients without checkpointing, the model before the resize. (torch.compile of the
forward: tests/test_stock_backends.py.)
"""

import copy

import pytest
import torch
from test_core_models import stock_nope
from tiny_models import (
    KINDS,
    NOOP_KINDS,
    TABLE_KINDS,
    VOCAB,
    example_params,
    input_ids,
    randomize_position_tables,
    tiny_model,
)
from transformers import AutoModelForCausalLM, DynamicCache

import hf_posenc
from hf_posenc import PosEncConfig


def converted(kind, backend="sdpa", seed=0):
    model = hf_posenc.convert(tiny_model("llama", backend, seed=seed), PosEncConfig(**example_params(kind)))
    randomize_position_tables(model)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_with_a_cache_equals_without(kind):
    model = converted(kind)
    prompt = input_ids(2, 6)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=True, top_k=0, temperature=1.0)
    outputs = []
    with torch.no_grad():
        for use_cache in (True, False):
            torch.manual_seed(3)
            outputs.append(model.generate(prompt, use_cache=use_cache, **kwargs))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0][0, 6:], outputs[0][1, 6:])  # sampled, not one fixed continuation


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_with_a_cache_equals_without(kind):
    # Beam search reorders the cache rows every step: positions must follow the rows.
    model = converted(kind)
    prompt = input_ids(2, 6)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        cached = model.generate(prompt, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", KINDS)
def test_assisted_decoding_equals_greedy(kind, monkeypatch):
    # Another seed: the assistant's drafts are often rejected, so the model's cache gets cropped.
    model, assistant = converted(kind), tiny_model("llama", "sdpa", seed=5)
    prompt = input_ids(1, 6)
    # min_length, not min_new_tokens: transformers 5.1 refuses the latter's processor with an assistant.
    kwargs = dict(max_new_tokens=12, min_length=prompt.shape[1] + 12, do_sample=False)
    crops = []
    crop = DynamicCache.crop
    monkeypatch.setattr(DynamicCache, "crop", lambda self, length: crops.append(length) or crop(self, length))
    with torch.no_grad():
        greedy = model.generate(prompt, **kwargs)
        assert not crops
        assisted = model.generate(prompt, assistant_model=assistant, **kwargs)
    assert crops  # rejected drafts were cut from the caches
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("kind", KINDS)
def test_output_hidden_states(kind):
    model = converted(kind)
    x = input_ids()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        plain = model(x).logits
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(x), rtol=0, atol=0)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)
    if kind in NOOP_KINDS:  # fresh tables are no-ops: the stock NoPE model's hidden states
        fresh = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(**example_params(kind)))
        with torch.no_grad():
            expected = stock_nope("llama", "sdpa")(x, output_hidden_states=True).hidden_states
            got = fresh(x, output_hidden_states=True).hidden_states
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _gradients(model, batch):
    model.train()
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind, backend):
    model = converted(kind, backend)
    checkpointed = copy.deepcopy(model)
    # transformers 5.2x renamed it activation checkpointing (the old name warns); 5.1 has only the old one.
    enable = (getattr(checkpointed, "activation_checkpointing_enable", None)
              or checkpointed.gradient_checkpointing_enable)
    enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    batch = input_ids(2, 10)
    expected, got = _gradients(model, batch), _gradients(checkpointed, batch)
    assert got.keys() == expected.keys()
    assert any(".posenc." in name for name in got) == (kind in TABLE_KINDS)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_resize_token_embeddings_keeps_the_conversion(tmp_path, kind):
    model = converted(kind)
    x = input_ids()
    with torch.no_grad():
        before = model(x).logits
    model.resize_token_embeddings(VOCAB + 7)
    assert type(model).__name__.startswith("HfPosenc") and hf_posenc.posenc_of(model).kind == kind
    prompt = input_ids(1, 6)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        after = model(x).logits
        assert after.shape[-1] == VOCAB + 7
        torch.testing.assert_close(after[..., :VOCAB], before, rtol=0, atol=0)  # old tokens: same logits
        assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, after)
