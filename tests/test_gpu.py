"""CUDA only (``pytest -m gpu``): the kernels select chooses on CUDA against the sdpa reference in one model.

Skipped where CUDA is absent, the one skip the suite allows (``pyproject.toml`` registers the marker).
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import example_params, input_ids, randomize_position_tables, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kind", ["alibi", "t5_bias", "kerple", "self_extend", "rerope"])
def test_cuda_kernels_equal_the_explicit_attention(kind):
    """CUDA picks compiled flex (bias kinds) or two flex passes (Self-Extend, ReRoPE); the eager backend's
    explicit scores are the reference, forward and backward, on a padded batch."""
    model = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(**example_params(kind))).cuda()
    randomize_position_tables(model)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    ids = input_ids(2, 14).cuda()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    results = []
    for m in (model, reference):
        m.zero_grad()
        logits = m(ids, attention_mask=mask).logits * mask[..., None]
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (got, got_grads), (expected, expected_grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for name, grad in expected_grads.items():
        assert ((got_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)) < 1e-3, name


def test_gpu_benchmark_runs_one_short_group(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("hf_posenc_gpu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = module.main(["--lengths", "1024", "--reps", "1", "--decode-steps", "2", "--encodings", "stock_sdpa",
                           "alibi", "--json", str(tmp_path / "g.json")])
    assert all(r["error"] is None for r in records), records
