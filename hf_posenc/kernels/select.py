"""Kernel choice, in one place: from (device, dtype, backend, declared capabilities) to the kernel that runs.

The attention functions (``hf_posenc.attention``) describe each call in a
:class:`~hf_posenc.kernels.call.Call` and run the kernel of :data:`hf_posenc.kernels.KERNELS` that
:func:`select` names; every rule about which kernel is exact and fast where lives here, so it is tested
on its own (``tests/test_kernels.py``) and an encoding only declares what it can do
(``hf_posenc.registry.Capabilities``). The kernels:

* ``eager``: explicit scores and probabilities (``output_attentions``, soft-capping), a dense bias added.
* ``sdpa``: ``F.scaled_dot_product_attention``, a dense bias folded into its float mask when there is one.
* ``key_fold_cpu``: causal ALiBi with its per-key term in an extra head dimension, tiles of query rows on
  the fused CPU kernel (:mod:`hf_posenc.kernels.key_fold`). fp32 only: the folded term of a
  tile reaches ``m * FOLD_TILE_ROWS``, beyond what bf16/fp16 resolve.
* ``key_term_fold_cpu``: the same fold for a differentiable per-key term (FoX's cumulative log forget gates),
  with its gradient (:mod:`hf_posenc.kernels.key_fold`). fp32 only, as ``key_fold_cpu``.
* ``row_tiles``: a causal bias per query row (FIRE) computed and attended tile by tile of query rows, each tile
  recomputed in backward (:mod:`hf_posenc.kernels.row_tiles`); any device and dtype.
* ``diagonal_tiles_cpu``: causal per-diagonal biases on the fused CPU kernel, tile by tile, the learned
  table's gradient from its band (:mod:`hf_posenc.kernels.diagonal_tiles`).
* ``diagonal_tiles_sdpa``: the same tiles on ``F.scaled_dot_product_attention`` (other devices).
* ``attend``: the encoding computes the whole attention itself (it needs the logits: CoPE).
* ``two_position_tiled``: RoPE at two position sets merged exactly (Self-Extend, ReRoPE), tiled two-pass
  pieces with flash-style memory (:mod:`hf_posenc.kernels.two_position`).
* ``two_position_explicit``: the same attention with explicit scores (weights, soft-capping, dropout,
  ``torch.compile``).
* ``flex``, ``flex_compiled``: FlexAttention, the bias as ``score_mod`` and the masks as a block mask, unfused
  (exact anywhere, forward and backward) or ``torch.compile``-d (fused; on CPU forward only)
  (:mod:`hf_posenc.kernels.flex_attention`). The ``flex_attention`` backend runs them; on CUDA they are the bias
  encodings' kernel for the sdpa backend too.
* ``two_position_flex``: Self-Extend/ReRoPE as two compiled flex passes with their log-sum-exp (CUDA).
* ``cope_triton``: CoPE's attention as Triton kernels, forward and backward (CUDA, where triton imports;
  :mod:`hf_posenc.kernels.triton_cope`).

The shared Toeplitz/tiling helpers are in :mod:`hf_posenc.kernels.tiling`.
"""

from __future__ import annotations

import torch

from ..registry import Capabilities
from .call import Call

#: Query rows from which a CPU forward without gradient on the ``flex_attention`` backend takes the compiled
#: kernel: shorter forwards (decode steps, short prompts) are not worth a compilation per shape.
FLEX_CPU_COMPILED_FROM = 1024


def _flex_kernel(call: Call) -> str:
    """``flex_compiled`` where the fused kernel runs this call (CUDA; a long CPU forward without gradient),
    ``flex`` otherwise (and under an outer ``torch.compile``, which fuses the plain call itself)."""
    if call.compiling:
        return "flex"
    if call.device == "cuda":
        return "flex_compiled"
    cpu_forward = call.device == "cpu" and not call.grad and call.queries >= FLEX_CPU_COMPILED_FROM
    return "flex_compiled" if cpu_forward else "flex"


def select(capabilities: Capabilities, call: Call) -> str:
    """The name of the kernel (a key of :data:`hf_posenc.kernels.KERNELS`) for an encoding with
    ``capabilities`` in ``call``."""
    route = capabilities.route
    # Flex has neither weights nor dropout. A row bias built from the call fits where the module gives it as a
    # score_mod (family "flex_rows": FoX's per-key terms, FIRE's MLP).
    rows_fit = capabilities.bias_form != "rows" or "flex_rows" in capabilities.kernels
    flex_fits = not call.explicit and call.dropout == 0 and rows_fit
    if route == "two_position_rope":
        if call.device == "cuda" and flex_fits and not call.compiling:
            # The fused pieces of two_position_tiled call a CPU-only ATen op; flex gives the log-sum-exp on CUDA.
            return "two_position_flex"
        # Explicit scores where the call needs them (weights, soft-capping, dropout) and under torch.compile
        # (the tiles size Python loops from the cache counter); the exact tiled two-pass attention otherwise.
        explicit = call.explicit or call.compiling or call.dropout > 0
        return "two_position_explicit" if explicit else "two_position_tiled"
    if route == "attend":  # it soft-caps the logits it computes itself
        # CoPE's Triton kernel on CUDA (it has no soft-cap); the weights (eager backend) and torch.compile take the
        # PyTorch path.
        triton_fits = call.triton and call.dtype in (torch.float32, torch.bfloat16, torch.float16) and not call.softcap
        if "cope_triton" in capabilities.kernels and call.device == "cuda" and triton_fits and not call.explicit \
                and not call.compiling:
            return "cope_triton"
        return "attend"
    if call.backend == "flex_attention" and flex_fits:
        return _flex_kernel(call)
    if route == "bias" and call.device == "cuda" and flex_fits and call.queries > 1:
        # The fused kernel with the bias as score_mod (decode steps keep a [H, 1, kv] bias row on sdpa: no
        # compilation per cache length).
        return _flex_kernel(call)
    explicit = call.explicit
    if route != "bias" or explicit or not call.causal or call.compiling:
        # Rotation and NoPE change nothing about the kernel; encoder biases do not decompose by diagonal tiles.
        return "eager" if explicit else "sdpa"
    kernels = capabilities.kernels
    if "key_fold" in kernels and call.dtype == torch.float32 and call.queries > 1 and call.cpu_kernel:
        # One-token decode steps excluded: padding the whole cache costs more than a [H, 1, kv] bias row.
        return "key_fold_cpu"
    if "key_term_fold" in kernels and call.dtype == torch.float32 and call.queries > 1 and call.cpu_kernel:
        # As ALiBi's fold (decode steps keep a [B, H, 1, kv] bias row); other dtypes and devices the dense bias.
        return "key_term_fold_cpu"
    if "row_tiles" in kernels and call.queries > 1 and call.dropout == 0:
        # A decode step's bias is one [B, H, 1, kv] row; dropout stays on the dense path (no RNG replay needed).
        return "row_tiles"
    if "diagonal_tiles" in kernels and capabilities.bias_form in ("diagonal", "banded"):
        # Decode steps stay off the CPU tiles: reversing the whole cache for one row costs more than its bias.
        return "diagonal_tiles_cpu" if call.cpu_kernel and call.queries > 1 else "diagonal_tiles_sdpa"
    return "sdpa"
