"""The push plan (``hub.plan_push``) and the conversion's record of being native, without any Hub.

A plan is decided from local files alone, so these tests forbid every network connection and assert
on what the plan holds: the paths, the bytes behind them, the commit operations and the card. Whether
a checkpoint is native is recorded at conversion (``config.posenc_native``); checkpoints saved before
that record existed must give the same answers, so each check runs on both.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from peft import get_peft_model
from tiny_models import input_ids, randomize_position_tables, tiny_model
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig, cards, cli, hub
from hf_posenc.architectures import MODEL_TYPE_PREFIX
from hf_posenc.config import NATIVE_KEY
from hf_posenc.convert import is_native_checkpoint
from hf_posenc.results import EvalSummary, records_from_rows

STUB = "modeling_hf_posenc.py"
# Both persistence routes: native RoPE variants (stock checkpoints) and the plug-in (remote code).
ENCODINGS = {
    "yarn": ("llama", {"kind": "rope", "rope_type": "yarn", "factor": 2.0}),
    "dynamic": ("llama", {"kind": "rope", "rope_type": "dynamic", "factor": 2.0}),
    "rope": ("llama", {"kind": "rope"}),
    "interleaved": ("llama", {"kind": "rope", "layout": "interleaved"}),
    "yarn-layer0": ("llama", {"kind": "rope", "rope_type": "yarn", "factor": 2.0, "layers": [0]}),
    "alibi": ("llama", {"kind": "alibi"}),
    "nope": ("llama", {"kind": "nope"}),
    "cope": ("llama", {"kind": "cope", "npos_max": 16}),
    "rope-gpt2": ("gpt2", {"kind": "rope"}),
    "rope-phi": ("phi", {"kind": "rope", "rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture
def offline(monkeypatch):
    """Any connection attempt fails the test: a plan must be decided without the network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a plan made a network call: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _as_legacy(folder: Path, dest: Path) -> Path:
    """A copy of ``folder`` as hf_posenc saved it before conversions recorded ``posenc_native``."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    del config[NATIVE_KEY]
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder as saved now, the same folder without the record, the converted model)."""
    root = tmp_path_factory.mktemp("plan")
    out = {}
    for name, (arch, params) in ENCODINGS.items():
        model = hf_posenc.convert(tiny_model(arch, "sdpa"), PosEncConfig(**params))
        randomize_position_tables(model)
        model.eval().save_pretrained(root / name)
        out[name] = (root / name, _as_legacy(root / name, root / f"{name}-legacy"), model)
    stock = tiny_model("llama")
    stock.save_pretrained(root / "stock")
    out["stock"] = (root / "stock", None, stock)
    return out


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ----------------------------------------------------------------------------- the recorded fact
@pytest.mark.parametrize("name", ENCODINGS)
def test_conversion_records_whether_the_checkpoint_is_native(saved, name):
    folder, legacy, _ = saved[name]
    config = _config(folder)
    # The independent fact: a native checkpoint is a stock one, so save_pretrained wrote no remote code
    # and kept the stock model type; the plug-in route writes both.
    stock_checkpoint = not (folder / STUB).exists() and not config["model_type"].startswith(MODEL_TYPE_PREFIX)
    assert config[NATIVE_KEY] is stock_checkpoint
    assert is_native_checkpoint(config) is stock_checkpoint
    assert is_native_checkpoint(_config(legacy)) is stock_checkpoint, "derived for an old checkpoint"


def test_the_record_follows_patch_config_and_revert():
    model = tiny_model("llama")
    for params, native in (({"kind": "rope", "rope_type": "yarn", "factor": 2.0}, True), ({"kind": "alibi"}, False)):
        patched = hf_posenc.patch_config(model.config, PosEncConfig(**params))
        assert getattr(patched, NATIVE_KEY) is native and is_native_checkpoint(patched) is native
        hf_posenc.convert(model, PosEncConfig(**params))
        assert getattr(model.config, NATIVE_KEY) is native
        hf_posenc.revert(model)
        assert not hasattr(model.config, NATIVE_KEY) and is_native_checkpoint(model.config) is None


def test_a_stock_config_records_nothing_and_a_bad_record_is_named():
    assert is_native_checkpoint(tiny_model("llama").config) is None
    with pytest.raises(ValueError, match="posenc_native='yes' must be true or false"):
        is_native_checkpoint({"model_type": "llama", "posenc": {"kind": "rope"}, NATIVE_KEY: "yes"})


