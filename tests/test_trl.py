"""TRL's ``SFTTrainer`` with its default ``SFTConfig`` (bf16 autocast, gradient checkpointing) on converted models.

This is the setup users reported crashing for ALiBi, T5 bias and CoPE (issue 13): it must train with a
LoRA adapter whose ``modules_to_save`` carries the position tables, and the saved adapter must reload onto
a freshly converted base to the very same logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
# bf16 autocast GEMMs on a tiny model: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["<pad>", "<eos>", "<unk>"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]


def word_tokenizer():
    """A whitespace word-level tokenizer whose ids fit the tiny models' vocabulary (``VOCAB``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def texts(count: int = 32, length: int = 24) -> list[str]:
    """Learnable text: counting runs of words from a random start, so the loss can fall in 10 steps."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(WORDS) - length, (count,), generator=generator).tolist()
    return [" ".join(WORDS[s:s + length]) for s in starts]


@pytest.mark.parametrize("kind", ["alibi", "t5_bias", "cope"])
def test_sft_trainer_defaults_train_lora_and_adapter_reloads(tmp_path, kind):
    model = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(kind=kind))
    config = trl.SFTConfig(output_dir=str(tmp_path / "run"), use_cpu=True, max_steps=10, learning_rate=1e-2,
                           per_device_train_batch_size=8, max_length=32, logging_steps=1, save_strategy="no",
                           report_to=[], seed=0)
    # TRL's defaults, not set here: the configuration that crashed.
    assert config.bf16 and config.gradient_checkpointing
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict({"text": texts()}),
                             processing_class=word_tokenizer(), peft_config=hf_posenc.lora_config(model))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    # Without accelerate's autocast wrapper around forward: logits below are compared in fp32.
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    tables = {n: p.detach().clone() for n, p in trained.named_parameters() if ".posenc." in n and p.requires_grad}
    if kind != "alibi":  # ALiBi has no table; the others trained theirs through modules_to_save
        assert tables and all(t.abs().sum() > 0 for t in tables.values())  # they start at zero
    trained.save_pretrained(str(tmp_path / "adapter"))

    x = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=x).logits
    base = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(kind=kind))  # same seed, fresh tables
    reloaded = hf_posenc.load_adapter(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(input_ids=x).logits
    assert torch.equal(got, expected)
