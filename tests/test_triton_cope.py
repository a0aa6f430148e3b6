"""CoPE's Triton kernels (``hf_posenc.kernels.triton_cope``) against CoPE's PyTorch implementation
(``hf_posenc.encodings.cope.cope_attention``, itself checked against the paper's equations in fp64 in
``tests/test_cope_fast.py``), forward and backward.

On CPU the kernels run under Triton's interpreter in a process of its own (``tests/triton_cope_worker.py``:
``TRITON_INTERPRET=1`` must be set before triton is imported). Every case is causal, with a sequence length
that is not a multiple of the tile; the cases add left padding, a cache offset, positions that never reach the
top of the table, a single query row, GQA through the kernel's ``Call``, and fp16 inputs. The interpreter
multiplies bf16 matrices wrongly (``tl.dot`` of two random bf16 16x16 tiles differs from fp32 by ~3e10 in
triton 3.8), so bf16 is checked on CUDA only (``pytest -m gpu``).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import assert_cuda_sdpa_equals_eager

from hf_posenc import kernels
from hf_posenc.encodings.cope import cope_attention
from hf_posenc.kernels.triton_cope import cope_attention_triton

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (the test extra installs it)")

WORKER = Path(__file__).parent / "triton_cope_worker.py"
#: Largest output difference (absolute, outputs of order 1) and relative gradient difference per input dtype.
TOLERANCES = {"fp32": (1e-5, 1e-4), "fp16": (2e-3, 5e-3)}
CASES = ["causal", "padded", "cached", "unclamped", "single_row", "kernel_call", "fp16"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_cope") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=1800)  # CPU time ~20 s; wall time grows with the machine load
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_worker_runs_every_case(report):
    assert sorted(report) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_triton_kernels_equal_the_pytorch_path(report, case):
    output_tol, grad_tol = TOLERANCES["fp16" if case == "fp16" else "fp32"]
    errors = report[case]
    assert errors["output"] <= output_tol, errors
    for name in ("q", "k", "v", "pos_emb"):
        assert errors[name] <= grad_tol, (name, errors)
    assert errors.get("rows_without_keys", 0.0) == 0.0, errors  # zero output where a row sees no key


def test_cases_include_rows_without_keys(report):
    """Left padding leaves query rows that see no key: the padded cases check their zero output."""
    assert {case for case, errors in report.items() if "rows_without_keys" in errors} == {"padded"}


# ---------------------------------------------------------------------------------------------------
# CUDA (pytest -m gpu): the compiled kernels, fp32 and bf16, and the choice in a model
# ---------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, output_tol, grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 3e-2, 5e-2)])
@pytest.mark.parametrize("pads", [(0, 0), (0, 37)])
def test_cuda_kernels_equal_the_pytorch_path(dtype, output_tol, grad_tol, pads):
    """Compiled kernels at their own tile sizes (several tiles of each kind at T = 300, 64 positions)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", generator=generator).to(dtype).requires_grad_()
               for _ in range(3))
    table = (torch.randn(64, 64, device="cuda", generator=generator) * 0.5).requires_grad_()
    keys = torch.arange(300, device="cuda")
    padded = keys >= torch.tensor(pads, device="cuda")[:, None]  # [B, kv]
    allowed = (keys[None, :] <= keys[:, None])[None, None] & padded[:, None, None, :]
    rows = allowed.any(-1, keepdim=True)
    out = cope_attention_triton(q, k, v, allowed, table, 0.125, 0)
    ref, _ = cope_attention(q, k, v, allowed, table, 0.125, 512, diagonal=0)
    grad_out = torch.randn(out.shape, device="cuda", generator=generator) * rows
    grads = torch.autograd.grad(out, (q, k, v, table), grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v, table), grad_out.to(ref.dtype))
    assert ((out.float() - ref.float()) * rows).abs().max() <= output_tol
    for got, want in zip(grads, ref_grads):
        assert (got.float() - want.float()).abs().max() / want.float().abs().max() <= grad_tol


@pytest.mark.gpu
@needs_cuda
def test_cuda_model_takes_the_triton_kernel_and_equals_eager(monkeypatch):
    """A converted CoPE model on CUDA (sdpa backend: ``cope_triton``) against the eager backend's PyTorch path
    (``attend``, explicit weights), forward and backward, on a padded batch."""
    triton_calls = []
    kernel = kernels.KERNELS["cope_triton"]
    monkeypatch.setitem(kernels.KERNELS, "cope_triton", lambda call: triton_calls.append(call) or kernel(call))
    assert_cuda_sdpa_equals_eager("cope")
    assert triton_calls  # the sdpa model ran the Triton kernel