@pytest.mark.parametrize("name", ["yarn", "alibi"])
def test_old_checkpoints_load_and_describe_as_recorded_ones(saved, name, capsys):
    folder, legacy, model = saved[name]
    with torch.no_grad():
        want = model(input_ids()).logits
        for path in (folder, legacy):
            assert torch.equal(AutoModelForCausalLM.from_pretrained(path).eval()(input_ids()).logits, want), path
    described = []
    for path in (folder, legacy):
        assert cli.main(["info", str(path)]) == 0
        described.append(capsys.readouterr().out.splitlines()[1:])  # line 0 names the folder
    assert described[0] == described[1]
    assert ("(native)" in "\n".join(described[0])) is (name == "yarn")


# ------------------------------------------------------------------------------------- the plan
def test_plan_of_a_stock_folder_uploads_its_files_and_a_card(saved, offline):
    folder = saved["stock"][0]
    plan = hub.plan_push(folder, "me/stock")
    files = {p.name for p in folder.iterdir()}
    assert plan.kind == "model" and set(plan.paths) == files | {"README.md"}
    assert all(plan.uploads[name] == folder / name for name in files)  # uploaded from disk, as saved
    assert plan.uploads["README.md"] == str(plan.card).encode()
    meta = plan.card.data.to_dict()
    assert meta["library_name"] == "transformers" and "custom_code" not in meta["tags"]
    assert 'from_pretrained("me/stock")' in plan.card.text and "trust_remote_code" not in plan.card.text
    assert plan.default_message == "Upload model (the model's own positional encoding) with hf_posenc"
    assert plan.identity["model_type"] == "llama" and plan.identity["posenc"] is None


def test_plan_operations_add_every_upload_and_delete_only_what_is_not_replaced(saved, offline):
    folder = saved["stock"][0]
    plan = hub.plan_push(folder, "me/stock")
    ops = plan.operations(delete=["old.bin", "config.json", "README.md"])
    adds = [op for op in ops if isinstance(op, CommitOperationAdd)]
    assert sorted(op.path_in_repo for op in adds) == list(plan.paths)
    assert [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)] == ["old.bin"]
    readme = next(op for op in adds if op.path_in_repo == "README.md")
    assert readme.path_or_fileobj == plan.uploads["README.md"]
    weights = next(op for op in adds if op.path_in_repo == "model.safetensors")
    assert weights.upload_info.size == (folder / "model.safetensors").stat().st_size


@pytest.mark.parametrize("name", ["yarn", "alibi", "cope"])
def test_plan_card_says_how_to_load_from_the_record_and_old_checkpoints_plan_the_same(saved, name, offline):
    folder, legacy, _ = saved[name]
    native = _config(folder)[NATIVE_KEY]
    plan = hub.plan_push(folder, "me/enc", hub.CardOptions(base_model="stock/llama"))
    assert plan.card_info.native is native
    assert ("custom_code" in plan.card.data.tags) is not native
    assert ("trust_remote_code=True" in plan.card.text) is not native
    assert (STUB in plan.paths) is not native
    assert f"posenc-{ENCODINGS[name][1]['kind']}" in plan.card.data.tags
    old = hub.plan_push(legacy, "me/enc", hub.CardOptions(base_model="stock/llama"))
    assert old.card_info.native is native and old.uploads["README.md"] == plan.uploads["README.md"]
    assert old.identity == plan.identity  # the record is no part of which model a repo holds


def test_a_record_that_contradicts_the_checkpoint_is_refused(saved, tmp_path, offline):
    # The push reads the record: a plug-in checkpoint that claims to be stock, and a stock one that
    # claims to need the plug-in, are both refused (sniffing the model type would accept each).
    for name, claim, match in (("alibi", True, "records a native .* but has hf_posenc's model_type"),
                               ("yarn", False, "stock transformers would load it WITHOUT that encoding")):
        folder = shutil.copytree(saved[name][0], tmp_path / name)
        config = {**_config(folder), NATIVE_KEY: claim}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(hub.NotLoadableError, match=match):
            hub.plan_push(folder, "me/x")


