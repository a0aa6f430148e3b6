"""Hybrid layouts that stock transformers expresses are written as plain stock checkpoints.

SmolLM3 switches RoPE off per layer from ``no_rope_layers`` alone (each attention module's ``use_rope``), so any
set of RoPE and NoPE layers (``layers=``, NoPE everywhere) is a stock SmolLM3 config. Cohere 2 ties RoPE to its
sliding-window layers through ``layer_types``, which also sets the window: only its own set of RoPE layers (with
any stock rope type) is stock there, and any other set takes the plug-in.

Each stock case is saved and loaded by stock transformers in a fresh process that never imports hf_posenc; its
logits must equal the converted model's, and those must equal an independent route: the plug-in forced with
``native=False`` (RoPE), or a stock model built with the layout written by hand (NoPE).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import input_ids, tiny_config
from transformers import AutoModelForCausalLM, SmolLM3Config

import hf_posenc
from hf_posenc import PosEncConfig
from hf_posenc.convert import is_native_checkpoint


def smollm3_config() -> SmolLM3Config:
    """Four layers, the last one natively NoPE (SmolLM3's every-4th-layer pattern)."""
    data = {**tiny_config("smollm3").to_dict(), "num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0],
            "layer_types": ["full_attention"] * 4}
    return SmolLM3Config.from_dict(data)


CONFIGS = {"smollm3": smollm3_config, "cohere2": lambda: tiny_config("cohere2")}  # cohere2: [sliding, full]

#: Each case: architecture, PosEncConfig parameters.
STOCK_CASES = {
    "smollm3_nope_everywhere": ("smollm3", dict(kind="nope", layers=[1, 3])),
    "smollm3_rope_on_alternate_layers": ("smollm3", dict(kind="rope", layers=[0, 2])),
    "smollm3_rope_on_every_layer": ("smollm3", dict(kind="rope", layers=[0, 1, 2, 3])),
    "smollm3_linear_on_one_layer": ("smollm3", dict(kind="rope", rope_type="linear", factor=2.0, layers=[1])),
    "cohere2_rope_on_its_sliding_layers": ("cohere2", dict(kind="rope", layers=[0])),
    "cohere2_linear_on_its_sliding_layers": ("cohere2", dict(kind="rope", rope_type="linear", factor=2.0)),
}

#: Loads each folder with stock transformers only and saves its logits; fails if anything imported hf_posenc.
LOADER = """
import sys, torch
from transformers import AutoModelForCausalLM
folders, ids, out = sys.argv[1].split(","), torch.load(sys.argv[2]), sys.argv[3]
logits = [AutoModelForCausalLM.from_pretrained(f).eval()(ids).logits.detach() for f in folders]
assert "hf_posenc" not in sys.modules, "hf_posenc was imported"
torch.save(logits, out)
"""


def stock_model(arch: str, seed: int = 0, **config_changes):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in config_changes.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()


def converted(case: str, **extra):
    arch, params = STOCK_CASES[case]
    return hf_posenc.convert(stock_model(arch), PosEncConfig(**params, **extra))


@pytest.fixture(scope="module")
def fresh_process_logits(tmp_path_factory):
    """Every stock case saved, then loaded in one fresh process without hf_posenc: its logits by case."""
    root = tmp_path_factory.mktemp("stock_layouts")
    folders = []
    for case in STOCK_CASES:
        converted(case).save_pretrained(root / case)
        folders.append(str(root / case))
    torch.save(input_ids(batch=2, length=14), root / "ids.pt")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # hf_posenc not on the path
    subprocess.run([sys.executable, "-c", LOADER, ",".join(folders), str(root / "ids.pt"), str(root / "out.pt")],
                   check=True, env=env, cwd=root, timeout=600)
    return dict(zip(STOCK_CASES, torch.load(root / "out.pt")))


@pytest.mark.parametrize("case", list(STOCK_CASES))
def test_the_layout_saves_as_a_stock_checkpoint_that_plain_transformers_loads(case, fresh_process_logits, tmp_path):
    arch, params = STOCK_CASES[case]
    model = converted(case)
    assert not type(model).__name__.startswith("HfPosenc") and is_native_checkpoint(model.config) is True
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == arch and "auto_map" not in saved
    ids = input_ids(batch=2, length=14)
    with torch.no_grad():
        ours = model(ids).logits
        if params["kind"] == "rope":
            independent = converted(case, native=False)
            assert type(independent).__name__.startswith("HfPosenc")
        else:  # NoPE: the stock model with every layer's switch off, written by hand, same weights
            independent = stock_model(arch, no_rope_layers=[0] * 4)
        expected = independent(ids).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh_process_logits[case], ours, rtol=0, atol=1e-6)
    assert hf_posenc.posenc_of(AutoModelForCausalLM.from_pretrained(tmp_path)) == hf_posenc.posenc_of(model)


def test_a_layout_cohere2_cannot_express_takes_the_plugin():
    """Cohere 2's layer_types also sets the sliding window: RoPE on its global layer too is not a stock config."""
    model = hf_posenc.convert(stock_model("cohere2"), PosEncConfig(kind="rope", layers=[0, 1]))
    assert type(model).__name__.startswith("HfPosenc") and is_native_checkpoint(model.config) is False
    assert model.config.layer_types == ["sliding_attention", "full_attention"]


def test_revert_restores_the_layout_and_each_layers_switch():
    original = stock_model("smollm3")
    model = copy.deepcopy(original)
    hf_posenc.convert(model, PosEncConfig(kind="rope", layers=[0, 2]))
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [1, 0, 1, 0]
    hf_posenc.revert(model)
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [1, 1, 1, 0]
    ids = input_ids(length=14)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_a_record_the_layout_does_not_match_is_refused():
    """A stock config whose ``no_rope_layers`` were changed by hand after conversion no longer runs the record."""
    model = converted("smollm3_rope_on_alternate_layers")
    config = copy.deepcopy(model.config)
    config.no_rope_layers = [1, 1, 1, 1]
    with pytest.raises(ValueError, match="which stock transformers ignores"):
        hf_posenc.posenc_of(config)
