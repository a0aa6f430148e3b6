"""Bad input gets a clear error naming the problem and the allowed values."""

import re

import pytest
import torch
from tiny_models import input_ids, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig, registry

INVALID_CONFIGS = [
    # Every registered kind, sorted (a new kind's module puts itself in the message).
    (dict(kind="sinusoidal"),
     rf"Unknown positional encoding kind='sinusoidal'; allowed: {re.escape(str(sorted(registry.kinds())))}\.$"),
    (dict(), r"Unknown positional encoding kind=None"),
    (dict(kind="rope", rope_type="ntk"), r"rope_type='ntk'; allowed: default, linear, dynamic, yarn, llama3, longrope"),
    (dict(kind="rope", rope_type="linear"), r"factor=None; allowed: a value \(required by rope_type='linear'\)"),
    (dict(kind="rope", rope_type="linear", factor=0.5), r"factor=0.5; allowed: a number >= 1"),
    (dict(kind="rope", factor=2.0), r"factor=2.0; allowed: only no scaling parameters for rope_type='default'"),
    (dict(kind="rope", rope_type="yarn", factor=4.0, low_freq_factor=1.0), r"low_freq_factor=1.0; allowed: only \["),
    (dict(kind="rope", rope_type="llama3", factor=8.0), r"required by rope_type='llama3'"),
    (dict(kind="rope", rope_type="llama3", factor=8.0, original_max_position_embeddings=8192, low_freq_factor=4.0,
          high_freq_factor=1.0), r"high_freq_factor=1.0; allowed: a number > low_freq_factor"),
    (dict(kind="rope", rope_type="yarn", factor=4.0, beta_fast=1.0, beta_slow=32.0),
     r"beta_fast=1.0; allowed: a number >= beta_slow"),
    (dict(kind="rope", rope_type="longrope", short_factor=[1.0], long_factor="big"),
     r"long_factor='big'; allowed: a list of positive numbers"),
    (dict(kind="rope", rope_theta=-1.0), r"rope_theta=-1.0; allowed: a positive finite number"),
    (dict(kind="rope", partial_rotary_factor=1.5), r"partial_rotary_factor=1.5; allowed: a number in \(0, 1\]"),
    (dict(kind="rope", layout="gptj"), r"layout='gptj'; allowed: half, interleaved"),
    (dict(kind="alibi", max_bias=0), r"max_bias=0; allowed: a positive finite number"),
    (dict(kind="alibi", slope=[1, 2]),
     r"unknown parameter\(s\) \['slope'\]; allowed: \['attention_temperature', 'layers', 'max_bias', 'slopes'\]"),
    (dict(kind="alibi", slopes="0.5"), r"invalid slopes='0.5'; allowed: None or a non-empty list of positive numbers"),
    (dict(kind="t5_bias", num_buckets=2), r"num_buckets=2; allowed: an integer >= 4"),
    (dict(kind="t5_bias", num_buckets=32, max_distance=8), r"max_distance=8; allowed: an integer > num_buckets // 2"),
    (dict(kind="t5_bias", num_buckets=8.5), r"num_buckets=8.5; allowed: a positive integer"),
    (dict(kind="cope", npos_max=1), r"npos_max=1; allowed: an integer >= 2"),
    (dict(kind="cope", block_size=0), r"block_size=0; allowed: a positive integer"),
    (dict(kind="nope", layers=[]), r"layers=\[\]; allowed: None or a non-empty list"),
    (dict(kind="nope", layers=[0, 0]), r"layers=\[0, 0\]; allowed: distinct layer indices"),
    (dict(kind="alibi", layers=[-1]), r"layers=\[-1\]; allowed: None or a non-empty list of non-negative"),
    (dict(kind="alibi", layers="0,1"), r"layers='0,1'; allowed: None or a list"),
]


@pytest.mark.parametrize("params,message", INVALID_CONFIGS)
def test_invalid_config_raises_naming_field_and_allowed_values(params, message):
    with pytest.raises(ValueError, match=message):
        PosEncConfig(**params)


