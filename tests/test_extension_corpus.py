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


def test_base_model_is_built_once_and_keyed_by_its_spec(tmp_path_factory, monkeypatch):
    from pathlib import Path

    import yaml

    from hf_posenc.extension.base_model import base_model_dir, ensure_base_model
    from hf_posenc.extension.recipe_config import PretrainConfig

    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "hf_posenc_cache"))
    tiny = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/configs/compare_tiny.yaml").read_text())
    spec = PretrainConfig(**tiny["model"]["builtin"])
    folder = ensure_base_model(spec, progress=False)
    info = (folder / "build_info.json").stat().st_mtime_ns
    assert ensure_base_model(spec, progress=False) == folder
    assert (folder / "build_info.json").stat().st_mtime_ns == info  # reused, not rebuilt
    assert base_model_dir(PretrainConfig(**{**tiny["model"]["builtin"], "steps": 7})) != folder
    import json

    built = json.loads((folder / "build_info.json").read_text())
    assert built["train_tokens"] == spec.steps * spec.batch_size * spec.seq_len
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    assert config.max_position_embeddings == spec.seq_len and config.hidden_size == spec.hidden_size
