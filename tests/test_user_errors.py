"""User errors reach the user as one message naming our API and what to do, in the CLI and in Python."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model
from tiny_models import input_ids, randomize_position_tables, tiny_model
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig, hub
from hf_posenc.cli import main

REPO = Path(__file__).resolve().parents[1]
MISMATCH = "to instantiate a model of type"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A stock tiny Llama, its T5-bias conversion, and an adapter of each kind of base."""
    root = tmp_path_factory.mktemp("errors")
    stock = tiny_model("llama")
    stock.save_pretrained(root / "stock")
    converted = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="t5_bias", num_buckets=8))
    randomize_position_tables(converted)
    converted.save_pretrained(root / "converted")
    return root


def _save_adapter(base, folder):
    peft_model = get_peft_model(base, hf_posenc.lora_config(base))
    with torch.no_grad():  # non-zero LoRA B so that the adapter changes the logits
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(folder)
    return peft_model


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def config_log():
    """Messages logged by transformers' configuration module while the test runs."""
    logger = logging.getLogger("transformers.configuration_utils")
    handler = _Records()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ------------------------------------------------------------------------------------------- CLI
def test_cli_convert_missing_folder_is_one_line_exit_2(tmp_path):
    """Through the installed entry point: no traceback, exit 2, says the folder does not exist."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hf_posenc.cli", "convert", str(tmp_path / "missing"), "--posenc",
                           "alibi", "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert "hf-posenc convert: error: MODEL" in lines[0] and "no such folder" in lines[0]
    assert "Repo id must be" not in proc.stderr


def test_cli_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main(["-v", "convert", str(tmp_path / "missing"), "--posenc", "alibi", "--out", str(tmp_path / "out")])


def test_cli_push_errors_are_the_api_messages(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    token = ["--token", "hf_x"]
    cases = [[str(folders / "converted"), "me/x"],  # no token
             [str(tmp_path / "missing"), "me/x", *token],  # not a folder
             [str(tmp_path), "me/x", *token]]  # a folder, but not a saved model or adapter
    bad = tmp_path / "bad"  # posenc on a stock model_type: stock transformers would drop the encoding
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "posenc": {"kind": "alibi"}}))
    cases.append([str(bad), "me/x", *token])
    stock_adapter = tmp_path / "stock_adapter"  # an adapter of a base that was never converted
    _save_adapter(tiny_model("llama"), stock_adapter)
    cases.append([str(stock_adapter), "me/x", "--base-model", str(folders / "stock"), *token])
    kinds = []
    for argv in cases:
        kwargs = {"token": "hf_x"} if token[-1] in argv else {}
        if "--base-model" in argv:
            kwargs["base_model"] = argv[argv.index("--base-model") + 1]
        with pytest.raises((hub.HubPushError, ValueError)) as api_error:
            hub.push_to_hub(argv[0], argv[1], **kwargs)
        kinds.append(api_error.type)
        line = _one_line_error(capsys, main(["push", *argv]))
        assert line == f"hf-posenc push: error: {api_error.value}"
    assert kinds == [hub.MissingTokenError, ValueError, ValueError, hub.NotLoadableError, hub.UnconvertedBaseError]
    # -v shows where it came from.
    with pytest.raises(hub.MissingTokenError):
        main(["-v", "push", *cases[0]])


def test_cli_push_without_a_token_is_one_line_exit_2(folders, tmp_path):
    """Through the installed entry point, as a user runs it: the API's message, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-m", "hf_posenc.cli", "push", str(folders / "converted"), "me/x"],
                          capture_output=True, text=True, env=env, timeout=120)
    with pytest.raises(hub.MissingTokenError) as api_error:
        hub.resolve_token(False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"hf-posenc push: error: {api_error.value}"], proc.stderr


# ----------------------------------------------------------------------------------- Python API
def test_load_adapter_missing_folder_says_so(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match=r"load_adapter: the adapter folder '/nonexistent' does not exist"):
        hf_posenc.load_adapter(model, "/nonexistent")
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json"):
        hf_posenc.load_adapter(model, tmp_path)


def test_patch_config_of_a_model_says_it_expects_a_config():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"patch_config expects a config .* got the model LlamaForCausalLM: "
                                        r"pass model.config .* or use hf_posenc.convert\(model, ...\)"):
        hf_posenc.patch_config(model, PosEncConfig(kind="alibi"))
    assert hf_posenc.posenc_of(hf_posenc.patch_config(model.config, PosEncConfig(kind="alibi"))).kind == "alibi"


