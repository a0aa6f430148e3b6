"""One attention call as every kernel takes it: what :func:`~hf_posenc.kernels.select.select` reads, and the
tensors and per-call facts the chosen kernel runs on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import registry
from ..positions import causal_diagonal

#: The capabilities of a layer without an encoding module (a NoPE layer).
NO_ENCODING = registry.Capabilities()


@dataclass(frozen=True)
class Heads:
    """The contiguous query heads ``[start, start + count)`` of a layer's ``total`` that one attention call
    holds (sequence parallelism: DeepSpeed Ulysses gives rank ``r`` the heads ``[r H / P, (r + 1) H / P)``;
    :func:`hf_posenc.parallel.head_slice`). Per-head tables take their rows with :meth:`of` (query heads) or
    :meth:`of_kv` (key/value heads), so that no kernel or encoding computes an offset of its own.
    """

    start: int
    count: int
    total: int

    def of(self, table: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The rows of ``table`` (one per query head along ``dim``) that this call holds."""
        return table.narrow(dim, self.start, self.count)

    def of_kv(self, table: torch.Tensor, local_kv: int, dim: int = 0) -> torch.Tensor:
        """The rows of ``table`` (one per key/value head along ``dim``) of the call's ``local_kv`` KV heads.

        The call's first query head belongs to KV head ``start * Hkv // H``; its KV heads follow on from it
        (with fewer KV heads than ranks, DeepSpeed repeats them first and each rank holds one).
        """
        first = self.start * table.shape[dim] // self.total
        return table.narrow(dim, first, local_kv)


def own_heads(heads: Heads | None, table: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``table`` (one row per query head of the layer along ``dim``) restricted to a call's heads (None: all)."""
    return table if heads is None else heads.of(table, dim)


@dataclass(frozen=True, eq=False)
class Call:
    """One attention call.

    The first fields describe the call (all that the kernel choice depends on, so that
    :func:`~hf_posenc.kernels.select.select` is tested from them alone); the others carry what the kernel
    runs on and default to nothing.

    Attributes:
        device: ``query.device.type`` (``"cpu"``, ``"cuda"``, ...).
        dtype: The compute dtype (after autocast).
        backend: ``"eager"``, ``"sdpa"`` or ``"flex_attention"`` (which of our attention functions runs).
        causal: The layer is causal.
        queries: Query rows in this call (1 for a decode step).
        compiling: Under ``torch.compile`` (the tiled kernels size Python loops from the cache counter and
            set thread flags, which it cannot trace).
        softcap: The layer soft-caps its logits (only explicit scores can).
        dropout: Attention dropout probability in effect (0 in eval).
        fused_cpu: This torch has the fused CPU kernel's ATen op.
        triton: The triton package imports here (CoPE's Triton kernel on CUDA).
        grad: A gradient is needed: autograd is on and q/k/v or the layer's tables require one (FlexAttention
            has no fused backward on CPU).
        query: ``[B, H, q, D]``; key, value: ``[B, Hkv, kv, D]`` (after the cache update, before any cast).
        attention_mask: transformers' 4D mask for ``backend`` (bool for sdpa, float for eager) or None.
        q_pos, k_pos: Positions of the queries ``[q]`` and keys ``[kv]`` (int64;
            :func:`hf_posenc.positions.positions`), or an image's ``[q, 2]`` patch grid positions.
        past: Tokens cached before this forward (int, or a 0-d tensor for StaticCache).
        scaling: Logit scale.
        logit_cap: The soft-capping constant when ``softcap`` (Gemma 2).
        training: The attention module is in training mode.
        posenc: The layer's position module (None: a NoPE layer).
        capabilities: Its registry entry's capabilities.
        position_ids: The model's ``[B, q]`` positions, where the call received them.
        heads: The layer's query heads this call holds (None: all of them; :class:`Heads`). A bias, slopes or
            any other per-head table of the encoding is restricted to them with :func:`own_heads`.
        rotated_keys: The cache layer's store of keys already rotated (``hf_posenc.rotated_keys.RotatedKeys``),
            or None; see :attr:`key_store`.
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
    triton: bool = True
    grad: bool = False
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    past: Any = 0
    scaling: float | None = None
    logit_cap: float | None = None
    training: bool = False
    posenc: Any = None
    capabilities: registry.Capabilities = NO_ENCODING
    position_ids: torch.Tensor | None = None
    heads: Heads | None = None
    rotated_keys: Any = None

    @property
    def cpu_kernel(self) -> bool:
        """Whether the fused CPU kernel can take this call (it runs without dropout)."""
        return (self.fused_cpu and self.device == "cpu" and self.dropout == 0
                and self.dtype in (torch.float32, torch.bfloat16, torch.float16))

    @property
    def key_store(self) -> Any:
        """The store of rotated keys where this call may use it: inference (no gradient) outside
        ``torch.compile``; None otherwise (the rotations then run over every key, differentiably)."""
        return None if self.grad or self.compiling else self.rotated_keys

    @property
    def explicit(self) -> bool:
        """Whether the call needs explicit scores (the eager backend's weights, soft-capping)."""
        return self.backend == "eager" or self.softcap

    @property
    def plain_causal(self) -> bool:
        """Stock fast path: no mask given and queries aligned with keys (prefill without a StaticCache)."""
        return self.causal and self.attention_mask is None and self.queries == self.key.shape[2]

    @property
    def every_key_visible(self) -> bool:
        """No mask and every query may see every key (a decode step of a causal layer: its one query comes after
        every cached key), so that no mask needs to be built or applied. False under ``torch.compile``, where
        :attr:`diagonal` is not a Python int."""
        if self.attention_mask is not None or self.compiling:
            return False
        return not self.causal or self.diagonal >= self.key.shape[2] - 1

    @property
    def diagonal(self) -> int:
        """Causal query row ``r`` may see key index ``j`` iff ``j <= r + diagonal`` (a Python int: not for
        use under ``torch.compile``; :func:`hf_posenc.positions.causal_diagonal`)."""
        return causal_diagonal(self.past, self.queries, self.key.shape[2])
