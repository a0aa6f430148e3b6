"""The embedded base model: one cache key means one set of weights, and the shipped weights are that build."""

from __future__ import annotations

import json

import pytest
import torch

from hf_posenc.experiments.config import load_config
from hf_posenc.experiments.context_extension import base_model
from hf_posenc.experiments.context_extension import data as corpus
from hf_posenc.experiments.context_extension.config import CompareConfig, PretrainConfig

SHIPPED_INFO = json.loads((base_model.SHIPPED_BASE / "build_info.json").read_text())


def quick_spec() -> PretrainConfig:
    return load_config(CompareConfig, "quick").model.builtin


def test_the_quick_presets_use_the_shipped_base_and_its_files_are_whole(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path))  # an empty cache: nothing may be built
    monkeypatch.delenv(base_model.REBUILD_ENV, raising=False)
    spec = quick_spec()
    assert base_model.ensure_base_model(spec, progress=False) == base_model.SHIPPED_BASE
    assert SHIPPED_INFO["key"] == base_model.base_key(spec)
    assert base_model.weights_checksum(base_model.SHIPPED_BASE) == SHIPPED_INFO["weights_sha256"]
    assert not (tmp_path / "base").exists()
    # Another spec is not the shipped base.
    assert base_model.shipped_base(spec.model_copy(update={"steps": spec.steps + 1})) is None


def _tiny_build(folder):
    spec = PretrainConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          seq_len=64, batch_size=8, steps=12, warmup_steps=2)
    return base_model.pretrain(spec, folder, progress=False)


def test_build_weights_do_not_depend_on_the_callers_thread_count(tmp_path, tmp_path_factory, monkeypatch):
    """A build on a machine whose torch uses 2 threads equals one on 1 thread, bit for bit, and the caller's
    thread count comes back afterwards (a build that measured and switched thread counts gave two bases
    under one key)."""
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "hf_posenc_cache"))
    real_train = base_model.train_bpe_tokenizer  # a small tokenizer sample keeps the test fast
    monkeypatch.setattr(base_model, "train_bpe_tokenizer",
                        lambda texts, size, **kwargs: real_train(texts, size, max_chars=200_000, **kwargs))
    before = torch.get_num_threads()
    try:
        infos = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            infos.append(_tiny_build(tmp_path / f"threads{threads}"))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert infos[0]["weights_sha256"] == infos[1]["weights_sha256"]
    assert infos[0]["threads"] == base_model.BUILD_THREADS
    assert infos[0]["weights_sha256"] == base_model.weights_checksum(tmp_path / "threads2")


@pytest.mark.slow
def test_a_rebuild_equals_the_shipped_weights(tmp_path, monkeypatch):
    """Rebuilds the quick presets' base from scratch (both stages, ~7 min on one idle core) and compares its
    weights with the shipped ones. Bitwise equality is claimed for the library versions that built it."""
    import tokenizers
    import transformers

    built_with = SHIPPED_INFO["versions"]
    here = base_model.build_versions()
    if (here["transformers"], here["tokenizers"]) != (built_with["transformers"], built_with["tokenizers"]) or \
            here["torch"].split("+")[0] != built_with["torch"].split("+")[0]:
        pytest.skip(f"the shipped base was built with {built_with}; these are {here} (transformers "
                    f"{transformers.__version__}, tokenizers {tokenizers.__version__}), where equality is not claimed")
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(base_model.REBUILD_ENV, "1")
    folder = base_model.ensure_base_model(quick_spec(), progress=False)
    assert folder != base_model.SHIPPED_BASE
    assert base_model.weights_checksum(folder) == SHIPPED_INFO["weights_sha256"]