def test_plan_with_results_adds_the_plot_and_the_numbers(saved, offline):
    rows = [{"method": "this", "length": 16, "perplexity": 3.5}, {"method": "this", "length": 32, "perplexity": 4.25}]
    results = EvalSummary(records_from_rows(rows))
    plan = hub.plan_push(saved["alibi"][0], "me/alibi", hub.CardOptions(results=results, training={"steps": 3}))
    assert plan.uploads[cards.PLOT_FILENAME].startswith(b"\x89PNG")
    assert {r.metric_value for r in plan.card.data.eval_results} == {3.5, 4.25}
    assert "| steps | 3 |" in plan.card.text and f"({cards.PLOT_FILENAME})" in plan.card.text
    quiet = hub.plan_push(saved["alibi"][0], "me/alibi", hub.CardOptions(results=results, plot=False))
    assert cards.PLOT_FILENAME not in quiet.paths and cards.PLOT_FILENAME not in quiet.card.text


def test_plan_for_the_resolved_repo_renders_the_card_again(saved, offline):
    plan = hub.plan_push(saved["stock"][0], "stock")
    resolved = plan.for_repo("someone/stock")
    assert 'from_pretrained("someone/stock")' in resolved.card.text
    assert resolved.uploads["README.md"] == str(resolved.card).encode()
    assert 'from_pretrained("stock")' in plan.card.text  # the plan itself is unchanged
    assert {p: v for p, v in resolved.uploads.items() if p != "README.md"} == {
        p: v for p, v in plan.uploads.items() if p != "README.md"}


@pytest.fixture
def adapters(saved, tmp_path):
    """Two saved adapters of the CoPE base: one naming the base's local folder, one a Hub id."""
    base_dir = saved["cope"][0]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, hf_posenc.lora_config(base))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(tmp_path / "local")
    # Written by hand: peft's save_pretrained would look a Hub id up on the real Hub.
    remote = shutil.copytree(tmp_path / "local", tmp_path / "remote")
    adapter_config = json.loads((remote / "adapter_config.json").read_text())
    remote_config = {**adapter_config, "base_model_name_or_path": "me/cope-base"}
    (remote / "adapter_config.json").write_text(json.dumps(remote_config))
    return base_dir, tmp_path / "local", remote


def test_plan_of_an_adapter_points_it_at_the_hub_base_and_keeps_peft_metadata(adapters, offline):
    base_dir, local, remote = adapters
    plan = hub.plan_push(local, "me/lora", hub.CardOptions(base_model="me/cope-base"))
    written = json.loads((local / "adapter_config.json").read_text())
    pushed = json.loads(plan.uploads["adapter_config.json"])
    assert pushed == {**written, "base_model_name_or_path": "me/cope-base"}  # only the base changes
    assert plan.kind == "adapter" and plan.identity["base_model_name_or_path"] == "me/cope-base"
    meta = plan.card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["base_model"] == "me/cope-base"
    assert {"posenc-cope", "lora", "base_model:adapter:me/cope-base"} <= set(meta["tags"])
    encoding = cards.describe_encoding(_config(base_dir)["posenc"])
    assert plan.default_message == f"Upload LoRA adapter ({encoding}) with hf_posenc"

    # Without a local base, the plan needs the base config given: it never reads the Hub itself.
    with pytest.raises(hub.UnconvertedBaseError, match="pass base_config="):
        hub.plan_push(remote, "me/lora")
    given = hub.plan_push(remote, "me/lora", base_config=_config(base_dir))
    assert given.card.data.to_dict()["tags"] == meta["tags"]


def test_bad_arguments_are_named_before_any_planning(tmp_path, offline):
    with pytest.raises(ValueError, match="repo_id='a/b/c' is not a Hub repo id"):
        hub.plan_push(tmp_path, "a/b/c")
    with pytest.raises(ValueError, match="has neither config.json .* nor adapter_config.json"):
        hub.plan_push(tmp_path, "me/x")
    with pytest.raises(ValueError, match="is not a folder"):
        hub.plan_push(tmp_path / "missing", "me/x")
    with pytest.raises(ValueError, match="revision='refs/pr/1' is a pull request ref"):
        hub.CommitOptions(revision="refs/pr/1", create_pr=True)
    assert hub.CommitOptions().branch == "main" and hub.CommitOptions(revision="dev").branch == "dev"
