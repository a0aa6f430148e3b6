"""Evaluation: perplexity modes against transformers' own loss, metric modules, passkey prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_posenc.experiments.context_extension import evaluation
from hf_posenc.experiments.context_extension.base_model import train_bpe_tokenizer
from hf_posenc.experiments.context_extension.config import EvalConfig, PasskeyConfig

TEXTS = ["def f(x):\n    return x + 1\n" * 40, "class A:\n    value = 12345\n" * 40]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(1))


def test_non_overlapping_matches_transformers_loss(model, stream):
    nll, pos = evaluation.non_overlapping(model, stream, 64)
    assert len(nll) == 4 * 63 and pos[:63] == list(range(1, 64))
    with torch.no_grad():
        reference = [model(input_ids=w[None], labels=w[None]).loss.item() for w in stream.view(4, 64)]
    assert np.mean(nll) == pytest.approx(np.mean(reference), rel=1e-5)


def test_sliding_matches_the_masked_label_reference(model, stream):
    """Reference: the transformers docs' recipe (labels of already-scored tokens set to -100)."""
    length, stride = 64, 16
    nll, pos = evaluation.sliding(model, stream, length, stride)
    assert len(nll) == len(stream) - 1  # every token but the first scored exactly once
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(stream), stride):
            end = min(begin + length, len(stream))
            ids = stream[begin:end][None]
            labels = ids.clone()
            labels[:, : -(end - prev_end)] = -100
            scored = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * scored
            count += scored
            prev_end = end
            if end == len(stream):
                break
    assert count == len(nll)
    assert sum(nll) == pytest.approx(total, rel=1e-5)
    assert min(pos) >= 1 and max(pos) == length - 1


def test_sliding_with_stride_equal_to_length_is_non_overlapping(model, stream):
    a, pa = evaluation.sliding(model, stream, 64, 64)
    b, pb = evaluation.non_overlapping(model, stream, 64)
    assert pa == pb and np.allclose(a, b, atol=1e-6)


