"""Toeplitz and tiling helpers shared by the relative-bias kernels (ALiBi, T5 and every per-diagonal bias).

A relative bias depends on ``i - j`` only, so it is computed once per diagonal (``[H, q + kv - 1]``) and
expanded block by block where a kernel needs it. Causal kernels process query rows in tiles that stop at
the diagonal: a tile of rows ``[r0, r1)`` reads keys ``j < r1 + diagonal`` only. The kernels themselves and
the choice between them live in :mod:`hf_posenc.kernels`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: Query rows per tile of the causal tiled kernels (:func:`tiles`).
TILE_ROWS = 128


def distance_diagonals(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Every distance ``i - j`` of a ``[q, kv]`` score block, one per diagonal: ``[q + kv - 1]`` int64.

    Entry ``t`` is the distance on diagonal ``i - j = t - (kv - 1)``, shifted by ``q_pos[0] - k_pos[0]``.
    Both position ranges must be consecutive (``hf_posenc.positions.positions`` always gives that).
    """
    q_len, kv_len = q_pos.shape[0], k_pos.shape[0]
    return torch.arange(q_len + kv_len - 1, device=q_pos.device) + (q_pos[0] - k_pos[-1])


def toeplitz(diagonals: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Expand per-diagonal values ``[..., q + kv - 1]`` to ``[..., q, kv]`` with ``M[i, j] = d[i - j + kv - 1]``.

    A relative bias depends on ``i - j`` only: computing it once per diagonal and expanding with one copy
    replaces a ``[q, kv]`` distance tensor, a ``[q, kv]`` int64 bucket tensor and a gather per layer.
    """
    # unfold of the reversed values gives rows U[s, j] = d[q + kv - 2 - s - j]; row s = q - 1 - i is M[i].
    # index_select writes a row-major result: SDPA copies a mask with any other layout on every call.
    rows = torch.arange(q_len - 1, -1, -1, device=diagonals.device)
    return diagonals.flip(-1).unfold(-1, kv_len, 1).index_select(-2, rows)  # [..., q, kv]


def future_filled(diagonals: torch.Tensor, distances: torch.Tensor, future: float) -> torch.Tensor:
    """Set the diagonals of keys after the query (``i - j < 0``) to ``future`` (a mask value)."""
    return diagonals.masked_fill(distances < 0, future)


def tiles(q_len: int, kv_len: int, diagonal: int, rows_per_tile: int | None = None):
    """``(rows, limit)`` per tile of causal query rows: row ``r`` sees keys ``j < limit`` at most
    (``j <= r + diagonal``).

    Args:
        q_len, kv_len: Queries and keys of the call.
        diagonal: Row ``r`` may see key ``j`` iff ``j <= r + diagonal``.
        rows_per_tile: Rows per tile (default :data:`TILE_ROWS`, read at call time).
    """
    step = TILE_ROWS if rows_per_tile is None else rows_per_tile
    for start in range(0, q_len, step):
        rows = slice(start, min(start + step, q_len))
        yield rows, max(1, min(kv_len, rows.stop + diagonal))


def diagonal_block(diagonals: torch.Tensor, rows: slice, keys: slice, kv_len: int) -> torch.Tensor:
    """Block ``[H, rows, keys]`` of ``M[i, j] = diagonals[:, i - j + kv_len - 1]`` (``[H, q + kv - 1]``)."""
    # The block needs i - j from rows.start - (keys.stop - 1) to rows.stop - 1 - keys.start.
    first = rows.start - keys.stop + kv_len
    count = (rows.stop - rows.start) + (keys.stop - keys.start) - 1
    return toeplitz(diagonals[:, first:first + count], rows.stop - rows.start, keys.stop - keys.start)


def diagonal_sums(block: torch.Tensor) -> torch.Tensor:
    """Sum of each diagonal of ``[..., r, c]``: ``[..., r + c - 1]``, entry ``t`` for ``i - j = t - (c - 1)``.

    The adjoint of :func:`toeplitz`, hence the gradient of the per-diagonal values it expanded.
    """
    r, c = block.shape[-2:]
    # Row i of the column-flipped block, padded to c + r and read with rows of c + r - 1, starts i places
    # further right: column i + (c - 1 - j) of the skewed view is diagonal t = i - j + c - 1.
    padded = F.pad(block.flip(-1), (0, r)).flatten(-2)[..., : r * (c + r - 1)]
    return padded.unflatten(-1, (r, c + r - 1)).sum(-2)


def causal_tile_mask(rows: slice, limit: int, diagonal: int, device) -> torch.Tensor:
    """Bool ``[1, 1, qb, limit]``: which of the first ``limit`` keys the tile's rows may see (causality only)."""
    visible_up_to = torch.arange(rows.start, rows.stop, device=device) + diagonal  # [qb]
    return (torch.arange(limit, device=device)[None, :] <= visible_up_to[:, None])[None, None]
