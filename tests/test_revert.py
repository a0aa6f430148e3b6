"""`hf_posenc.revert` restores the exact original after any sequence of convert / rope_layout / set_backend.

A seeded random walk applies valid operations to tiny models (stock ones, and ones loaded from converted
checkpoints), reverts, and compares the result with an untouched reference: class, config class, every
config attribute, attention backend, every parameter and buffer bitwise, hooks, and the logits bitwise.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from tiny_models import input_ids, randomize_position_tables, tiny_model
from transformers import AutoModel, AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig

SEQUENCES = 240
CHUNKS = 8
STOCK = ["llama", "gpt_neox", "phi", "qwen3", "gpt2", "bert"]
ROPE_NATIVE = {"llama", "gpt_neox", "phi", "qwen3"}
ENCODINGS = [
    PosEncConfig(kind="alibi"),
    PosEncConfig(kind="alibi", layers=[0]),
    PosEncConfig(kind="t5_bias", num_buckets=8, max_distance=16),
    PosEncConfig(kind="cope", npos_max=16),
    PosEncConfig(kind="nope"),
    PosEncConfig(kind="rope"),
    PosEncConfig(kind="rope", rope_type="yarn", factor=2.0),
    PosEncConfig(kind="rope", rope_type="dynamic", factor=2.0),
    PosEncConfig(kind="rope", layout="interleaved"),
    PosEncConfig(kind="rope", layers=[1]),
]
# Converted checkpoints the walk starts from (architecture, encoding); their reference is the stock
# model they were converted from, saved and loaded the same way.
LOADED = [
    ("llama", PosEncConfig(kind="alibi")),
    ("llama", PosEncConfig(kind="rope", layout="interleaved")),
    ("llama", PosEncConfig(kind="rope", rope_type="yarn", factor=2.0, layers=[0])),
    ("llama", PosEncConfig(kind="t5_bias", num_buckets=8, max_distance=16)),
    ("gpt_neox", PosEncConfig(kind="rope", layout="interleaved")),
    ("qwen3", PosEncConfig(kind="cope", npos_max=16)),
]


def _auto(arch):
    return AutoModel if arch == "bert" else AutoModelForCausalLM


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """(label, arch, model to walk from, untouched reference) for every start point."""
    out = []
    for arch in STOCK:
        model = tiny_model(arch, attn_implementation="sdpa" if arch == "llama" else "eager")
        out.append((arch, arch, model, copy.deepcopy(model)))
    root = tmp_path_factory.mktemp("revert")
    for i, (arch, posenc) in enumerate(LOADED):
        stock, converted = root / f"{i}-stock", root / f"{i}-converted"
        model = tiny_model(arch, attn_implementation="sdpa")
        model.save_pretrained(stock)
        hf_posenc.convert(model, posenc)
        randomize_position_tables(model)
        model.save_pretrained(converted)
        loaded = _auto(arch).from_pretrained(converted, attn_implementation="sdpa").eval()
        reference = _auto(arch).from_pretrained(stock, attn_implementation="sdpa").eval()
        assert type(loaded).__name__.startswith("HfPosenc")
        out.append((f"loaded {arch} {posenc.kind}", arch, loaded, reference))
    return out


def _config_dict(model):
    data = model.config.to_dict()
    data.pop("_name_or_path", None)  # where it was loaded from: differs between the two folders
    return data


def assert_same_as_reference(model, reference, where=""):
    """Every observable of ``model`` equals the reference's, bitwise."""
    assert type(model) is type(reference), where
    assert type(model.config) is type(reference.config), where
    assert set(model.config.__dict__) - {"_name_or_path"} == set(reference.config.__dict__) - {"_name_or_path"}, where
    assert _config_dict(model) == _config_dict(reference), where
    assert model.config._attn_implementation == reference.config._attn_implementation, where
    assert hf_posenc.posenc_of(model) is None, where
    assert not [k for k in vars(model) if k.startswith("_hf_posenc")], where
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs), where
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), f"{where}: {key}"
    buffers, ref_buffers = dict(model.named_buffers()), dict(reference.named_buffers())
    assert list(buffers) == list(ref_buffers), where
    for key in ref_buffers:
        assert torch.equal(buffers[key], ref_buffers[key]), f"{where}: buffer {key}"
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == sum(
        len(m._forward_pre_hooks) for m in reference.modules()), where
    x = input_ids(length=10)
    with torch.no_grad():
        got, expected = model(x), reference(x)
    field = "logits" if hasattr(expected, "logits") else "last_hidden_state"
    assert torch.equal(getattr(got, field), getattr(expected, field)), where


