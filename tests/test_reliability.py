"""No silent wrong model: what a checkpoint or an adapter records is checked against what the model runs.

Each test here failed before its fix (issue 24): a record that the model did not run, or that it ran as
something else, loaded without a word.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import converted, input_ids, tiny_model
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------
# A checkpoint's record is validated on load (item 2)
# ---------------------------------------------------------------------------------------------------
def test_checkpoint_with_layers_out_of_range_is_refused(tmp_path):
    converted("llama", "alibi").save_pretrained(tmp_path)
    _edit_config(tmp_path, posenc={"kind": "alibi", "layers": [99]})
    with pytest.raises(ValueError, match=r"invalid layers=\[99\]; allowed: indices in \[0, 1\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_with_a_kind_the_architecture_cannot_run_is_refused(tmp_path):
    converted("llama", "alibi").save_pretrained(tmp_path)
    _edit_config(tmp_path, posenc={"kind": "rope_2d"})
    with pytest.raises(ValueError, match="rope_2d.*allowed: image models"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_stock_config_with_a_posenc_record_does_not_report_it(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    _edit_config(tmp_path, posenc={"kind": "alibi"})
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # stock transformers: runs stock RoPE
    with pytest.raises(ValueError, match=r"^Convert the model to run it .*kind='alibi'"):
        hf_posenc.posenc_of(model)
    with pytest.raises(ValueError, match="stock transformers ignores"):
        hf_posenc.posenc_of(model.config)


def test_native_record_with_other_rope_parameters_is_not_reported(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    _edit_config(tmp_path, posenc={"kind": "rope", "rope_type": "yarn", "factor": 4.0}, posenc_native=True)
    with pytest.raises(ValueError, match="kind='rope'"):
        hf_posenc.posenc_of(AutoModelForCausalLM.from_pretrained(tmp_path))


@pytest.mark.parametrize("posenc", [dict(kind="rope", rope_type="yarn", factor=4.0), dict(kind="alibi")])
def test_converted_checkpoints_still_report_their_encoding(tmp_path, posenc):
    model = hf_posenc.convert(tiny_model("llama"), PosEncConfig.from_dict(posenc))
    assert hf_posenc.posenc_of(model).kind == posenc["kind"]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_posenc.posenc_of(reloaded) == hf_posenc.posenc_of(model)
    assert hf_posenc.posenc_of(reloaded.config) == hf_posenc.posenc_of(model)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------------
# An adapter records the encoding of its base (item 1)
# ---------------------------------------------------------------------------------------------------
def _adapter(base, folder):
    from peft import get_peft_model

    model = get_peft_model(base, hf_posenc.lora_config(base, r=2, init_lora_weights=False))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("posenc", [dict(kind="alibi"), dict(kind="rope", rope_type="yarn", factor=4.0),
                                    dict(kind="nope"), dict(kind="self_extend", group_size=4, neighbor_window=4)])
def test_adapter_without_tables_refuses_a_stock_base(tmp_path, posenc):
    base = hf_posenc.convert(tiny_model("llama"), PosEncConfig.from_dict(posenc))
    _adapter(base, tmp_path / "adapter")
    hint = rf"^Convert the base first: hf_posenc.convert\(base, PosEncConfig\(kind='{posenc['kind']}'"
    with pytest.raises(ValueError, match=hint) as error:
        hf_posenc.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    assert "this base runs the architecture's own (unconverted)" in str(error.value)
    assert len(str(error.value).partition(": the adapter at")[0]) <= 300


def test_adapter_refuses_a_base_with_other_parameters(tmp_path):
    base = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi"))
    _adapter(base, tmp_path / "adapter")
    other = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi", layers=[0]))
    with pytest.raises(ValueError, match="this base runs PosEncConfig"):
        hf_posenc.load_adapter(other, tmp_path / "adapter")


def test_adapter_of_a_stock_base_refuses_a_converted_base(tmp_path):
    _adapter(tiny_model("llama"), tmp_path / "adapter")
    hint = r"^Load it on the unconverted base .*this base runs PosEncConfig\(kind='alibi'"
    with pytest.raises(ValueError, match=hint):
        hf_posenc.load_adapter(hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi")), tmp_path / "adapter")


def test_adapter_on_the_right_base_loads_and_keeps_its_record(tmp_path):
    base = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi"))
    trained = _adapter(base, tmp_path / "adapter").eval()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "base_posenc" not in config  # plain PEFT reads adapter_config.json as before
    ids = input_ids()
    with torch.no_grad():
        expected = trained(ids).logits
    fresh = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi"))
    reloaded = hf_posenc.load_adapter(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    reloaded.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="Convert the base first"):
        hf_posenc.load_adapter(tiny_model("llama"), tmp_path / "again")


# ---------------------------------------------------------------------------------------------------
# transformers 5.25 (item 13)
# ---------------------------------------------------------------------------------------------------
def test_load_adapter_raises_no_checkpointing_deprecation(tmp_path):
    import warnings

    base = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi"))
    _adapter(base, tmp_path / "adapter")
    fresh = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_posenc.load_adapter(fresh, tmp_path / "adapter")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_docs_name_a_transformers_release_no_older_than_the_installed_one():
    """The README's "newest releases" line and ``_hf.py`` say which transformers they were checked on; CI
    installs the newest release, so this fails when a newer one comes out and the docs were not updated."""
    import re
    from pathlib import Path

    import transformers
    from packaging.version import Version

    from hf_posenc import _hf

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    newest = re.search(r"newest\s+releases pip resolves \(transformers (\S+),.*? on (\d{4}-\d\d-\d\d)\)", readme, re.S)
    assert newest, "README: the 'newest releases pip resolves (transformers X, ... on DATE)' line"
    assert Version(newest.group(1)) >= Version(Version(transformers.__version__).base_version)
    checked = re.search(r"release from 5\.5 to (\S+) \((\S+) on (\d{4}-\d\d-\d\d)", _hf.__doc__)
    assert checked and checked.group(2) == newest.group(1) and checked.group(3) == newest.group(2)


# ---------------------------------------------------------------------------------------------------
# bf16 models keep their fp32 tables across save/reload (item 6)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cope", "t5_bias", "contextual_rope", "kerple"])
@pytest.mark.parametrize("dtype", ["auto", torch.bfloat16])
def test_bf16_model_reloads_with_its_fp32_tables(tmp_path, kind, dtype):
    from tiny_models import randomize_position_tables

    model = hf_posenc.convert(tiny_model("llama").to(torch.bfloat16), PosEncConfig(kind=kind))
    randomize_position_tables(model)
    tables = {name: p.detach().clone() for name, p in model.named_parameters() if ".posenc." in name}
    assert tables and {t.dtype for t in tables.values()} == {torch.float32}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation="eager").eval()
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, value in reloaded.named_parameters():
        if ".posenc." in name:
            assert value.dtype == torch.float32 and torch.equal(value, tables[name]), name
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Trust boundary (item 9)
# ---------------------------------------------------------------------------------------------------
def test_stub_only_imports_the_installed_package_and_hands_its_classes_on():
    """The file written into checkpoints: a docstring, then one import from the installed hf_posenc (its
    ``class_by_name`` as the module's ``__getattr__``), whose ImportError handler only raises."""
    import ast
    import inspect

    from hf_posenc import modeling_hf_posenc

    body = ast.parse(inspect.getsource(modeling_hf_posenc)).body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)  # the docstring
    assert len(body) == 2 and isinstance(body[1], ast.Try), ast.dump(body[1])
    (statement,) = body[1].body
    assert isinstance(statement, ast.ImportFrom) and statement.module == "hf_posenc.modeling"
    assert [(a.name, a.asname) for a in statement.names] == [("class_by_name", "__getattr__")]
    for handler in body[1].handlers:
        assert all(isinstance(node, ast.If | ast.Raise) for node in handler.body)
    assert not body[1].orelse and not body[1].finalbody


