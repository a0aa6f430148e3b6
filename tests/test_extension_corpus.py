"""Corpus split, tokenizer, cache location."""

from __future__ import annotations

import hashlib

import pytest

from hf_posenc.extension import corpus, paths
from hf_posenc.extension.tokenizer import train_bpe_tokenizer


def test_split_is_disjoint_deterministic_and_stdlib_only():
    splits = corpus.split_files(5)
    train, held = set(splits["train"]), set(splits["validation"])
    assert train and held and not train & held
    assert not any("site-packages" in p for p in train | held)
    assert len(held) / (len(train) + len(held)) == pytest.approx(0.05, abs=0.03)
    # The split is a function of the relative path alone: recompute it independently.
    root = corpus.stdlib_root()
    for p in list(held)[:20]:
        rel = p[len(str(root)) + 1 :]
        assert int.from_bytes(hashlib.sha1(rel.encode()).digest()[:4], "big") % 100 < 5
    assert corpus.split_files(5) == splits


def test_held_out_percent_is_validated():
    with pytest.raises(ValueError, match="held_out_percent"):
        corpus.split_files(0)


def test_dataset_has_one_row_per_file(tmp_path):
    ds = corpus.load_stdlib_dataset(5, cache=tmp_path)
    splits = corpus.split_files(5)
    assert ds["validation"].num_rows == len(splits["validation"])
    first = open(splits["validation"][0], encoding="utf-8", errors="replace").read()
    assert ds["validation"][0]["text"] == first


def test_bpe_tokenizer_round_trips_and_compresses():
    texts = ["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50, "é ü — 漢字 \x00"]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    assert len(tok) <= 300 and tok.eos_token == "<|endoftext|>"
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: lossless even for unseen characters
    assert len(tok(texts[0])["input_ids"]) < len(texts[0].encode()) / 2
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=200)


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