def _state(model):
    return getattr(model, "_hf_posenc_state", None)


def _valid_operations(model, arch):
    state = _state(model)
    ops = []
    if state is None:
        for posenc in ENCODINGS:
            if posenc.kind == "cope" and arch == "bert":
                continue
            for backend in (None, "eager", "sdpa"):
                ops.append(("convert", posenc, backend))
    rope_now = (state is None and arch in ROPE_NATIVE) or (state is not None and state.posenc.kind == "rope")
    if rope_now:
        ops += [("rope_layout", "interleaved"), ("rope_layout", "half")]
    if state is not None and state.attn_implementation is not None:
        ops += [("set_backend", "eager"), ("set_backend", "sdpa")]
    if state is not None:
        ops.append(("revert",))
    return ops


def _apply(model, op):
    if op[0] == "convert":
        hf_posenc.convert(model, op[1], attn_implementation=op[2])
    elif op[0] == "rope_layout":
        hf_posenc.rope_layout(model, op[1])
    elif op[0] == "set_backend":
        hf_posenc.set_backend(model, op[1])
    else:
        hf_posenc.revert(model)


def _describe(op):
    if op[0] == "convert":
        return f"convert({json.dumps(op[1].to_dict())}, attn_implementation={op[2]!r})"
    return f"{op[0]}({', '.join(map(repr, op[1:]))})"


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_sequences_revert_to_the_original(bases, chunk):
    rng = random.Random(1234 + chunk)
    for i in range(SEQUENCES // CHUNKS):
        label, arch, base, reference = bases[rng.randrange(len(bases))]
        model = copy.deepcopy(base)
        steps = []
        for _ in range(rng.randint(1, 5)):
            op = rng.choice(_valid_operations(model, arch))
            steps.append(_describe(op))
            _apply(model, op)
        if _state(model) is not None or getattr(model, "_hf_posenc_origin", None) is not None:
            steps.append("revert()")
            hf_posenc.revert(model)
        assert_same_as_reference(model, reference, f"chunk {chunk} sequence {i} on {label}: {' -> '.join(steps)}")


def test_layout_then_revert_restores_rows_and_logits():
    """The reported case: rope_layout(interleaved) then revert used to keep the permuted rows."""
    reference = tiny_model("llama")
    model = hf_posenc.rope_layout(tiny_model("llama"), "interleaved")
    hf_posenc.revert(model)
    assert_same_as_reference(model, reference)


def test_reverted_checkpoint_saves_as_a_stock_checkpoint(tmp_path):
    """A model loaded converted reverts to the stock class; its save loads in stock transformers."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "stock")
    hf_posenc.convert(model, PosEncConfig(kind="alibi"))
    model.save_pretrained(tmp_path / "alibi")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "alibi")
    hf_posenc.revert(loaded)
    loaded.save_pretrained(tmp_path / "reverted")
    config = json.loads((tmp_path / "reverted" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "posenc" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert not list((tmp_path / "reverted").glob("*.py"))  # no remote-code stub copied
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "reverted").eval()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert_same_as_reference(again, stock)


def test_revert_refuses_a_loaded_model_without_its_absolute_table(tmp_path):
    """GPT-2 converted from a checkpoint has no `wpe` weights anywhere: revert says so and changes nothing."""
    model = hf_posenc.convert(tiny_model("gpt2"), PosEncConfig(kind="alibi"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = input_ids()
    with torch.no_grad():
        before = loaded(x).logits
    with pytest.raises(ValueError, match=r"built converted .* removed its learned absolute position table "
                                         r"\(wpe\), so there are no original weights to restore"):
        hf_posenc.revert(loaded)
    assert hf_posenc.posenc_of(loaded).kind == "alibi"
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)
