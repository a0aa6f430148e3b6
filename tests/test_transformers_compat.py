"""The supported transformers range: feature detection of the cache argument, and declared bounds.

transformers 5.24 renamed the attention modules' ``past_key_values`` argument to ``cache``; reading the
old name silently gave every generated token the positions of a prompt without history. These tests
make such a rename fail loudly (at conversion) instead of silently (in generation).
"""

import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import tomllib
import torch
from tiny_models import TESTED, tiny_model
from transformers import DynamicCache

import hf_posenc
from hf_posenc import PosEncConfig, _hf
from hf_posenc.architectures import architecture_of, attention_modules

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("arch", TESTED)
def test_cache_argument_is_found_in_every_attention_forward(arch):
    model = tiny_model(arch)
    row = architecture_of(model.config)
    attn = attention_modules(model, row)[0]
    if not row.cache:  # encoder-only attention (DistilBERT, ModernBERT): the row says so, the forward agrees
        with pytest.raises(RuntimeError, match="takes none of the cache arguments"):
            _hf.cache_argument(attn)
        return
    name, index = _hf.cache_argument(attn)
    parameters = list(inspect.signature(attn.forward).parameters)
    assert parameters[index] == name
    # The name this transformers release uses (no deprecated alias is ever preferred to it).
    expected = next(n for n in _hf.CACHE_ARGUMENTS if n in parameters)
    assert name == expected


def _rename_cache_argument(model):
    """Give every attention module a forward whose cache argument has a name hf_posenc does not know."""
    for attn in attention_modules(model, architecture_of(model.config)):
        stock = type(attn)

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None,
                    _stock=stock, **kwargs):
            return _stock.forward(self, hidden_states, position_embeddings, attention_mask, kv_store, **kwargs)

        attn.__class__ = type("Renamed" + stock.__name__, (stock,), {"forward": forward})


def test_a_renamed_cache_argument_fails_at_conversion():
    model = tiny_model("llama")
    _rename_cache_argument(model)
    with pytest.raises(RuntimeError, match=r"takes none of the cache arguments .*kv_store"):
        hf_posenc.convert(model, PosEncConfig(kind="alibi"))


def test_a_cache_under_an_unknown_keyword_fails_instead_of_being_ignored():
    cache = DynamicCache()
    with pytest.raises(RuntimeError, match="unknown argument 'kv_store'"):
        _hf.find_cache((), {"kv_store": cache}, ("cache", 3))


def test_deprecated_alias_and_positional_cache_are_found():
    cache = DynamicCache()
    assert _hf.find_cache((), {"past_key_values": cache}, ("cache", 3)) is cache  # caller uses the old name
    assert _hf.find_cache(("h", None, None, cache), {}, ("cache", 3)) is cache  # passed positionally
    assert _hf.find_cache((), {"cache": None}, ("cache", 3)) is None


def test_generation_sees_the_cache():
    """The pre-hook must read a non-zero past length on every decode step (with the argument name of the
    installed release); a hook that finds no cache would report 0 after the prompt."""
    model = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi"))
    seen = []
    attn = attention_modules(model, architecture_of(model.config))[0]
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.append(int(k["posenc_past"])), with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert seen == [0, 4, 5, 6]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_checked_range_in_code_equals_pyproject():
    declared = next(d for d in _pyproject()["dependencies"] if re.match(r"transformers\b", d))
    assert declared == "transformers" + _hf.SUPPORTED_TRANSFORMERS


def test_every_dependency_has_a_lower_bound_and_an_upper_bound_only_at_a_major():
    for line in [*_pyproject()["dependencies"], *_pyproject()["optional-dependencies"]["test"]]:
        assert ">=" in line, line
        upper = re.search(r"<(\d+)(\.\d+)*$", line)
        if upper:  # "<6", never "<5.24"
            assert re.search(r"<\d+$", line), f"{line}: an upper bound below the next major"


def _lower_bounds_module():
    spec = importlib.util.spec_from_file_location("lower_bounds", ROOT / ".ci" / "lower_bounds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_lower_bounds_come_from_pyproject(tmp_path):
    lower = _lower_bounds_module()
    pins = lower.lower_bounds(ROOT / "pyproject.toml")
    assert pins["transformers"] == _hf.SUPPORTED_TRANSFORMERS.split(",")[0].removeprefix(">=")
    assert pins["torch"] == "2.13.0"
    broken = tmp_path / "pyproject.toml"
    broken.write_text('[project]\nname = "x"\ndependencies = ["peft"]\n')
    with pytest.raises(ValueError, match="peft: no '>=' lower bound"):
        lower.lower_bounds(broken)


def test_readme_states_the_tested_lower_bounds():
    block = re.search(r"<!-- tested-versions -->(.*?)<!-- /tested-versions -->", (ROOT / "README.md").read_text(),
                      re.S).group(1)
    lower = _lower_bounds_module()
    assert lower.markdown(lower.lower_bounds(ROOT / "pyproject.toml")) in block, (
        "README's tested-versions block is stale: regenerate it with `python .ci/lower_bounds.py --markdown`")
