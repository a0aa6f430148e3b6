"""Sequence parallelism on DeepSpeed Ulysses equals one process, for every kind, with 4 KV heads and with 1.

Two CPU processes over gloo (``torch.multiprocessing.spawn``; ``tests/sp_worker.py``). Each rank holds half of
a 16-token sequence; Ulysses hands each rank the whole sequence for half of the heads, so a per-head table
read at the wrong offset (ALiBi slopes, T5/KERPLE tables, contextual RoPE directions) changes the result. The
learned tables are randomised. Each rank's loss is its tokens' share of the whole sequence's mean, so summed
gradients are one process's (no ZeRO engine here: the recipe's engine divides by its data-parallel size).

Before the head slice (main a60263a), ALiBi with 4 heads failed here with: ``RuntimeError: The expanded size of
the tensor (2) must match the existing size (4) at non-singleton dimension 1.  Target sizes: [1, 2, 16].
Tensor sizes: [4, 16]``.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp
from tiny_models import kinds_where

from hf_posenc import registry

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

WORLD = 2
#: Kinds that run an hf_posenc attention function, and those whose model keeps the stock one (native NoPE).
OWN_ATTENTION = kinds_where(lambda c: c.route is not None)
STOCK_ATTENTION = kinds_where(lambda c: c.route is None)
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(kinds: list[str], kv_heads: int, direct: bool, tmp_path) -> dict:
    import sp_worker

    out = tmp_path / f"sp_{kv_heads}_{direct}.json"
    mp.spawn(sp_worker.ulysses_worker, args=(WORLD, _free_port(), kinds, kv_heads, direct, str(out)), nprocs=WORLD)
    report = json.loads(out.read_text())
    assert report.pop("world_size") == WORLD
    return report


@pytest.fixture(scope="module", params=[4, 1], ids=["mha", "kv1"])
def own_attention_report(request, tmp_path_factory):
    """Every kind on an hf_posenc function, registered with DeepSpeed's own ``register_with_transformers``."""
    return _run(OWN_ATTENTION, request.param, True, tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("kind", OWN_ATTENTION)
def test_ulysses_equals_one_process(own_attention_report, kind):
    result = own_attention_report[kind]
    assert "error" not in result, result.get("error")
    assert result["loss"] < LOSS_TOL and result["grad"] < GRAD_TOL, result
    if registry.get(kind).capabilities.tables:
        assert result["tables"] < GRAD_TOL, result


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "kv1"])
def test_ulysses_stock_attention_kinds(kv_heads, tmp_path):
    """Kinds whose model keeps stock attention (NoPE), through :func:`hf_posenc.parallel.register_ulysses`, which
    wraps the function the model runs."""
    report = _run(STOCK_ATTENTION, kv_heads, False, tmp_path)
    for kind in STOCK_ATTENTION:
        assert "error" not in report[kind] and report[kind]["loss"] < LOSS_TOL and report[kind]["grad"] < GRAD_TOL, (
            kind, report[kind])
