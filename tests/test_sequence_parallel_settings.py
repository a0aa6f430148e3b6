"""``train.sp_size``: what the recipes refuse before anything runs, and how they batch windows for Ulysses.

The runs themselves (2 processes against one) are ``tests/test_sequence_parallel_recipe.py`` and, for the
comparison, ``tests/test_sequence_parallel_compare.py`` (slow).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_posenc.experiments.config import ConfigError, load_config
from hf_posenc.experiments.context_extension import compare, sequence_parallel
from hf_posenc.experiments.context_extension.config import CompareConfig, FinetuneConfig, TrainConfig
from hf_posenc.experiments.context_extension.models import ModelSource
from hf_posenc.experiments.context_extension.training import _whole_batches

EMBEDDED = Path(__file__).resolve().parents[1] / "hf_posenc" / "experiments" / "context_extension" / "embedded_base"


def test_windows_must_split_over_the_ranks():
    with pytest.raises(ConfigError, match=r"seq_len \(4097\) must be divisible by sp_size \(2\)"):
        load_config(FinetuneConfig, "finetune_long_context_tiny", ["train.seq_len=4097"])


def test_a_comparison_with_sp_size_runs_only_under_a_launch_of_that_many_processes(tmp_path, monkeypatch):
    """In one process the refusal names the launch that runs it, before anything is written; launched on several
    processes without ``sp_size`` (each would run the whole grid) it names both ways. A zero-shot variant's
    ``sp_size`` is never used. Before the comparison ran under sequence parallelism the config itself was refused:
    ``train.sp_size must be 1 in a comparison, which runs in one process``."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert compare.shared_train_settings(load_config(CompareConfig, "tiny")) is None
    assert compare.shared_train_settings(load_config(CompareConfig, "tiny", ["variants.0.train.sp_size=2"])) is None
    with pytest.raises(ConfigError, match=r"train.sp_size=2 \(variant 'rope_finetuned'\) shares each window between 2 "
                       r"processes, but this comparison runs in one; allowed: train.sp_size=1, or accelerate launch "
                       r"--config_file recipes/accelerate/sequence_parallel.yaml --num_processes 2 recipes/compare.py"):
        compare.run_compare("tiny", tmp_path / "out", ["train.sp_size=2"], progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"launched on 2 processes but no fine-tuned variant sets train.sp_size.*"
                       r"allowed: one process .*, or train.sp_size=2 under accelerate launch"):
        compare.shared_train_settings(load_config(CompareConfig, "tiny"))
    only = "only=[rope,rope_finetuned,rope_linear]"  # one zero-shot, two fine-tunes with the same batch
    shared = compare.shared_train_settings(load_config(CompareConfig, "tiny", ["train.sp_size=2", only]))
    assert (shared.sp_size, shared.seq_len) == (2, 64)


def test_the_fine_tunes_of_a_shared_comparison_agree_on_what_its_launch_fixes(monkeypatch):
    """One DeepSpeed launch fixes the micro batch, accumulation and precision of all its fine-tunes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train.batch_size is 2 in variant 'nope' but 1 in 'rope_finetuned'.*"
                       r"allowed: 1 in every fine-tuned variant"):
        compare.shared_train_settings(load_config(CompareConfig, "tiny", ["train.sp_size=2", "train.seq_len=32"]))
    with pytest.raises(ConfigError, match=r"train.sp_size is 1 in variant 'rope_linear' but 2 in 'rope_finetuned'"):
        compare.shared_train_settings(load_config(CompareConfig, "tiny", ["variants.1.train.sp_size=2"]))


def test_a_shared_comparison_refuses_a_base_whose_heads_the_ranks_cannot_share():
    """The embedded base has 2 heads: 4 ranks cannot share them (checked before any variant runs)."""
    source = ModelSource(str(EMBEDDED), None, "embedded")
    compare._check_heads(source, TrainConfig(sp_size=2, seq_len=32))
    with pytest.raises(ConfigError, match="train.sp_size=4 must divide the model's 2 attention heads"):
        compare._check_heads(source, TrainConfig(sp_size=4, seq_len=32))


def test_the_heads_must_divide_by_sp_size():
    config = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3)
    sequence_parallel.check_model(config, TrainConfig(sp_size=3, seq_len=30))
    with pytest.raises(ValueError, match="train.sp_size=2 must divide the model's 9 attention heads"):
        sequence_parallel.check_model(config, TrainConfig(sp_size=2, seq_len=30))
    gqa = SimpleNamespace(num_attention_heads=12, num_key_value_heads=4)
    sequence_parallel.check_model(gqa, TrainConfig(sp_size=2, seq_len=30))  # 2 KV heads per rank
    with pytest.raises(ValueError, match="key/value heads: one must divide the other"):
        sequence_parallel.check_model(gqa, TrainConfig(sp_size=6, seq_len=30))


def test_a_launch_that_is_not_deepspeed_or_does_not_split_is_refused():
    from accelerate.utils import DistributedType

    cfg = TrainConfig(sp_size=2, seq_len=32, batch_size=1)
    with pytest.raises(ValueError, match="recipes/accelerate/sequence_parallel.yaml"):
        sequence_parallel.check_launch(SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1), cfg)
    with pytest.raises(ValueError, match="train.sp_size=2 must divide the 3 processes"):
        sequence_parallel.check_launch(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=3),
                                       cfg)
    with pytest.raises(ValueError, match="must split evenly over the 2 sequence-parallel groups"):
        sequence_parallel.check_launch(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=4),
                                       cfg)
    sequence_parallel.check_launch(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2), cfg)


def test_missing_deepspeed_and_a_conflicting_launch_size_are_refused(monkeypatch):
    cfg = TrainConfig(sp_size=2, seq_len=32)
    assert sequence_parallel.accelerator_kwargs(TrainConfig()) == {}
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "4")
    with pytest.raises(ValueError, match="parallelism_config_sp_size=4 but train.sp_size=2"):
        sequence_parallel.accelerator_kwargs(cfg)
    real = sequence_parallel.importlib.util.find_spec
    monkeypatch.setattr(sequence_parallel.importlib.util, "find_spec",
                        lambda name: None if name == "deepspeed" else real(name))
    with pytest.raises(ValueError, match=r"needs DeepSpeed: pip install 'hf_posenc\[sp\]'"):
        sequence_parallel.accelerator_kwargs(cfg)


def test_batches_carry_what_the_ulysses_adapter_cuts():
    windows = torch.arange(15).view(5, 3)
    padded = _whole_batches(windows, 4)  # a loader batch is sp_size steps: the last one is filled up
    assert padded.shape == (8, 3) and torch.equal(padded[5:], windows[:3])
    assert torch.equal(_whole_batches(windows, 5), windows)
    batch = sequence_parallel.batch_of([(windows[0],), (windows[1],)])
    assert torch.equal(batch["input_ids"], windows[:2]) and torch.equal(batch["labels"], windows[:2])
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2], [0, 1, 2]]))
    assert sequence_parallel.loader_batch_size(TrainConfig(sp_size=2, batch_size=3, seq_len=32)) == 6
