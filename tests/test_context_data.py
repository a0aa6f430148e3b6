"""Corpus split, tokenizer, cache location."""

from __future__ import annotations

import hashlib

import pytest

from hf_posenc.experiments.context_extension import data as corpus
from hf_posenc.experiments.context_extension.base_model import train_bpe_tokenizer


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
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "c"))
    assert corpus.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_base_model_is_built_once_and_keyed_by_its_spec(tmp_path_factory, monkeypatch):
    from pathlib import Path

    import yaml

    from hf_posenc.experiments.context_extension.base_model import base_model_dir, ensure_base_model
    from hf_posenc.experiments.context_extension.config import PretrainConfig

    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "hf_posenc_cache"))
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


def test_stopped_base_pretraining_resumes_to_identical_weights(tmp_path, tmp_path_factory, monkeypatch):
    """A build stopped after a checkpoint continues from it and ends on the weights of an uninterrupted
    build, bit for bit (same batches, same optimizer state, the build's one thread)."""
    import json

    import torch
    from safetensors.torch import load_file

    from hf_posenc.experiments.context_extension import base_model
    from hf_posenc.experiments.context_extension.config import PretrainConfig

    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "hf_posenc_cache"))  # shared corpus
    monkeypatch.setattr(base_model, "CHECKPOINT_EVERY", 4)
    real_train = base_model.train_bpe_tokenizer  # a small tokenizer sample keeps the test fast
    monkeypatch.setattr(base_model, "train_bpe_tokenizer",
                        lambda texts, size, **kwargs: real_train(texts, size, max_chars=200_000, **kwargs))
    spec = PretrainConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          seq_len=32, batch_size=2, steps=11, warmup_steps=2)
    uninterrupted = tmp_path / "a"
    base_model.pretrain(spec, uninterrupted, progress=False)

    stopped = tmp_path / "b"
    real_lr = base_model._lr_at

    def stop_at_step_9(step, s):
        if step == 9:
            raise KeyboardInterrupt  # as a user's Ctrl-C or a session stop would
        return real_lr(step, s)

    monkeypatch.setattr(base_model, "_lr_at", stop_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        base_model.pretrain(spec, stopped, progress=False)
    assert (stopped / "checkpoint.pt").is_file() and not (stopped / "model.safetensors").exists()
    monkeypatch.setattr(base_model, "_lr_at", real_lr)
    info = base_model.pretrain(spec, stopped, progress=False)

    assert info["resumed_from_step"] == 8
    assert not (stopped / "checkpoint.pt").exists()
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert json.loads((uninterrupted / "build_info.json").read_text())["resumed_from_step"] == 0


def test_retrieval_stage_continues_the_cached_code_base_on_the_mix(tmp_path, tmp_path_factory, monkeypatch):
    """With a retrieval stage, the code-only base is built first and cached under its own key; the stage starts
    from its weights and tokenizer and trains on code mixed with retrieval windows, answers weighted."""
    import torch
    from safetensors.torch import load_file

    from hf_posenc.experiments.context_extension import base_model
    from hf_posenc.experiments.context_extension.config import PretrainConfig, RetrievalStageConfig

    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "hf_posenc_cache"))  # shared corpus
    real_train, real_loss = base_model.train_bpe_tokenizer, base_model._loss
    monkeypatch.setattr(base_model, "train_bpe_tokenizer",
                        lambda texts, size, **kwargs: real_train(texts, size, max_chars=200_000, **kwargs))
    calls = []

    def recording_loss(model, batch, answers, weight):
        weights = {name: t.detach().clone() for name, t in model.state_dict().items()} if len(calls) == 3 else None
        calls.append(([answer.stop > answer.start for answer in answers], weight, weights))
        return real_loss(model, batch, answers, weight)

    monkeypatch.setattr(base_model, "_loss", recording_loss)
    spec = PretrainConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          seq_len=256, batch_size=4, steps=3, warmup_steps=1, digit_tokens=True,
                          retrieval=RetrievalStageConfig(steps=3, warmup_steps=1, fraction=0.5, answer_loss_weight=2.0))
    info = base_model.pretrain(spec, tmp_path / "base", progress=False)

    code_base = base_model.base_model_dir(spec.model_copy(update={"retrieval": None}))
    assert info["code_base"] == code_base.name and (code_base / "build_info.json").is_file()
    assert [weight for _, weight, _ in calls] == [0.0] * 3 + [2.0] * 3
    assert not any(any(rows) for rows, _, _ in calls[:3])  # the code stage: code only
    assert any(any(rows) for rows, _, _ in calls[3:])  # then retrieval windows (P(none of 12) = 2^-12)
    first, saved = calls[3][2], load_file(code_base / "model.safetensors")
    assert saved.keys() == first.keys() and all(torch.equal(first[name], saved[name]) for name in saved)
    assert (tmp_path / "base" / "tokenizer.json").read_text() == (code_base / "tokenizer.json").read_text()
    assert info["final_answer_loss"] is not None
