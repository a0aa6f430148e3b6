"""Contextual RoPE: RoPE at positions counted by learned per-key widths, on the fused attention kernel.

The seed idea of CoPE (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719): a position counts what
the tokens are, not only how many there are. For each key/value head ``h`` with a learned vector ``u_h``::

    w_j = 2 * sigmoid(k_j . u_h)              # width of token j, in (0, 2); u_h = 0 at conversion: w_j = 1
    p_j = k_pos[0] + sum_{t <= j} w_t - 1     # running sum over the keys of one row and head
    q_i rotated at p_i, k_j rotated at p_j    # the model's own RoPE (frequencies, scaling, layout, partial)

so with every width 1 the positions are exactly the stock ones and the layer is the model's own RoPE. Query
``i`` takes the position of its own token (GQA: query heads take their key/value group's positions). After
the rotation the **stock attention kernel runs unchanged** (fused causal SDPA, or eager).

**How it differs from CoPE.** CoPE's gates ``sigmoid(q_i . k_j)`` depend on the query: every (query, key)
pair has its own position ``p_ij``, which needs the ``[q, kv]`` logits before the softmax, so CoPE computes
its own attention. Here the widths depend on the key alone: one position per key and head, shared by every
query, which is what RoPE needs to stay a rotation of q and k, so no ``[q, kv]`` tensor exists outside the
kernel. The price: a token cannot count differently for different queries (CoPE can count, say, only the
sentences relevant to one query).

**Cache.** The widths come from the keys, which our routes cache unrotated (the stock rotation is
neutralised, the rotation happens here). A key's width, position and rotation depend on it and the keys
before it only, so generation with the default cache keeps the rotated keys and the widths' running sum beside
the cache (:mod:`hf_posenc.rotated_keys`) and a decode step computes its new keys only. Any other cache,
and a cache that beam search reordered or that was cropped, recomputes every position from the cached keys:
StaticCache's empty slots lie after the keys, so no prefix sum reads them. The running sum starts at the
first cached key's index: a sliding-window cache that dropped keys shifts every position alike, which RoPE's
relative form cancels (exactly while every width is 1). Left pads shift a row's positions by a constant too.

**Precision and memory.** Widths in fp32, their running sum in fp64 (positions then in fp32, like the
stock integer positions), angles in fp32. One autograd function (:class:`_ContextualRotation`) rotates q
and k and keeps only their rotations (which the attention kernel keeps anyway), the widths and the positions
for backward: the unrotated keys that ``du`` needs are rotated back, and cos/sin are recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .. import registry
from ..config import PosEncConfig
from .rope import RotaryPosition, rotate_pairs, rotation_cos_sin
from .windowed_rope_attention import check_every_layer

#: Rows per chunk of the backward's rotations (bounds its temporaries to a chunk's cos/sin and unrotated keys).
CHUNK_ROWS = 128


@dataclass(frozen=True)
class ContextualRopeConfig(PosEncConfig):
    """Contextual RoPE on the model's own RoPE: positions are running sums of learned widths
    ``2 * sigmoid(k_j . u_h)`` (the seed idea of CoPE, https://arxiv.org/abs/2405.18719, with one position
    per key instead of one per (query, key) pair, so the fused attention kernel runs). ``u`` is zero at
    conversion: a converted model is exactly the model's own RoPE until it is trained (PEFT
    ``modules_to_save=["posenc"]``). RoPE models only.

    Args:
        layers: None: every RoPE layer (a layer left out would lose RoPE, not keep it).
    """

    kind: str = "contextual_rope"
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        check_every_layer(self.kind, self.layers)


def _widths_and_positions(key: torch.Tensor, direction: torch.Tensor, first: torch.Tensor):
    """Widths ``2 sigmoid(k . u)`` and positions ``first + cumsum(w) - 1``, both ``[B, Hkv, kv]``.

    Widths in at least fp32 (fp64 stays fp64); the running sum in fp64, so that its rounding does not grow
    with the length (fp32 over 8k keys would drift by ~0.1), then positions in the widths' precision.
    """
    acc = torch.promote_types(key.dtype, torch.float32)
    logits = torch.matmul(key.to(acc), direction.to(acc)[:, :, None])[..., 0]  # [B, Hkv, kv]
    widths = 2 * torch.sigmoid(logits)
    positions = (widths.double().cumsum(-1) + (first.double() - 1)).to(acc)
    return widths, positions


def _appended_positions(new_keys: torch.Tensor, direction: torch.Tensor, first: int, carried: torch.Tensor | None):
    """Positions ``[B, Hkv, m]`` of keys appended after others whose widths sum to ``carried`` (fp64 ``[B, Hkv]``,
    None: no key before), and the new running sum: :func:`_widths_and_positions` continued over a cache."""
    acc = torch.promote_types(new_keys.dtype, torch.float32)
    logits = torch.matmul(new_keys.to(acc), direction.to(acc)[:, :, None])[..., 0]  # [B, Hkv, m]
    sums = (2 * torch.sigmoid(logits)).double().cumsum(-1)
    if carried is not None:
        sums += carried[..., None]
    return (sums + (first - 1)).to(acc), sums[..., -1].clone()


def _angle_gradient(grad: torch.Tensor, rotated: torch.Tensor, rotary_dim: int, layout: str) -> torch.Tensor:
    """``dL/d angle`` per rotation pair, ``[..., n, rotary_dim / 2]``.

    A rotated pair ``(y1, y2)`` moves with its angle as the pair turned by another 90 degrees, ``(-y2, y1)``
    (the cos/sin factor is already in ``y``), so ``dL/da = g2 y1 - g1 y2``.
    """
    if layout == "half":
        half = rotary_dim // 2
        first, second = slice(0, half), slice(half, rotary_dim)
    else:
        first, second = slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)
    return torch.mul(grad[..., second], rotated[..., first]).addcmul_(grad[..., first], rotated[..., second], value=-1)


def _chunks(length: int, rows: int = CHUNK_ROWS):
    for start in range(0, length, rows):
        yield slice(start, min(start + rows, length))


class _ContextualRotation(torch.autograd.Function):
    """q and k rotated at the positions their keys' widths give (see the module docstring).

    Args (``apply``, positional):
        query: ``[B, H, q, D]``; key: ``[B, Hkv, kv, D]`` (unrotated, from the cache).
        direction: ``u``, ``[Hkv, D]``.
        q_index: ``[q]`` int64: the key index of each query's own token.
        first: ``[1]`` int64: the cache index of the first key (the positions' offset).
        inv_freq: ``[rotary_dim / 2]`` fp32; scaling: the cos/sin factor; rotary_dim, layout: the model's RoPE.

    Returns:
        ``(query, key)`` rotated, in their dtypes.
    """

    @staticmethod
    def _query_cos_sin(k_cos, k_sin, positions, q_index, inv_freq, scaling, dtype):
        """cos/sin of the queries, ``[B, Hkv, 1, q, rotary_dim / 2]``: the keys' own in a prefill (every key is
        a query), else from the queries' positions."""
        if q_index.shape[0] == positions.shape[-1] and dtype == k_cos.dtype:
            return k_cos[:, :, None], k_sin[:, :, None]
        return rotation_cos_sin(positions.index_select(-1, q_index)[:, :, None], inv_freq, scaling, dtype)

    @staticmethod
    def forward(ctx, query, key, direction, q_index, first, inv_freq, scaling, rotary_dim, layout):
        batch, heads, q_len, dim = query.shape
        kv_heads = key.shape[1]
        widths, positions = _widths_and_positions(key, direction, first)
        k_cos, k_sin = rotation_cos_sin(positions, inv_freq, scaling, key.dtype)  # [B, Hkv, kv, rotary_dim / 2]
        k_rot = rotate_pairs(key, k_cos, k_sin, rotary_dim, layout)
        q_cos, q_sin = _ContextualRotation._query_cos_sin(k_cos, k_sin, positions, q_index, inv_freq, scaling,
                                                          query.dtype)
        # Query heads grouped by their KV head (a view): they broadcast against their group's positions.
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, q_len, dim)
        q_rot = rotate_pairs(grouped, q_cos, q_sin, rotary_dim, layout).reshape(batch, heads, q_len, dim)
        # The rotations are what the attention kernel keeps for its own backward: saving them costs nothing.
        ctx.save_for_backward(q_rot, k_rot, direction, widths, positions, q_index, inv_freq)
        ctx.config = (scaling, rotary_dim, layout, query.dtype, key.dtype)
        return q_rot, k_rot

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k):
        q_rot, k_rot, direction, widths, positions, q_index, inv_freq = ctx.saved_tensors
        scaling, rotary_dim, layout, q_dtype, k_dtype = ctx.config
        batch, heads, q_len, dim = q_rot.shape
        kv_heads = k_rot.shape[1]
        acc = widths.dtype
        grad_q = grad_q.to(acc).reshape(batch, kv_heads, heads // kv_heads, q_len, dim)
        grad_k = grad_k.to(acc)
        # Positions: each pair's angle is p * inv_freq; a query's position is its own key's.
        freq = inv_freq.to(acc)
        d_pos = _angle_gradient(grad_k, k_rot.to(acc), rotary_dim, layout) @ freq  # [B, Hkv, kv]
        q_rotated = q_rot.to(acc).reshape(grad_q.shape)
        d_pos.index_add_(-1, q_index, (_angle_gradient(grad_q, q_rotated, rotary_dim, layout) @ freq).sum(2))
        del q_rotated
        # p_j = first + sum_{t <= j} w_t - 1, so dL/dw_t = sum_{j >= t} dL/dp_j; w = 2 sigmoid(l): dw/dl = w (1 - w/2).
        d_widths = d_pos.flip(-1).cumsum(-1).flip(-1)
        d_logits = d_widths * widths * (1 - widths / 2)  # [B, Hkv, kv]

        # The rotation is orthogonal up to its cos/sin factor s: the gradient turns back by the angle, times s;
        # the unrotated key (for du) is the rotated one turned back, divided by s. Rows in chunks, so that no
        # cos/sin table or unrotated copy of the whole key exists: the peak is the two gradients themselves.
        def turn_back(x, positions, factor):
            cos, sin = rotation_cos_sin(positions, inv_freq, factor, acc)
            return rotate_pairs(x.to(acc), cos, sin, rotary_dim, layout, inverse=True)

        d_key, d_query = torch.empty_like(grad_k), torch.empty_like(grad_q)
        d_direction = d_logits.new_zeros(kv_heads, dim)
        prefill = q_len == positions.shape[-1]  # every key is a query: one pass over both
        for rows in _chunks(positions.shape[-1]):
            key = turn_back(k_rot[:, :, rows], positions[..., rows], 1.0 / scaling)
            d_direction += torch.matmul(d_logits[:, :, None, rows], key).sum(0)[:, 0]  # [Hkv, D]
            d_key[:, :, rows] = turn_back(grad_k[:, :, rows], positions[..., rows], scaling)
            if prefill:
                d_query[:, :, :, rows] = turn_back(grad_q[:, :, :, rows], positions[:, :, None, rows], scaling)
        if not prefill:
            q_positions = positions.index_select(-1, q_index)[:, :, None]  # [B, Hkv, 1, q]
            for rows in _chunks(q_len):
                d_query[:, :, :, rows] = turn_back(grad_q[:, :, :, rows], q_positions[..., rows], scaling)
        d_key.addcmul_(d_logits[..., None], direction.to(acc)[:, None, :])  # the widths read the key too
        return (d_query.reshape(batch, heads, q_len, dim).to(q_dtype), d_key.to(k_dtype),
                d_direction.to(direction.dtype), None, None, None, None, None, None)


class ContextualRope(RotaryPosition):
    """Contextual RoPE on the model's own RoPE (see the module docstring).

    Args:
        rope_parameters, head_dim, max_position_embeddings, layout: The model's RoPE
            (see :class:`~hf_posenc.encodings.rope.RotaryPosition`).
        num_key_value_heads: Key/value heads: one learned width direction ``u_h`` each.
    """

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, layout: str = "half",
                 *, num_key_value_heads: int):
        super().__init__(rope_parameters, head_dim, max_position_embeddings, layout)
        # u: [Hkv, D], fp32 whatever the model dtype (explicitly: from_pretrained(dtype=bf16) builds under that
        # default dtype and would round it); zero so that every width starts at 1 (the model's own positions).
        self.width_direction = nn.Parameter(torch.zeros(num_key_value_heads, head_dim, dtype=torch.float32))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.width_direction.zero_()

    def positions(self, key: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Widths and positions ``[B, Hkv, kv]`` of cached keys ``[B, Hkv, kv, D]`` at cache indices ``k_pos``."""
        return _widths_and_positions(key, self.width_direction, k_pos[:1])

    #: Decode keeps the rotated keys and the widths' running sum beside the cache (:mod:`hf_posenc.rotated_keys`).
    keeps_rotated_keys = True

    def rotate(self, query, key, q_pos, k_pos, heads=None, store=None):
        # Under sequence parallelism the call holds some heads only: their KV heads' directions.
        direction = self.width_direction if heads is None else heads.of_kv(self.width_direction, key.shape[1])
        if key.shape[1] != direction.shape[0] or query.shape[1] % key.shape[1]:
            raise ValueError(f"contextual_rope: the layer has {self.width_direction.shape[0]} key/value heads but "
                             f"attention received keys with {key.shape[1]} heads (queries: {query.shape[1]}); "
                             "allowed: as many key heads as num_key_value_heads, dividing the query heads.")
        # Frequencies for the live token count (dynamic / longrope), as the plug-in RoPE: not the positions,
        # which widths above 1 may take beyond it.
        inv_freq, scaling = self.frequencies(int(q_pos.max()) + 1, query.device)
        if store is not None:
            return self._rotate_appended(query, key, direction, q_pos, k_pos, inv_freq, scaling, store)
        return _ContextualRotation.apply(query, key, direction, q_pos - k_pos[0], k_pos[:1], inv_freq,
                                         scaling, self.rotary_dim, self.layout)

    def _rotate_appended(self, query, key, direction, q_pos, k_pos, inv_freq, scaling, store):
        """:meth:`rotate` without gradient, reusing the store's rotated keys: a key's width, position and
        rotation depend on that key and the keys before it only, so only the new keys are computed.

        Args:
            store: The cache layer's :class:`~hf_posenc.rotated_keys.RotatedKeys`.
        """
        first = int(k_pos[0])
        signature = (self, direction, direction._version, inv_freq, scaling, first, key.dtype, query.dtype,
                     key.shape[:2])
        start = store.valid_rows(signature)
        q_index = q_pos - first  # [q]: the key index of each query's own token
        lowest = int(q_index.min())
        if start and lowest < start:  # a query of a stored key (not from an appending cache)
            store.clear()
            start = store.valid_rows(signature)
        new = key[:, :, start:]  # [B, Hkv, m, D]
        positions, store.state["sums"] = _appended_positions(new, direction, first, store.state.get("sums"))
        k_cos, k_sin = rotation_cos_sin(positions, inv_freq, scaling, key.dtype)  # [B, Hkv, m, rotary_dim / 2]
        k_rot = store.extend("key", rotate_pairs(new, k_cos, k_sin, self.rotary_dim, self.layout), start)
        store.covers(key)
        batch, heads, q_len, dim = query.shape
        kv_heads = key.shape[1]
        if query.dtype == key.dtype:
            # A query takes its own key's position: its cos/sin are that key's (one table, as in a prefill).
            if q_len == new.shape[-2] and lowest == start:  # the queries are the new keys (consecutive)
                q_cos, q_sin = k_cos[:, :, None], k_sin[:, :, None]
            else:
                rows = q_index - start
                q_cos, q_sin = k_cos.index_select(-2, rows)[:, :, None], k_sin.index_select(-2, rows)[:, :, None]
        else:
            q_cos, q_sin = rotation_cos_sin(positions.index_select(-1, q_index - start)[:, :, None], inv_freq,
                                            scaling, query.dtype)  # [B, Hkv, 1, q, rotary_dim / 2]
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, q_len, dim)
        q_rot = rotate_pairs(grouped, q_cos, q_sin, self.rotary_dim, self.layout).reshape(batch, heads, q_len, dim)
        return q_rot, k_rot

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_key_value_heads={self.width_direction.shape[0]}"


registry.register(registry.Encoding(
    kind="contextual_rope",
    config_class=ContextualRopeConfig,
    module_class=ContextualRope,
    build=lambda config, layer: ContextualRope.from_layer(
        layer, num_key_value_heads=layer.num_key_value_heads or layer.num_heads),
    capabilities=registry.Capabilities(route="rotate", tables=("width_direction",), extends_rope=True),
    display_name="Contextual RoPE",
    paper="https://arxiv.org/abs/2405.18719",
    backends=registry.OWN_BACKENDS,
    example=registry.Example(prefill_kernels=("sdpa", "sdpa"), archs=("llama", "gpt_neox")),
))
