"""A small byte-level BPE tokenizer trained with 🤗 ``tokenizers`` on the training split.

Byte-level BPE (Radford et al. 2019, GPT-2, https://openai.com/research/better-language-models;
Sennrich et al. 2016, https://arxiv.org/abs/1508.07909) never meets an unknown character, and a few
thousand merges already make a token carry ~3 bytes of code, so the embedded base model learns more
per training step than a byte-level model at the same cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def _batches(texts: Iterable[str], max_chars: int, batch: int = 64) -> Iterator[list[str]]:
    """Yield lists of texts until ``max_chars`` characters have been produced."""
    seen, buffer = 0, []
    for text in texts:
        if seen >= max_chars:
            break
        buffer.append(text)
        seen += len(text)
        if len(buffer) == batch:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int = 8_000_000):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: Training documents (only the first ``max_chars`` characters are used: merges
            stabilise long before the whole corpus is read, and training time is linear in it).
        vocab_size: Final vocabulary size, the 256 byte symbols and the end-of-text token included.
        max_chars: Character budget for training the merges.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` whose ``eos_token`` (also used as padding) is
        ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols plus one special token, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Start from all 256 bytes so any input (including non-UTF-8 replacement output) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batches(texts, max_chars), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def load_or_train_tokenizer(folder: Path, texts: Iterable[str], vocab_size: int):
    """Load the tokenizer saved in ``folder``, or train it there first."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(str(folder))
    return tokenizer
