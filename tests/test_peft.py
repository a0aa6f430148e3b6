"""PEFT LoRA on converted models: training, adapter save/reload, merge, refusal on an unconverted base."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import input_ids, randomize_position_tables, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig


def train(model, steps=20, lr=3e-2, seed=0):
    torch.manual_seed(seed)
    model.train()
    # A periodic sequence: learnable in a few steps, and it needs positions/copying to predict.
    batch = input_ids(4, 6, seed=seed).repeat(1, 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.mark.parametrize("arch,kind", [("llama", "cope"), ("llama", "t5_bias"), ("gpt2", "alibi"),
                                       ("gpt_neox", "rope"), ("qwen2", "nope")])
def test_lora_trains_saves_reloads_and_merges(tmp_path, arch, kind):
    base = hf_posenc.convert(tiny_model(arch, "sdpa"), PosEncConfig(kind=kind, layers=[0] if kind == "rope" else None))
    has_tables = hf_posenc.peft_utils.has_position_tables(base) if hasattr(hf_posenc, "peft_utils") else None
    config = hf_posenc.lora_config(base, r=4, alpha=8)
    assert (config.modules_to_save == ["posenc"]) == (kind in ("cope", "t5_bias")), (config.modules_to_save, has_tables)
    model = get_peft_model(base, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "posenc" in n and p.requires_grad}
    model, losses = train(model)
    # Only rank-4 adapters (and position tables) train on a tiny model: a clear, steady drop.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses
    for name, value in before.items():  # the position tables themselves were trained
        assert not torch.equal(dict(model.named_parameters())[name], value), name
    x = input_ids(2, 10, seed=5)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")

    fresh = hf_posenc.convert(tiny_model(arch, "sdpa"), PosEncConfig(kind=kind, layers=[0] if kind == "rope" else None))
    reloaded = hf_posenc.load_adapter(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-4, atol=1e-5)
    assert type(merged).__name__.startswith("HfPosenc") or kind == "rope"


def test_adapter_with_tables_refuses_unconverted_or_other_base(tmp_path):
    base = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="cope", npos_max=8))
    randomize_position_tables(base)
    model = get_peft_model(base, hf_posenc.lora_config(base, r=2))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="the base has no position tables \\(not converted\\?\\)"):
        hf_posenc.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    other = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="t5_bias"))
    with pytest.raises(ValueError, match="position tables this base lacks .*; the base has 2 others"):
        hf_posenc.load_adapter(other, tmp_path / "adapter")


def test_longlora_switch_trains_embeddings_and_norms():
    base = hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="alibi"))
    config = hf_posenc.lora_config(base, longlora=True)
    assert {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"} <= set(config.modules_to_save)
    model = get_peft_model(base, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("input_layernorm" in n for n in trainable)