def test_lora_config_names_itself_and_its_arguments():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"hf_posenc.lora_config\(\) got an unexpected keyword argument 'rank' "
                                        r"\(did you mean r=\?\); allowed: r, alpha, dropout, train_position_tables, "
                                        r"longlora, target_modules, modules_to_save, or any other "
                                        r"peft.LoraConfig field"):
        hf_posenc.lora_config(model, rank=16)
    with pytest.raises(TypeError, match=r"'lora_alpha' \(did you mean alpha=\?\)"):
        hf_posenc.lora_config(model, lora_alpha=32)  # would otherwise be silently overridden by alpha
    with pytest.raises(TypeError, match=r"'nonsense_flag'; allowed"):
        hf_posenc.lora_config(model, nonsense_flag=1)
    config = hf_posenc.lora_config(model, r=4, use_rslora=True)  # LoraConfig fields still pass through
    assert config.r == 4 and config.use_rslora


def test_loading_without_the_plug_in_gives_the_real_install_command(folders, tmp_path):
    """A process where hf_posenc cannot be imported, loading with trust_remote_code."""
    code = ("import sys; sys.modules['hf_posenc'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(folders / 'converted')!r}, trust_remote_code=True)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: This checkpoint was converted by hf_posenc"), proc.stderr[-2000:]
    assert "pip install /path/to/hf_posenc" in last and "not published on PyPI" in last
    assert "Run `pip install hf_posenc`" not in proc.stderr
    readme = (REPO / "README.md").read_text()
    assert "pip install /path/to/hf_posenc" in readme and "pip install hf_posenc`" not in readme


#: PEFT >= 0.19 refuses remote-code bases unless their module is allow-listed; 0.18 has no such check.
ALLOWLIST = ({"import_allowlist": ["hf_posenc"]}
             if "import_allowlist" in inspect.signature(AutoPeftModelForCausalLM.from_pretrained).parameters else {})


def test_auto_peft_loads_an_adapter_of_a_converted_checkpoint(folders):
    """With PEFT's import allowlist naming hf_posenc, AutoPeftModelForCausalLM gives load_adapter's model."""
    base = AutoModelForCausalLM.from_pretrained(folders / "converted").eval()
    _save_adapter(base, folders / "adapter-converted")
    if ALLOWLIST:
        with pytest.raises(ValueError, match=r"import_allowlist=\['hf_posenc.modeling_hf_posenc'\]"):
            AutoPeftModelForCausalLM.from_pretrained(folders / "adapter-converted")
    auto = AutoPeftModelForCausalLM.from_pretrained(folders / "adapter-converted", **ALLOWLIST).eval()
    ours = hf_posenc.load_adapter(AutoModelForCausalLM.from_pretrained(folders / "converted"),
                                  folders / "adapter-converted").eval()
    plain = AutoModelForCausalLM.from_pretrained(folders / "converted").eval()
    x = input_ids()
    with torch.no_grad():
        got, expected, without = auto(x).logits, ours(x).logits, plain(x).logits
    assert torch.equal(got, expected) and not torch.equal(got, without)


def test_auto_peft_on_an_adapter_of_a_stock_base_points_to_load_adapter(folders, config_log):
    """An adapter trained on a model converted in memory names a stock base: refuse, say what works.
    Its PEFT save does not log transformers' model-type mismatch warning (our config subclass caused it)."""
    base = AutoModelForCausalLM.from_pretrained(folders / "stock")
    hf_posenc.convert(base, PosEncConfig(kind="alibi"))
    _save_adapter(base, folders / "adapter-stock")
    assert not [m for m in config_log if MISMATCH in m], config_log
    with pytest.raises(ValueError,
                       match=r"needs `config.posenc`.*stock checkpoint.*hf_posenc.load_adapter\(base, adapter_dir\)"):
        AutoPeftModelForCausalLM.from_pretrained(folders / "adapter-stock", **ALLOWLIST)


def test_mismatch_warning_is_silenced_only_for_the_converted_stock_type(folders, tmp_path, config_log):
    from transformers import Qwen2Config

    from hf_posenc.modeling import posenc_config_class

    own = posenc_config_class(type(tiny_model("llama").config))
    own.from_pretrained(folders / "stock")  # llama -> hf_posenc_llama: expected, silent
    assert not [m for m in config_log if MISMATCH in m]
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    own.from_pretrained(tmp_path / "gpt2")  # gpt2 -> hf_posenc_llama: a real mismatch, still reported
    Qwen2Config.from_pretrained(folders / "stock")  # outside our classes: untouched
    unquoted = [m.replace("`", "") for m in config_log]  # transformers 5.1 does not quote the types
    assert [m for m in unquoted if MISMATCH in m] == [
        m for m in unquoted if "gpt2 to instantiate a model of type hf_posenc_llama" in m
        or "llama to instantiate a model of type qwen2" in m]
    assert len([m for m in config_log if MISMATCH in m]) == 2
    assert not logging.getLogger("transformers.configuration_utils").filters
