"""CUDA only (``pytest -m gpu``): the kernels select chooses on CUDA against the sdpa reference in one model.

Skipped where CUDA is absent, the one skip the suite allows (``pyproject.toml`` registers the marker).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import assert_cuda_sdpa_equals_eager

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kind", ["alibi", "t5_bias", "kerple", "self_extend", "rerope"])
def test_cuda_kernels_equal_the_explicit_attention(kind):
    """CUDA picks compiled flex (bias kinds) or two flex passes (Self-Extend, ReRoPE); the eager backend's
    explicit scores are the reference, forward and backward, on a padded batch."""
    assert_cuda_sdpa_equals_eager(kind)


def test_gpu_benchmark_runs_one_short_group(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("hf_posenc_gpu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = module.main(["--lengths", "1024", "--reps", "1", "--decode-steps", "2", "--encodings", "stock_sdpa",
                           "alibi", "--json", str(tmp_path / "g.json")])
    assert all(r["error"] is None for r in records), records
