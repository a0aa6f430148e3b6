"""Kernel choice, in one place: from (device, dtype, backend, declared capabilities) to the kernel that runs.

The attention functions (``hf_posenc.attention``) describe each call in a :class:`Call` and run whatever
:func:`select` returns; every rule about which kernel is exact and fast where lives here, so it is tested
on its own (``tests/test_kernels.py``) and an encoding only declares what it can do
(``hf_posenc.registry.Capabilities``). The kernels:

* ``eager``: explicit scores and probabilities (``output_attentions``, soft-capping), a dense bias added.
* ``sdpa``: ``F.scaled_dot_product_attention``, a dense bias folded into its float mask when there is one.
* ``key_fold_cpu``: causal ALiBi with its per-key term in an extra head dimension, tiles of query rows on
  the fused CPU kernel (``hf_posenc.cpu_attention.TiledFoldAttention``). fp32 only: the folded term of a
  tile reaches ``m * FOLD_TILE_ROWS``, beyond what bf16/fp16 resolve.
* ``diagonal_tiles_cpu``: causal per-diagonal biases on the fused CPU kernel, tile by tile, the learned
  table's gradient from its band (``hf_posenc.cpu_attention.TiledBiasAttention``).
* ``diagonal_tiles_sdpa``: the same tiles on ``F.scaled_dot_product_attention`` (other devices).
* ``attend``: the encoding computes the whole attention itself (it needs the logits: CoPE).

The shared Toeplitz/tiling helpers are in :mod:`hf_posenc.tiling`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import Capabilities

KERNELS = ("eager", "sdpa", "key_fold_cpu", "diagonal_tiles_cpu", "diagonal_tiles_sdpa", "attend", "two_position_rope")


@dataclass(frozen=True)
class Call:
    """What the kernel choice depends on, for one attention call.

    Attributes:
        device: ``query.device.type`` (``"cpu"``, ``"cuda"``, ...).
        dtype: The compute dtype (after autocast).
        backend: ``"eager"`` or ``"sdpa"`` (which of our attention functions runs).
        causal: The layer is causal.
        queries: Query rows in this call (1 for a decode step).
        compiling: Under ``torch.compile`` (the tiled kernels size Python loops from the cache counter and
            set thread flags, which it cannot trace).
        softcap: The layer soft-caps its logits (only explicit scores can).
        dropout: Attention dropout probability in effect (0 in eval).
        fused_cpu: This torch has the fused CPU kernel's ATen op.
    """

    device: str
    dtype: torch.dtype
    backend: str
    causal: bool = True
    queries: int = 1
    compiling: bool = False
    softcap: bool = False
    dropout: float = 0.0
    fused_cpu: bool = True

    @property
    def cpu_kernel(self) -> bool:
        """Whether the fused CPU kernel can take this call (it runs without dropout)."""
        return (self.fused_cpu and self.device == "cpu" and self.dropout == 0
                and self.dtype in (torch.float32, torch.bfloat16, torch.float16))


def select(capabilities: Capabilities, call: Call) -> str:
    """The kernel (one of :data:`KERNELS`) for an encoding with ``capabilities`` in ``call``.

    Raises:
        ValueError: The encoding needs the logits and the layer soft-caps them (conversion refuses this).
    """
    route = capabilities.route
    if route == "two_position_rope":
        # Its own exact two-pass attention (tiled flash pieces, or explicit scores where a call needs them).
        return "two_position_rope"
    if route == "attend":
        if call.softcap:
            raise ValueError("An encoding that computes its own logits cannot soft-cap them; conversion refuses "
                             "this combination (allowed: a config with attn_logit_softcapping=None).")
        return "attend"
    explicit = call.backend == "eager" or call.softcap
    if route != "bias" or explicit or not call.causal or call.compiling:
        # Rotation and NoPE change nothing about the kernel; encoder biases do not decompose by diagonal tiles.
        return "eager" if explicit else "sdpa"
    kernels = capabilities.kernels
    if "key_fold" in kernels and call.dtype == torch.float32 and call.queries > 1 and call.cpu_kernel:
        # One-token decode steps excluded: padding the whole cache costs more than a [H, 1, kv] bias row.
        return "key_fold_cpu"
    if "diagonal_tiles" in kernels and capabilities.bias_form in ("diagonal", "banded"):
        # Decode steps stay off the CPU tiles: reversing the whole cache for one row costs more than its bias.
        return "diagonal_tiles_cpu" if call.cpu_kernel and call.queries > 1 else "diagonal_tiles_sdpa"
    return "sdpa"
