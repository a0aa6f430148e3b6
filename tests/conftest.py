import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (opt in with ``pytest.mark.usefixtures``): on tiny tensors,
    CPU bf16/fp16 GEMMs spend their time synchronising threads (11 ms per 32x32 linear with 2 threads on a
    loaded 2-core machine, 0.1 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
