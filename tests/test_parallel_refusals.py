"""What sequence parallelism refuses, and how a call's head slice maps onto per-head tables (one process, no
DeepSpeed needed: the multi-process comparisons are ``tests/test_sequence_parallel.py``)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import converted

from hf_posenc import parallel
from hf_posenc.kernels.call import Heads, own_heads

ParallelismConfig = pytest.importorskip("accelerate.parallelism_config").ParallelismConfig


def test_no_head_slice_outside_sequence_parallelism():
    assert parallel.head_slice(4, 4) is None
    assert parallel.head_slice(2, 4) is None  # no DeepSpeed group: nothing to read an offset from


@pytest.mark.parametrize(("heads", "kv_total", "kv_local", "want"), [
    (Heads(2, 2, 4), 4, 2, [2, 3]),  # MHA, rank 1 of 2
    (Heads(2, 2, 4), 2, 1, [1]),     # GQA 2 KV heads, rank 1 of 2
    (Heads(2, 2, 4), 1, 1, [0]),     # 1 KV head repeated to every rank
    (Heads(3, 1, 4), 2, 1, [1]),     # 2 KV heads repeated over 4 ranks, rank 3
])
def test_heads_take_their_rows(heads, kv_total, kv_local, want):
    assert heads.of_kv(torch.arange(kv_total), kv_local).tolist() == want
    assert own_heads(heads, torch.arange(4)).tolist() == list(range(heads.start, heads.start + heads.count))
    assert own_heads(None, torch.arange(4)).tolist() == [0, 1, 2, 3]


def test_context_parallelism_refused_for_own_attention():
    model = converted("llama", "alibi", "sdpa")
    with pytest.raises(ValueError, match=r"context parallelism \(cp_size\).*sp_size=N, sp_backend='deepspeed'"):
        parallel.check_parallelism(model, ParallelismConfig(cp_size=2))
    parallel.check_parallelism(converted("llama", "nope", "sdpa"), ParallelismConfig(cp_size=2))  # stock attention


def test_tensor_parallelism_refused_for_per_head_tables():
    with pytest.raises(ValueError, match=r"tensor parallelism \(tp_size\)"):
        parallel.check_parallelism(converted("llama", "t5_bias", "sdpa"), ParallelismConfig(tp_size=2))


def test_sequence_parallelism_wraps_the_models_function():
    import inspect

    from accelerate.parallelism_config import ParallelismConfig as Config

    if "sp_size" not in inspect.signature(Config).parameters:
        pytest.skip("this accelerate has no sequence parallelism (ParallelismConfig(sp_size=...))")
    model = converted("llama", "kerple", "sdpa")
    with pytest.raises(ValueError, match="must wrap the model's attention 'hf_posenc_sdpa', not 'sdpa'"):
        parallel.check_ulysses(model, "sdpa")
    with pytest.raises(ValueError, match="must wrap the model's attention 'hf_posenc_sdpa'"):
        parallel.check_parallelism(model, ParallelismConfig(sp_size=2, sp_backend="deepspeed"))
    config = parallel.sequence_parallel_config(model, 2)
    assert config.sp_size == 2 and config.sp_handler.sp_attn_implementation == "hf_posenc_sdpa"
