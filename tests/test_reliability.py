"""No silent wrong model: what a checkpoint or an adapter records is checked against what the model runs.

Each test here failed before its fix (issue 24): a record that the model did not run, or that it ran as
something else, loaded without a word.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig
from tiny_models import converted, input_ids, tiny_model


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