def test_a_tampered_stub_does_not_run_once_hf_posenc_is_imported(tmp_path, monkeypatch):
    """``import hf_posenc`` first: transformers takes the installed classes even with trust_remote_code=True."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder, marker = tmp_path / "checkpoint", tmp_path / "ran"
    model = converted("llama", "alibi")
    model.save_pretrained(folder)
    stub = folder / "modeling_hf_posenc.py"
    stub.write_text(f"open({str(marker)!r}, 'w').close()\n" + stub.read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert not marker.exists()
    assert type(reloaded).__module__ == "hf_posenc.modeling_hf_posenc"
    assert hf_posenc.posenc_of(reloaded).kind == "alibi"


def test_readme_leads_with_import_hf_posenc_and_states_the_trust_model():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    first_code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert first_code.splitlines()[0].partition("#")[0].strip() == "import hf_posenc"
    section = re.search(r"\n## Trust model\n(.*?)\n## ", readme, re.S)
    assert section, "README: a '## Trust model' section"
    for phrase in ("trust_remote_code=True", "modeling_hf_posenc.py", "weights_only=True"):
        assert phrase in section.group(1), phrase


def test_base_model_resume_state_is_loaded_weights_only(tmp_path, tmp_path_factory, monkeypatch):
    """A resume checkpoint that would run code when unpickled is refused, and the code does not run."""
    import pickle

    from hf_posenc.experiments.context_extension import base_model
    from hf_posenc.experiments.context_extension import data as corpus
    from hf_posenc.experiments.context_extension.config import PretrainConfig

    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "hf_posenc_cache"))
    real_train = base_model.train_bpe_tokenizer
    monkeypatch.setattr(base_model, "train_bpe_tokenizer",
                        lambda texts, size, **kwargs: real_train(texts, size, max_chars=200_000, **kwargs))
    spec = PretrainConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          seq_len=32, batch_size=2, steps=3, warmup_steps=1)
    out, marker = tmp_path / "base", tmp_path / "ran"
    out.mkdir()
    real_train(["def f(x):\n    return x + 1\n" * 50], 300).save_pretrained(str(out))  # a resume reads it
    torch.save({"payload": _RunsOnLoad(str(marker))}, out / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        base_model.pretrain(spec, out, progress=False)
    assert not marker.exists()


class _RunsOnLoad:
    """Unpickling this object creates a file: what a tampered checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
