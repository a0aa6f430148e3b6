"""RoPE at two position sets chosen by distance: the position modules of Self-Extend and ReRoPE.

Both training-free extensions keep RoPE's exact relative distance ``i - j`` for keys near the query and
give far keys another, smaller distance. The attention that merges the two regimes exactly is a kernel
(:mod:`hf_posenc.kernels.two_position`); the modules here give it q/k rotated at both position sets.

The position modules (:class:`TwoPositionRope` and its subclasses) rotate with the model's own RoPE
frequencies and scaling (every ``rope_type``, from transformers' ``ROPE_INIT_FUNCTIONS`` via
:class:`~hf_posenc.encodings.rope.RotaryPosition`): conversion neutralises the stock rotation, so the KV
cache holds unrotated keys. A cached key's rotations never change, so generation keeps them beside the cache
(:mod:`hf_posenc.rotated_keys`): a prefill keeps both, and decode keeps the far ones only, as one key tensor with
the near band rotated relative to the query (:meth:`TwoPositionRope.decode_keys`), so that a decode step is one
attention call that rotates its new far key and the band (``window`` rows), not the cache.
"""

from __future__ import annotations

import torch

from ..config import fail_field
from .rope import RotaryPosition, rotate_pairs


def _near_and_far(near: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Near positions ``[n]`` and far positions ``[n]`` or ``[B, n]`` as two position sets, ``[(B,) 2, n]``."""
    return torch.stack(torch.broadcast_tensors(near, far), dim=-2)


def check_every_layer(kind: str, layers) -> None:
    """The extensions apply to every RoPE layer: a layer left out would lose RoPE, not keep it."""
    if layers is not None:
        fail_field(kind, "layers", layers, "None (the extension applies to every RoPE layer; a layer left out "
                   "would lose RoPE, not keep it)")


class TwoPositionRope(RotaryPosition):
    """RoPE with exact distances below ``window`` and another distance beyond (base of Self-Extend, ReRoPE).

    Subclasses define :meth:`far_positions`. The module has no parameters: a converted checkpoint holds
    exactly the stock weights.

    Args:
        rope_parameters, head_dim, max_position_embeddings, layout: The model's own RoPE
            (:class:`~hf_posenc.encodings.rope.RotaryPosition`).
        window: Keys at distance ``i - j < window`` keep RoPE's exact positions.
    """

    #: Generation keeps rotated keys beside the cache (:mod:`hf_posenc.rotated_keys`): both rotations after a
    #: prefill, the far ones in decode.
    keeps_rotated_keys = True
    #: Whether the far positions are integers (a decode step then reads cos/sin from a kept table).
    integer_positions = False
    #: Whether the far positions change when every position shifts by the same amount (Self-Extend's
    #: floor division does): rows are then positioned by ``position_ids``, not by cache index.
    shift_variant = False

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, layout: str = "half",
                 *, window: int):
        super().__init__(rope_parameters, head_dim, max_position_embeddings, layout)
        self.window = int(window)

    def far_positions(self, q_pos, k_pos):
        """Rotation positions of the far regime for query and key positions (tensors of the same shapes, any
        dtype; Python ints too where :attr:`integer_positions`)."""
        raise NotImplementedError

    @staticmethod
    def row_offsets(q_pos: torch.Tensor, position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Per row, cache index minus model position (``[B, 1]``; None: they agree).

        A left-padded row's cache indices count its pads; ``position_ids`` (which ``generate`` derives from
        the attention mask) do not. The last query of a row is a real token in a left-padded batch, so it
        gives the row's offset, which holds for every cached key of that row too.
        """
        if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != q_pos.shape[0]:
            return None
        offsets = q_pos[-1] - position_ids[:, -1:].to(q_pos.device)  # [B|1, 1]
        return offsets.expand(batch, 1) if offsets.shape[0] == 1 else offsets

    def far_keys_unrotated(self, scaling: float) -> bool:
        """Whether every far key's rotation is the identity (ReRoPE rotates far keys at position 0), so that the
        far keys are the cached keys themselves: no rotated copy is made or kept."""
        return False

    def _positions(self, q_pos, k_pos, position_ids, batch: int, live: bool):
        """``(seq_len, offsets, q_far_pos, k_far_pos)`` of a call: the frequency length, the per-row offsets of a
        shift-variant encoding (``[B, 1]`` or None) and the far positions (``[q]``/``[kv]``, or ``[B, q]``/``[B, kv]``
        per row)."""
        seq_len = int(q_pos.max()) + 1 if live else self.max_position_embeddings
        q_rows, k_rows = q_pos, k_pos
        offsets = None
        if self.shift_variant:
            offsets = self.row_offsets(q_pos, position_ids, batch)
            if offsets is not None:
                q_rows, k_rows = q_pos[None] - offsets, k_pos[None] - offsets  # [B, q], [B, kv]
        return (seq_len, offsets, *self.far_positions(q_rows, k_rows))

    def _signature(self, inv_freq, scaling, shifts: tuple | None, first: int, key) -> tuple:
        """What a stored rotation depends on: a new frequency table (dynamic scaling past the pretraining length),
        other row offsets (``shifts``) or another first key position makes it stale."""
        return self, inv_freq, scaling, shifts, first, key.dtype, key.shape[:2]

    def near_and_far(self, query, key, q_pos, k_pos, *, live: bool, position_ids=None, store=None):
        """q/k rotated at the near (cache) positions and at the far positions, before any cast.

        Both rotations of a tensor come from one cos/sin table and one pass (``rotate_at_sets``); the two
        results are views of one ``[B, H, 2, n, D]`` tensor.

        Args:
            query: ``[B, H, q, D]`` unrotated; key: ``[B, Hkv, kv, D]`` unrotated (from the cache).
            q_pos, k_pos: Cache positions ``[q]``, ``[kv]`` (int64).
            live: Frequencies for the live length (dynamic / longrope); False under ``torch.compile`` (the
                maximum length: no data-dependent length).
            position_ids: The model's ``[B, q]`` positions (used by shift-variant encodings only).
            store: The cache layer's :class:`~hf_posenc.rotated_keys.RotatedKeys` (inference only), or None.
                Both rotations of a key depend on that key, its position, the frequencies and (Self-Extend)
                its row's offset only, so the rows it holds are reused and only new keys are rotated.

        Returns:
            ``(q_near, k_near, q_far, k_far)``, shapes as ``query`` and ``key``.
        """
        seq_len, offsets, q_far_pos, k_far_pos = self._positions(q_pos, k_pos, position_ids, query.shape[0], live)
        both = self.rotate_at_sets(query, _near_and_far(q_pos, q_far_pos), seq_len)  # [B, H, 2, q, D]
        q_near, q_far = both[:, :, 0], both[:, :, 1]
        inv_freq, scaling = self.frequencies(seq_len, key.device)
        unrotated_far = self.far_keys_unrotated(scaling)
        name = "near" if unrotated_far else "near_and_far"
        start = 0
        if store is not None:
            shifts = None if offsets is None else tuple(offsets.flatten().tolist())
            signature = self._signature(inv_freq, scaling, shifts, int(k_pos[0]), key)
            start = min(store.valid_rows(signature), store.rows_of(name))
        new = key[:, :, start:]
        if unrotated_far:
            k_near = self.rotate_at(new, k_pos[start:], seq_len)
            if store is not None:
                k_near = store.extend(name, k_near, start)
            k_far = key
        else:
            both = self.rotate_at_sets(new, _near_and_far(k_pos[start:], k_far_pos[..., start:]), seq_len)
            if store is not None:
                both = store.extend(name, both, start)  # [B, Hkv, 2, kv, D]
            k_near, k_far = both[:, :, 0], both[:, :, 1]
        if store is not None:
            store.covers(key)
        return q_near, k_near, q_far, k_far

    def decode_keys(self, query, key, q_pos, k_pos, split: int, limit: int, *, position_ids=None, store=None):
        """One query row's rotations as one key tensor, for a single attention call (a decode step).

        A near key does not need its own rotation: with the query rotated once at its far position ``f``, the
        near key ``j`` rotated at ``f - (i - j)`` gives the score of distance ``i - j`` (``R(a)^T R(b) = R(b - a)``,
        one rounding of the angle as in stock RoPE). So far keys (rotated at their far positions) and the near
        band (rotated relative to ``f``) sit in one ``[B, Hkv, limit, D]`` tensor that plain attention reads once,
        instead of two passes and a merge. Far rotations never change: the store keeps them (rows ``[0, split)``)
        and a step rotates the keys that just became far; the near band (``limit - split <= window`` rows) is
        rotated again at every step, into the rows after them.

        Args:
            query: ``[B, H, 1, D]`` unrotated; key: ``[B, Hkv, kv, D]`` unrotated (from the cache).
            q_pos, k_pos: Cache positions ``[1]``, ``[kv]`` (int64).
            split: Keys before it are far.
            limit: Keys from it on are not visible (``split <= limit <= kv``).
            position_ids: As :meth:`near_and_far`.
            store: As :meth:`near_and_far`; it then holds the far rows only (the pairs of a prefill are freed).

        Returns:
            ``(q_far [B, H, 1, D], keys [B, Hkv, limit, D])``, before any cast.
        """
        seq_len = int(q_pos[-1]) + 1
        inv_freq, scaling = self.frequencies(seq_len, key.device)
        unrotated_far = self.far_keys_unrotated(scaling)
        k0 = int(k_pos[0])
        shifts = None  # per row, cache index minus model position (as row_offsets, as Python ints)
        if self.shift_variant and position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == 1:
            shifts = tuple(seq_len - 1 - p for p in position_ids[:, -1].tolist())
            shifts = shifts * query.shape[0] if len(shifts) == 1 else shifts
        rotations = None
        if self.integer_positions and (shifts is None or len(set(shifts)) == 1):
            rotations = self._table_rotations(query, key, seq_len - 1, k0, split, limit, seq_len,
                                              shifts[0] if shifts else 0)
        if rotations is None:
            rotations = self._computed_rotations(query, key, q_pos, k_pos, split, limit, seq_len, position_ids)
        q_far, far, near_band = rotations

        def far_rows(start: int, stop: int, out=None) -> torch.Tensor:
            if unrotated_far:
                rows = key[:, :, start:stop]
                return rows if out is None else out.copy_(rows)
            return far(start, stop, out)

        if store is None:
            return q_far, torch.cat((far_rows(0, split), near_band()), dim=2)
        done = min(store.valid_rows(self._signature(inv_freq, scaling, shifts, k0, key)), store.rows_of("far"))
        if done < split:
            paired = "near" if unrotated_far else "near_and_far"
            slots = store.slots("far", done, split, key)
            if not unrotated_far and store.rows_of(paired) >= split:  # after a prefill: its far half, copied once
                slots.copy_(store.view(paired)[:, :, 1, done:split])
            else:
                far_rows(done, split, out=slots)
        store.drop("near")
        store.drop("near_and_far")
        near_band(out=store.slots("far", split, limit, key, scratch=True))
        store.covers(key)
        return q_far, store.view("far", limit)  # [B, Hkv, limit, D]

    def _table_rotations(self, query, key, i: int, k0: int, split, limit, seq_len, shift: int):
        """:meth:`decode_keys`' rotations where every row of the batch has the same integer positions (Self-Extend
        without left pads, ReRoPE): positions are Python ints and cos/sin rows of a kept table, the near band a
        slice of it (``f - (i - j)`` is consecutive), so a step computes no angle and few operations. Returns
        ``(q_far, far(start, stop, out), near_band(out))``, or None where a position could be negative. ``i`` and
        ``k0`` are the cache positions of the query and of the first key."""
        f, _ = self.far_positions(i - shift, 0)
        first = f - (i - k0 - split)  # the band's first rotation position
        if first < 0 or k0 - shift < 0:  # (a key before the row's first token, a left pad: computed angles)
            return None
        # Every far key position is at most the query's (floor(j / G) <= floor(i / G); ReRoPE's 0).
        cos, sin = self.table(f + 1, seq_len, key.device, key.dtype)
        q_far = rotate_pairs(query, cos[f:f + 1], sin[f:f + 1], self.rotary_dim, self.layout)

        def far(start: int, stop: int, out=None) -> torch.Tensor:
            if stop - start == 1:  # a decode step's one key that just became far: a row of the table
                _, at = self.far_positions(0, k0 + start - shift)
                rows = slice(at, at + 1)
            else:
                _, rows = self.far_positions(0, torch.arange(k0 + start - shift, k0 + stop - shift, device=key.device))
            return rotate_pairs(key[:, :, start:stop], cos[rows], sin[rows], self.rotary_dim, self.layout, out=out)

        def near_band(out=None) -> torch.Tensor:
            n = limit - split
            return rotate_pairs(key[:, :, split:limit], cos[first:first + n], sin[first:first + n], self.rotary_dim,
                                self.layout, out=out)

        return q_far, far, near_band

    def _computed_rotations(self, query, key, q_pos, k_pos, split, limit, seq_len, position_ids):
        """:meth:`decode_keys`' rotations with their angles computed (per-row offsets, fractional positions), as
        :meth:`_table_rotations` returns them."""
        _, _, q_far_pos, k_far_pos = self._positions(q_pos, k_pos, position_ids, query.shape[0], True)
        band = q_far_pos[..., -1:] - (q_pos[-1] - k_pos[split:limit])  # [n] or [B, n]: f - (i - j)

        def rotated(x, positions, out):
            result = self.rotate_at(x, positions, seq_len)
            return result if out is None else out.copy_(result)

        def far(start: int, stop: int, out=None) -> torch.Tensor:
            return rotated(key[:, :, start:stop], k_far_pos[..., start:stop], out)

        def near_band(out=None) -> torch.Tensor:
            return rotated(key[:, :, split:limit], band, out)

        return self.rotate_at(query, q_far_pos, seq_len), far, near_band

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"

