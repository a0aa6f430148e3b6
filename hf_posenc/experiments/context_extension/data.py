"""Text in, token windows out: the standard-library corpus, any ``datasets`` dataset, fixed-length windows.

The default corpus is the running interpreter's standard-library sources: every machine with Python
has ~30 MB of long, real code files, so the quick comparison needs no download. Files (not lines) are
split between training and held-out sets so that evaluation text is never seen in training, and the
split is a pure function of each file's relative path, so it is the same on every machine that has
the same Python version.
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from pathlib import Path

import torch

from .config import STDLIB_DATASET, DataConfig, TrainConfig

#: Environment variable that overrides the cache root.
CACHE_ENV = "HF_POSENC_CACHE"


def cache_dir() -> Path:
    """Return the root of what the recipes build and reuse (base models, tokenized corpus), creating it.

    ``$HF_POSENC_CACHE`` wins; otherwise ``~/.cache/hf_posenc``. The tests point it at a temporary
    folder so they never touch (or depend on) a user's cache.
    """
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_posenc")
    root.mkdir(parents=True, exist_ok=True)
    return root


# Folders that are not the standard library proper (third-party packages) or are not code.
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_root() -> Path:
    """Return the folder holding the standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """List the standard-library ``.py`` files, sorted by relative path, third-party code excluded."""
    root = root or stdlib_root()
    files = [
        path
        for path in root.rglob("*.py")
        if not _EXCLUDED_PARTS.intersection(path.relative_to(root).parts) and path.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(relative_path: str, held_out_percent: int) -> bool:
    """Decide a file's split from a hash of its relative path (stable across runs and machines)."""
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < held_out_percent


def split_files(held_out_percent: int = 5, root: Path | None = None) -> dict[str, list[str]]:
    """Split the standard-library files into ``{"train": [...], "validation": [...]}`` paths."""
    if not 0 < held_out_percent < 100:
        raise ValueError(f"held_out_percent must be in 1..99, got {held_out_percent}")
    root = root or stdlib_root()
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for path in stdlib_files(root):
        relative = path.relative_to(root).as_posix()
        splits["validation" if is_held_out(relative, held_out_percent) else "train"].append(str(path))
    return splits


def load_stdlib_dataset(held_out_percent: int = 5, cache: Path | None = None):
    """Load the split as a ``datasets.DatasetDict`` with one row (column ``text``) per file.

    Uses the ``text`` builder with ``sample_by="document"`` so each source file stays whole and
    long-context windows can be cut from within a file.
    """
    import datasets

    splits = split_files(held_out_percent)
    return datasets.load_dataset(
        "text",
        data_files=splits,
        sample_by="document",
        # A handful of stdlib test files are deliberately not UTF-8; keep them rather than fail.
        encoding_errors="replace",
        cache_dir=str(cache) if cache else None,
    )


def load_texts(data: DataConfig, split: str) -> list[str]:
    """Documents of one split: the standard-library corpus, or any ``datasets`` dataset."""
    if data.dataset == STDLIB_DATASET:
        ds = load_stdlib_dataset(data.held_out_percent, cache=cache_dir() / "datasets")[split]
    else:
        import datasets

        # Any Hub id (when online) or local path works, e.g. "pg19" or "wikitext" + "wikitext-103-raw-v1".
        ds = datasets.load_dataset(data.dataset, data.dataset_config, split=split)
    if data.text_field not in ds.column_names:
        raise ValueError(f"data.text_field {data.text_field!r} not in columns {ds.column_names}")
    return ds[data.text_field]


def token_stream(texts, tokenizer, max_tokens: int) -> torch.Tensor:
    """Tokenize documents in order, each followed by end-of-text, until ``max_tokens`` are collected.

    The separator keeps document boundaries visible to the model.
    """
    chunks, total, batch = [], 0, 32
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), batch):
        for ids in tokenizer(texts[start : start + batch])["input_ids"]:
            chunks.append(torch.tensor(ids + [eos], dtype=torch.long))
            total += len(ids) + 1
        if total >= max_tokens:
            break
    return torch.cat(chunks)[:max_tokens] if chunks else torch.empty(0, dtype=torch.long)


def eval_stream(texts: list[str], tokenizer, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` held-out tokens, documents concatenated in order.

    Evaluating "one long window over concatenated files" is the usual long-context protocol for code
    corpora.

    Raises:
        ValueError: The corpus holds fewer tokens.
    """
    stream = token_stream(texts, tokenizer, max_tokens)
    if len(stream) < max_tokens:
        raise ValueError(f"the corpus has only {len(stream)} tokens, {max_tokens} were requested")
    return stream


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping ``[n, length]`` windows (the tail is dropped)."""
    n = len(stream) // length
    return stream[: n * length].view(n, length)


def training_windows(texts: list[str], tokenizer, cfg: TrainConfig) -> torch.Tensor:
    """The windows of a training run: ``steps x batch_size x grad_accum`` windows of ``seq_len`` tokens.

    Global (the same on every process; Accelerate splits each batch) and seeded by ``cfg.seed``:
    documents are shuffled before being concatenated so windows mix modules, windows are contiguous
    text so long-range structure inside files is kept, and the windows are drawn in a seeded order.
    """
    count = cfg.steps * cfg.batch_size * cfg.grad_accum
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    stream = token_stream([texts[i] for i in order], tokenizer, count * cfg.seq_len)
    chunks = windows(stream, cfg.seq_len)
    if len(chunks) < count:
        # Small corpora: reuse windows (a new epoch) rather than fail.
        chunks = chunks.repeat((count + len(chunks) - 1) // len(chunks), 1)
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(cfg.seed))
    return chunks[perm[:count]].contiguous()
