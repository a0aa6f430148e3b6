"""Keys already rotated, kept beside a KV cache layer and extended as tokens arrive.

The plug-in caches keys unrotated (conversion neutralises the stock rotation), so an encoding whose key
rotation depends on the key alone would rotate the whole cache again at every decode step: Self-Extend and
ReRoPE (https://arxiv.org/abs/2401.01325, https://kexue.fm/archives/9708) rotate every cached key twice,
contextual RoPE (https://arxiv.org/abs/2405.18719) recomputes every width, running sum and rotation. Those
rotations never change once a key is cached, so a :class:`RotatedKeys` store keeps them, one per cache layer,
and a decode step rotates its new keys only (Self-Extend/ReRoPE also their near band, ``window`` rows).

**When the stored rows are used.** Only beside a ``DynamicLayer`` (the default cache's layers), whose
``update`` appends by concatenation: the keys it returns start with the keys it held before. The forward
pre-hook (:func:`for_cache_layer`) checks, before the update, that the layer still holds the very tensor
(same object, no in-place change since) whose rotations the store holds; anything else (beam search's
``reorder_cache``, ``crop``, ``batch_select_indices``, ``reset``, a key edited in place, another cache)
empties the store, and the step rotates every key as before. The encoding also gives a signature of what
its rotations depend on (frequencies, per-row offsets, learned tables and their versions, dtype); a
different signature empties the store too. Forwards that need a gradient or run under ``torch.compile``
never use a store.

The store lives as long as its cache layer (a weak dictionary keyed by the layer), so dropping the cache
frees the rotated copies.
"""

from __future__ import annotations

import weakref

import torch

from . import _hf

#: The store of each cache layer, freed with the layer.
_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _same(a, b) -> bool:
    """Signature entries are equal: tensors and modules by identity, the rest by value."""
    if isinstance(a, torch.Tensor | torch.nn.Module) or isinstance(b, torch.Tensor | torch.nn.Module):
        return a is b
    return type(a) is type(b) and a == b


class RotatedKeys:
    """Rotated copies of one cache layer's keys, ``[B, Hkv, rows, D]`` each under its own name.

    Buffers grow by doubling along the key axis, so that appending a decode step's row copies that row only;
    :meth:`extend` returns a view of the rows held so far.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        """Forget every stored row (the next call rotates every key)."""
        self._source = None  # weakref to the key tensor the stored rows were computed from
        self._version = None
        self.rows = 0
        self._signature: tuple = ()
        self._buffers: dict[str, torch.Tensor] = {}
        self._valid: dict[str, int] = {}  # per buffer: its leading rows that hold rotations (the rest is scratch)
        #: Per-encoding running state that goes with the rows (e.g. a running sum), reset with them.
        self.state: dict = {}

    def holds(self, keys: torch.Tensor | None) -> bool:
        """Whether the stored rows were computed from exactly ``keys`` (same tensor, unchanged since)."""
        source = self._source() if self._source is not None else None
        return keys is not None and source is keys and keys._version == self._version

    def valid_rows(self, signature: tuple) -> int:
        """Rows still valid for an encoding whose rotations depend on ``signature`` (0 after a change)."""
        if len(signature) != len(self._signature) or not all(map(_same, signature, self._signature)):
            self.clear()
            self._signature = signature
        return self.rows

    def rows_of(self, name: str) -> int:
        """How many leading rows of buffer ``name`` hold rotations (0 when there is no such buffer)."""
        return self._valid.get(name, 0)

    def view(self, name: str, stop: int | None = None) -> torch.Tensor:
        """Rows ``:stop`` of buffer ``name`` (default: the rows that hold rotations; past them, scratch rows)."""
        return self._buffers[name][..., :self.rows_of(name) if stop is None else stop, :]

    def drop(self, name: str) -> None:
        """Free buffer ``name`` (its rows are computed again if asked for)."""
        self._buffers.pop(name, None)
        self._valid.pop(name, None)

    def slots(self, name: str, start: int, stop: int, like: torch.Tensor, *, scratch: bool = False) -> torch.Tensor:
        """Rows ``start..stop`` of buffer ``name``, for the caller to write (the buffer grows as needed).

        Args:
            name: The buffer.
            start, stop: The rows.
            like: A tensor with the buffer's leading dimensions, head dimension, dtype and device (``[..., m, D]``).
            scratch: The rows are for this call only (the buffer's rotations then end at ``start``); otherwise
                they hold rotations from now on.

        Returns:
            A view ``[..., stop - start, D]`` of the buffer.
        """
        buffer = self._buffers.get(name)
        fits = (buffer is not None and buffer.shape[:-2] == like.shape[:-2] and buffer.shape[-1] == like.shape[-1]
                and buffer.dtype == like.dtype and buffer.device == like.device)
        if not fits and start:
            raise RuntimeError(f"rotated_keys: buffer {name!r} does not match the rows appended to it (stale store).")
        if not fits or buffer.shape[-2] < stop:
            shape = (*like.shape[:-2], max(stop, 2 * (buffer.shape[-2] if fits else 0), 64), like.shape[-1])
            grown = like.new_empty(shape)
            if start:
                grown[..., :start, :] = buffer[..., :start, :]
            buffer = self._buffers[name] = grown
        self._valid[name] = min(self.rows_of(name), start) if scratch else stop
        return buffer[..., start:stop, :]

    def extend(self, name: str, new_rows: torch.Tensor, start: int) -> torch.Tensor:
        """Write ``new_rows`` ``[B, Hkv, m, D]`` at rows ``start..start+m`` of buffer ``name`` (see :meth:`slots`).

        Returns:
            A view of rows ``:start+m`` of the buffer.
        """
        stop = start + new_rows.shape[-2]
        self.slots(name, start, stop, new_rows).copy_(new_rows)
        return self.view(name, stop)

    def covers(self, keys: torch.Tensor) -> None:
        """Record that the stored rows are those of ``keys`` (the cache layer's tensor after its update)."""
        self._source = weakref.ref(keys)
        self._version = keys._version
        self.rows = keys.shape[-2]


def for_cache_layer(cache, layer_idx: int) -> RotatedKeys | None:
    """The store beside layer ``layer_idx`` of ``cache`` before its update, emptied unless it still matches the
    layer's keys; None where no store may be kept (no cache, not an appending ``DynamicLayer``, compiling)."""
    if torch.compiler.is_compiling():
        return None
    layer = _hf.appending_cache_layer(cache, layer_idx)
    if layer is None:
        return None
    store = _STORES.get(layer)
    if store is None:
        store = _STORES[layer] = RotatedKeys()
    keys = layer.keys if getattr(layer, "is_initialized", False) else None
    if not store.holds(keys):
        store.clear()
    return store