def test_token_perplexity_metric_against_numpy():
    metric = evaluation.load_metric("token_perplexity")
    rng = np.random.default_rng(0)
    nll = rng.uniform(0, 5, 1000)
    pos = rng.integers(0, 100, 1000)
    out = metric.compute(predictions=nll.tolist(), references=pos.tolist(), bucket_size=32)
    assert out["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    for start in (0, 32, 64, 96):
        mask = (pos >= start) & (pos < start + 32)
        assert out["loss_by_bucket"][str(start)] == pytest.approx(nll[mask].mean(), rel=1e-12)
    with pytest.raises(ValueError):
        metric.compute(predictions=[], references=[])


@pytest.mark.parametrize(
    ("prediction", "correct"),
    [(" 68220.", True), ("68220 is the key", True), ("6822", False), ("682201", False), ("x = 1; 68220", False),
     ("", False), ("key: 068220", False)],
)
def test_passkey_metric_reads_the_first_number(prediction, correct):
    metric = evaluation.load_metric("passkey_accuracy")
    assert metric.compute(predictions=[prediction], references=["68220"])["accuracy"] == float(correct)


@pytest.mark.parametrize("template", ["code", "text"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_length_and_needle_depth(tokenizer, template, depth):
    filler = torch.randint(0, 300, (1024,), generator=torch.Generator().manual_seed(3))
    prompt = evaluation.passkey_prompt(tokenizer, filler, 500, depth, "48213", template)
    assert len(prompt.input_ids) == 500
    text = tokenizer.decode(prompt.input_ids)
    assert text.count("48213") >= 2  # the needle states the key more than once
    head, needle, question = evaluation.PASSKEY_TEMPLATES[template]
    assert text.endswith(question)
    needle_ids = tokenizer(needle.format(key="48213"), add_special_tokens=False)["input_ids"]
    n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    room = 500 - n_head - len(needle_ids) - len(tokenizer(question, add_special_tokens=False)["input_ids"])
    start = n_head + round(depth * room)
    assert prompt.input_ids[start : start + len(needle_ids)].tolist() == needle_ids
    with pytest.raises(ValueError, match="shorter than the prompt template"):
        evaluation.passkey_prompt(tokenizer, filler, 10, depth, "48213", template)


class _Oracle(torch.nn.Module):
    """Stands in for a perfect model: 'generates' the key it finds in the prompt (tests the plumbing)."""

    def __init__(self, tokenizer, wrong_after: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.wrong_after = wrong_after

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        text = self.tokenizer.decode(input_ids[0])
        key = text.split("pass key is ")[1][:5]
        if self.wrong_after is not None and input_ids.shape[1] > self.wrong_after:
            key = "00000"
        new = torch.tensor(self.tokenizer(" " + key + ".", add_special_tokens=False)["input_ids"])
        return torch.cat([input_ids[0], new])[None]


def test_passkey_accuracy_by_length_and_depth(tokenizer):
    filler = torch.randint(0, 300, (2048,), generator=torch.Generator().manual_seed(3))
    cfg = PasskeyConfig(depths=[0.2, 0.8], trials=2, template="text")
    out = evaluation.passkey(_Oracle(tokenizer, wrong_after=500), tokenizer, filler, cfg, [400, 600])
    assert out["passkey"] == {"400": 1.0, "600": 0.0}
    assert out["passkey_by_depth"]["400"] == {"0.2": 1.0, "0.8": 1.0}


def test_evaluate_context_buckets_average_to_the_mean(model, tokenizer):
    stream = torch.randint(0, 300, (1200,), generator=torch.Generator().manual_seed(2))
    cfg = EvalConfig(lengths=[32, 64], eval_tokens=256, sliding_stride=16, sliding_tokens=128, bucket_size=16,
                     passkey=PasskeyConfig(lengths=[400], depths=[0.5], trials=1, max_new_tokens=2))
    out = evaluation.evaluate_context(model, tokenizer, stream, cfg, progress=False)
    assert set(out["perplexity"]["non_overlapping"]) == {"32", "64"} and set(out["passkey"]) == {"400"}
    buckets = out["loss_by_position"]["64"]
    # positions 1..63: bucket 0 holds 15 tokens, buckets 16/32/48 hold 16 each
    weights = {"0": 15, "16": 16, "32": 16, "48": 16}
    mean = sum(buckets[k] * w for k, w in weights.items()) / 63
    assert math.exp(mean) == pytest.approx(out["perplexity"]["non_overlapping"]["64"], rel=1e-9)


def test_a_sliding_window_that_equals_the_non_overlapping_one_is_not_recomputed(model, tokenizer):
    """Lengths 32 and 64 with stride >= length over the same 256 tokens: both modes score the same
    windows, so the sliding value is reused (one forward per window), and it equals a direct sliding
    computation. Length 16 with stride 8 overlaps and is still computed."""
    stream = torch.randint(0, 300, (1200,), generator=torch.Generator().manual_seed(3))
    cfg = EvalConfig(lengths=[16, 32, 64], eval_tokens=256, sliding_stride=64, sliding_tokens=256, bucket_size=16,
                     passkey=PasskeyConfig(lengths=[400], depths=[0.5], trials=1, max_new_tokens=1))
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs["input_ids"].shape[-1]), with_kwargs=True)
    try:
        out = evaluation.evaluate_context(model, tokenizer, stream, cfg, progress=False)
    finally:
        handle.remove()
    assert calls.count(64) == 4 and calls.count(32) == 8  # non-overlapping only, not twice
    for length in (32, 64):
        nll, pos = evaluation.sliding(model, stream[:256], length, length)
        assert out["perplexity"]["sliding"][str(length)] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)
    cfg16 = cfg.model_copy(update={"sliding_stride": 8})
    out16 = evaluation.evaluate_context(model, tokenizer, stream, cfg16, progress=False)
    nll, _ = evaluation.sliding(model, stream[:256], 16, 8)
    assert out16["perplexity"]["sliding"]["16"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)
    assert out16["perplexity"]["sliding"]["16"] != out16["perplexity"]["non_overlapping"]["16"]


def test_longlora_switch_keeps_tied_embeddings_tied():
    """Training a tied input table through modules_to_save must not untie it from the head on merge."""
    from peft import get_peft_model

    from hf_posenc.peft_utils import lora_config

    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    before = tied.model.embed_tokens.weight.detach().clone()
    peft_model = get_peft_model(tied, lora_config(tied, longlora=True, task_type="CAUSAL_LM"))
    x = torch.randint(0, 64, (1, 8))
    peft_model(input_ids=x, labels=x).loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    merged = peft_model.merge_and_unload()
    assert not torch.equal(merged.model.embed_tokens.weight, before)  # the table was trained ...
    assert torch.equal(merged.model.embed_tokens.weight, merged.lm_head.weight)  # ... and is still the head
