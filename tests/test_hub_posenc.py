"""Converted models and adapters through the loopback Hub, loaded back in a fresh process.

The reference for every round trip is the converted model in this process: the fresh process, which
knows nothing but the repo id and HF_ENDPOINT, must produce bit-identical logits. A load that fell
back to the stock encoding (the known transformers trap: ``attn_implementation`` and custom classes
are not saved) would give different logits, which is why each encoding is checked on its own repo.
"""

from __future__ import annotations

import json

import pytest
import torch
from hub_server import (  # noqa: F401
    READ_ENDPOINTS,
    USER,
    assert_one_atomic_push,
    hub_server,
    load_in_fresh_process,
    single_thread_logits,
)
from huggingface_hub import ModelCard, hf_hub_download
from peft import LoraConfig, get_peft_model
from tiny_models import allowed_kinds, example_params, randomize_position_tables, tiny_model

import hf_posenc
from hf_posenc import hub

INPUT_IDS = [[5, 17, 42, 8, 99, 3, 61, 23, 7, 88, 14, 2, 35, 70]]

# Every encoding (its registry entry's example; RoPE's is the plug-in route), native RoPE (a stock checkpoint),
# and ALiBi on an architecture without RoPE.
ENCODINGS = {
    "rope-yarn": ("llama", {"kind": "rope", "rope_type": "yarn", "factor": 2.0}),
    **{kind: ("llama", example_params(kind)) for kind in allowed_kinds("llama")},
    "alibi-gpt2": ("gpt2", {"kind": "alibi"}),
}

def converted(arch: str, params: dict, seed: int = 0):
    # sdpa: the backend from_pretrained picks by default, so the reference and the reload run the same kernels.
    model = hf_posenc.convert(tiny_model(arch, "sdpa", seed=seed), hf_posenc.PosEncConfig(**params))
    randomize_position_tables(model)  # zero-initialised tables would hide a table that failed to load
    return model.eval()


def logits_of(model) -> torch.Tensor:
    return single_thread_logits(model, INPUT_IDS)


def test_every_encoding_round_trips_with_identical_logits(hub_server, tmp_path):
    local, specs = {}, []
    for name, (arch, params) in ENCODINGS.items():
        model = converted(arch, params)
        local[name] = logits_of(model)
        result = hub.push_to_hub(model, f"{USER}/{name}", base_model=f"stock/{arch}")
        files = set(hub_server.files(result.repo_id))
        native = name == "rope-yarn"
        # Native RoPE is a plain checkpoint; everything else carries the remote-code stub it names.
        assert ("modeling_hf_posenc.py" in files) is not native, files
        card = ModelCard(hub_server.files(result.repo_id)["README.md"].decode())
        assert f"posenc-{params['kind']}" in card.data.tags and "hf_posenc" in card.data.tags
        assert ("trust_remote_code=True" in card.text) is not native
        assert json.loads(hub_server.files(result.repo_id)["config.json"])["posenc"]["kind"] == params["kind"]
        specs.append({"name": name, "repo": result.repo_id, "input_ids": INPUT_IDS, "trust_remote_code": True})
    # Native RoPE must also load in plain transformers; custom code must refuse without trust_remote_code
    # rather than silently load the stock encoding. These go first: once a trust_remote_code load has
    # imported hf_posenc in the child, its model types are registered and the refusal could not show.
    specs[:0] = [
        {"name": "alibi-stock", "repo": f"{USER}/alibi", "input_ids": INPUT_IDS},
        {"name": "rope-yarn-stock", "repo": f"{USER}/rope-yarn", "input_ids": INPUT_IDS},
    ]
    # And the stock model's logits, to prove the encodings differ from it at all.
    stock = tiny_model("llama")
    stock.save_pretrained(tmp_path / "stock")

    hub_server.clear_calls()
    loaded = load_in_fresh_process(hub_server, specs, tmp_path)
    # Loads only read (which read endpoints, and in which order, is the loading library's business).
    assert "resolve" in hub_server.endpoints() and set(hub_server.endpoints()) <= READ_ENDPOINTS, hub_server.endpoints()
    for name in ENCODINGS:
        assert "error" not in loaded[name], (name, loaded[name])
        assert torch.equal(loaded[name]["logits"], local[name]), name
        assert loaded[name]["posenc"]["kind"] == ENCODINGS[name][1]["kind"]
        if name.endswith("gpt2"):
            continue
        assert not torch.allclose(local[name], logits_of(stock), atol=1e-4), f"{name} equals the stock model"
    assert loaded["rope-yarn"]["class"] == loaded["rope-yarn-stock"]["class"] == "LlamaForCausalLM"
    assert torch.equal(loaded["rope-yarn-stock"]["logits"], local["rope-yarn"])
    assert loaded["rope-yarn-stock"]["hf_posenc_imported"] is False  # plain transformers did it alone
    assert loaded["alibi"]["class"] == "HfPosencLlamaForCausalLM"
    assert "trust_remote_code" in loaded["alibi-stock"]["error"]