def test_invalid_calls_raise_clear_errors(tmp_path):
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match=r"invalid layers=\[5\]; allowed: indices in \[0, 1\]"):
        hf_posenc.convert(llama, PosEncConfig(kind="alibi", layers=[5]))
    with pytest.raises(ValueError, match="CoPE is causal-only.*allowed kinds on encoders: rope, nope, alibi, t5_bias"):
        hf_posenc.convert(tiny_model("bert"), PosEncConfig(kind="cope"))
    with pytest.raises(ValueError, match=r"num_buckets=9 on an encoder; allowed: an even number"):
        hf_posenc.convert(tiny_model("bert"), PosEncConfig(kind="t5_bias", num_buckets=9))
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' cannot express kind='alibi'.*"
                                         r"allowed: \['eager', 'flex_attention', 'sdpa'\]"):
        hf_posenc.convert(llama, PosEncConfig(kind="alibi"), attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"Unsupported architecture model_type='t5'; hf_posenc supports: \["):
        from transformers import T5Config

        hf_posenc.patch_config(T5Config(), PosEncConfig(kind="alibi"))
    converted = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi"))
    with pytest.raises(ValueError, match="already converted by hf_posenc; call hf_posenc.revert"):
        hf_posenc.convert(converted, PosEncConfig(kind="nope"))
    with pytest.raises(ValueError, match="was not converted by hf_posenc"):
        hf_posenc.revert(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"Unknown layout='gptj'; allowed: half, interleaved"):
        hf_posenc.rope_layout(tiny_model("llama"), "gptj")
    with pytest.raises(ValueError, match="rope_layout needs a RoPE model; 'gpt2' has learned absolute positions"):
        hf_posenc.rope_layout(tiny_model("gpt2"), "interleaved")
    with pytest.raises(ValueError, match=r"Unknown backend='flash'; allowed: \['eager', 'flex_attention', 'sdpa'\]"):
        hf_posenc.set_backend(converted, "flash")
    with pytest.raises(TypeError, match="posenc_config must be a PosEncConfig or a dict"):
        hf_posenc.convert(tiny_model("llama"), "alibi")
    with pytest.raises(ValueError, match="needs a 'kind' key"):
        PosEncConfig.from_dict({"max_bias": 8})


def test_config_round_trips_through_dict():
    for config in (PosEncConfig(kind="rope", rope_type="yarn", factor=4.0, layers=[1, 0]),
                   PosEncConfig(kind="t5_bias", num_buckets=16), PosEncConfig(kind="cope", npos_max=8)):
        assert PosEncConfig.from_dict(config.to_dict()) == config
    assert PosEncConfig(kind="alibi", layers=[3, 1]).layers == (1, 3)


def test_cli_convert_info_and_errors(tmp_path, capsys):
    from hf_posenc.cli import main

    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    assert main(["convert", str(tmp_path / "base"), "--posenc", "t5_bias", "--param", "num_buckets=8",
                 "--param", "max_distance=16", "--out", str(tmp_path / "t5"), "--no-tokenizer"]) == 0
    assert main(["info", str(tmp_path / "t5")]) == 0
    out = capsys.readouterr().out
    assert '"kind": "t5_bias"' in out and "stock transformers refuses it" in out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t5")
    assert model.model.layers[0].self_attn.posenc.num_buckets == 8
    with torch.no_grad():
        model(input_ids())
    assert main(["convert", str(tmp_path / "base"), "--posenc", "rope", "--param", "rope_type=yarn",
                 "--param", "factor=4", "--out", str(tmp_path / "yarn"), "--no-tokenizer"]) == 0
    assert main(["info", str(tmp_path / "yarn")]) == 0
    assert "(native)" in capsys.readouterr().out
    # Bad input: exit code 2 and the reason, before anything is loaded or written.
    assert main(["convert", str(tmp_path / "base"), "--posenc", "cope", "--param", "npos=3", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "unknown parameter(s) ['npos']" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["convert", str(tmp_path / "base"), "--posenc", "alibi", "--out", str(tmp_path / "t5")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "base"), "--posenc", "xpos", "--out", str(tmp_path / "x")])


def test_cli_compare_takes_overrides_before_or_after_options(monkeypatch, tmp_path):
    import hf_posenc.experiments.context_extension.compare as compare_module
    from hf_posenc.cli import main

    calls = []

    def fake_run_compare(config, out, overrides, progress=True):
        calls.append(list(overrides))
        table = tmp_path / "results.md"
        table.write_text("table")
        return {"markdown": table}

    monkeypatch.setattr(compare_module, "run_compare", fake_run_compare)
    assert main(["compare", "c.yaml", "a.b=1", "--out", str(tmp_path)]) == 0
    assert main(["compare", "c.yaml", "--out", str(tmp_path), "a.b=1", "only=[rope]"]) == 0
    assert calls == [["a.b=1"], ["a.b=1", "only=[rope]"]]
    with pytest.raises(SystemExit):
        main(["compare", "c.yaml", "--out", str(tmp_path), "--bogus"])
