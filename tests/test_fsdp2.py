"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU, 2 processes over gloo (``tests/sp_worker.py``): a
converted model with learned position tables trains a step, is saved from its gathered full state and reloads
in one process with the trained model's logits."""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # about a minute on a loaded 2-core machine: two processes start
WORLD = 2


def test_fsdp2_trains_saves_and_reloads(tmp_path):
    import sp_worker

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "fsdp2.json"
    mp.spawn(sp_worker.fsdp2_worker, args=(WORLD, port, "t5_bias", str(tmp_path / "ckpt"), str(out)), nprocs=WORLD)
    report = json.loads(out.read_text())
    assert report["world_size"] == WORLD
    assert report["tables_moved"] > 0, report  # the step reached every layer's table
    assert report["logits"] < 1e-5, report