def test_adapter_with_position_tables_round_trips_onto_the_converted_base(hub_server, tmp_path):
    base = converted("llama", {"kind": "cope", "npos_max": 16})
    base_repo = hub.push_to_hub(base, f"{USER}/cope-base").repo_id

    peft_model = get_peft_model(
        converted("llama", {"kind": "cope", "npos_max": 16}),
        LoraConfig(r=4, lora_alpha=8, target_modules=hf_posenc.lora_target_modules(base), modules_to_save=["posenc"]),
    )
    # A "fine-tuned" adapter: non-zero LoRA B and changed position tables, so both must travel.
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and "posenc" in name):
                param.add_(torch.randn_like(param) * 0.3)
    peft_model.eval()
    local = logits_of(peft_model)
    assert not torch.allclose(local, logits_of(base), atol=1e-4)

    hub_server.clear_calls()
    result = hub.push_to_hub(peft_model, f"{USER}/cope-lora", base_model=base_repo,
                             training={"steps": 10, "seq_len": 14})
    assert_one_atomic_push(hub_server)
    files = hub_server.files(result.repo_id)
    adapter_config = json.loads(files["adapter_config.json"])
    assert adapter_config["base_model_name_or_path"] == base_repo  # rewritten from the local path
    assert adapter_config["modules_to_save"] == ["posenc"]

    readme = hf_hub_download(result.repo_id, "README.md", endpoint=hub_server.url, cache_dir=str(tmp_path / "c"))
    meta = ModelCard.load(readme).data.to_dict()
    # peft's own metadata survives, ours is added.
    assert meta["library_name"] == "peft" and meta["base_model"] == base_repo
    assert meta["base_model_relation"] == "adapter"
    assert {"hf_posenc", "posenc-cope", "lora", f"base_model:adapter:{base_repo}"} <= set(meta["tags"])

    loaded = load_in_fresh_process(hub_server, [{
        "name": "adapter", "adapter": True, "repo": result.repo_id, "base": base_repo,
        "base_trust_remote_code": True, "input_ids": INPUT_IDS,
    }], tmp_path)
    assert "error" not in loaded["adapter"], loaded["adapter"]
    assert torch.equal(loaded["adapter"]["logits"], local)


def test_adapter_folder_checks_its_base_on_the_hub(hub_server, tmp_path):
    # The adapter folder names a Hub repo as its base: the push reads that repo's config to check it.
    stock_dir = tmp_path / "stock"
    tiny_model("llama").save_pretrained(stock_dir)
    stock_repo = hub.push_to_hub(stock_dir, f"{USER}/stock-base").repo_id
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = stock_repo
    peft_model.save_pretrained(tmp_path / "adapter")
    hub_server.clear_calls()
    with pytest.raises(hub.UnconvertedBaseError, match=f"'{stock_repo}' was not converted with hf_posenc"):
        hub.push_to_hub(tmp_path / "adapter", f"{USER}/stock-lora")
    assert hub_server.endpoints() == ["resolve"]  # only the base's config.json was read
    assert f"{USER}/stock-lora" not in hub_server.repos


def test_encoding_change_on_an_existing_repo_is_a_conflict(hub_server):
    hub.push_to_hub(converted("llama", {"kind": "alibi"}), f"{USER}/enc")
    with pytest.raises(hub.RepoConflictError, match="posenc: remote .*'alibi'.* != local .*'t5_bias'"):
        hub.push_to_hub(converted("llama", {"kind": "t5_bias"}), f"{USER}/enc")
