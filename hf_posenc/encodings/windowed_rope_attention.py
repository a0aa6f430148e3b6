"""RoPE at two position sets chosen by distance: the position modules of Self-Extend and ReRoPE.

Both training-free extensions keep RoPE's exact relative distance ``i - j`` for keys near the query and
give far keys another, smaller distance. The attention that merges the two regimes exactly is a kernel
(:mod:`hf_posenc.kernels.two_position`); the modules here give it q/k rotated at both position sets.

The position modules (:class:`TwoPositionRope` and its subclasses) rotate with the model's own RoPE
frequencies and scaling (every ``rope_type``, from transformers' ``ROPE_INIT_FUNCTIONS`` via
:class:`~hf_posenc.encodings.rope.RotaryPosition`): conversion neutralises the stock rotation, so the KV
cache holds unrotated keys. Both rotations of a cached key never change, so generation keeps them beside the
cache (:mod:`hf_posenc.rotated_keys`) and a decode step rotates its new keys only.
"""

from __future__ import annotations

import torch

from ..config import fail_field
from .rope import RotaryPosition


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

    #: Decode keeps both rotations of every cached key beside the cache (:mod:`hf_posenc.rotated_keys`).
    keeps_rotated_keys = True
    #: Whether the far positions change when every position shifts by the same amount (Self-Extend's
    #: floor division does): rows are then positioned by ``position_ids``, not by cache index.
    shift_variant = False

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, layout: str = "half",
                 *, window: int):
        super().__init__(rope_parameters, head_dim, max_position_embeddings, layout)
        self.window = int(window)

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation positions of the far regime for query and key positions (same shapes, any float)."""
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
        seq_len = int(q_pos.max()) + 1 if live else self.max_position_embeddings
        q_rows, k_rows = q_pos, k_pos
        offsets = None
        if self.shift_variant:
            offsets = self.row_offsets(q_pos, position_ids, query.shape[0])
            if offsets is not None:
                q_rows, k_rows = q_pos[None] - offsets, k_pos[None] - offsets  # [B, q], [B, kv]
        q_far_pos, k_far_pos = self.far_positions(q_rows, k_rows)
        both = self.rotate_at_sets(query, _near_and_far(q_pos, q_far_pos), seq_len)  # [B, H, 2, q, D]
        q_near, q_far = both[:, :, 0], both[:, :, 1]
        inv_freq, scaling = self.frequencies(seq_len, key.device)
        unrotated_far = self.far_keys_unrotated(scaling)
        start = 0
        if store is not None:
            # What the stored rotations depend on: a new frequency table (dynamic scaling past the pretraining
            # length), other row offsets or another first key position makes them stale.
            row_offsets = None if offsets is None else tuple(offsets.flatten().tolist())
            start = store.valid_rows((self, inv_freq, scaling, row_offsets, int(k_pos[0]), key.dtype, key.shape[:2]))
        new = key[:, :, start:]
        if unrotated_far:
            k_near = self.rotate_at(new, k_pos[start:], seq_len)
            if store is not None:
                k_near = store.extend("near", k_near, start)
            k_far = key
        else:
            both = self.rotate_at_sets(new, _near_and_far(k_pos[start:], k_far_pos[..., start:]), seq_len)
            if store is not None:
                both = store.extend("near_and_far", both, start)  # [B, Hkv, 2, kv, D]
            k_near, k_far = both[:, :, 0], both[:, :, 1]
        if store is not None:
            store.covers(key)
        return q_near, k_near, q_far, k_far

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"

