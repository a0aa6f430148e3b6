"""Text in, fixed-length token windows out (training and evaluation)."""

from __future__ import annotations

import torch

from .paths import cache_dir
from .recipe_config import STDLIB_DATASET, DataConfig


def load_texts(data: DataConfig, split: str) -> list[str]:
    """Documents of one split: the standard-library corpus, or any ``datasets`` dataset."""
    if data.dataset == STDLIB_DATASET:
        from .corpus import load_stdlib_dataset

        ds = load_stdlib_dataset(data.held_out_percent, cache=cache_dir() / "datasets")[split]
    else:
        import datasets

        # Any Hub id (when online) or local path works, e.g. "pg19" or "wikitext" + "wikitext-103-raw-v1".
        ds = datasets.load_dataset(data.dataset, data.dataset_config, split=split)
    if data.text_field not in ds.column_names:
        raise ValueError(f"data.text_field {data.text_field!r} not in columns {ds.column_names}")
    return ds[data.text_field]


def concat_tokens(texts: list[str], tokenizer, max_tokens: int) -> torch.Tensor:
    """Tokenize documents in order, separated by end-of-text, and keep the first ``max_tokens``.

    Evaluating "one long window over concatenated files" is the usual long-context protocol for code
    corpora; the separator keeps document boundaries visible to the model.
    """
    from .base_model import token_stream

    stream = token_stream(texts, tokenizer, max_tokens)
    if len(stream) < max_tokens:
        raise ValueError(f"the corpus has only {len(stream)} tokens, {max_tokens} were requested")
    return stream


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping ``[n, length]`` windows (the tail is dropped)."""
    n = len(stream) // length
    return stream[: n * length].view(n, length)
