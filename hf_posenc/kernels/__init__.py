"""Every attention kernel, behind one signature, and the choice between them.

A kernel takes one :class:`~hf_posenc.kernels.call.Call` and returns ``(output [B, H, q, D], probabilities
[B, H, q, kv] or None)``; :func:`~hf_posenc.kernels.select.select` names the kernel of a call from the
encoding's declared capabilities and the call's descriptors alone. The attention functions
(:mod:`hf_posenc.attention`) run ``KERNELS[select(capabilities, call)](call)``.
"""

from __future__ import annotations

from .call import Call
from .dense import eager, sdpa
from .diagonal_tiles import diagonal_tiles_cpu, diagonal_tiles_sdpa
from .flex_attention import flex, flex_compiled, two_position_flex
from .key_fold import key_fold_cpu, key_term_fold_cpu
from .own_attention import attend
from .row_tiles import row_tiles
from .select import select
from .triton_cope import cope_triton
from .two_position import two_position_explicit, two_position_tiled

#: Every kernel by the name :func:`select` gives it.
KERNELS = {
    "eager": eager,
    "sdpa": sdpa,
    "key_fold_cpu": key_fold_cpu,
    "key_term_fold_cpu": key_term_fold_cpu,
    "row_tiles": row_tiles,
    "diagonal_tiles_cpu": diagonal_tiles_cpu,
    "diagonal_tiles_sdpa": diagonal_tiles_sdpa,
    "attend": attend,
    "two_position_tiled": two_position_tiled,
    "two_position_explicit": two_position_explicit,
    "flex": flex,
    "flex_compiled": flex_compiled,
    "two_position_flex": two_position_flex,
    "cope_triton": cope_triton,
}

__all__ = ["KERNELS", "Call", "select"]
