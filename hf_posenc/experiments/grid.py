"""The fingerprinted, resumable grid that every experiment runs its cells through.

An experiment is a grid of cells (one per encoding and seed, or per variant and seed). Each finished cell is
one JSON record in a folder, and the record carries a fingerprint of every setting that produced it. A re-run
into the same folder reuses every cell whose record exists with the same fingerprint and computes the others,
so a run that was cut off continues from its finished cells, and a changed setting recomputes exactly the
cells it touches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: The record key that holds the cell's fingerprint.
FINGERPRINT_KEY = "fingerprint"


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A short, stable hash of every setting that changes a cell's record.

    Args:
        payload: JSON-able settings; keys are sorted, and values JSON cannot hold are written with ``str``.
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One cell of a grid.

    Attributes:
        name: The record's file name without ``.json`` (unique within the grid).
        fingerprint: :func:`fingerprint` of the cell's settings; a stored record with another one is stale.
        spec: Whatever the experiment's ``compute`` needs to produce the record.
        earlier: Fingerprints that earlier code wrote for these same settings (a setting added since, at the
            default that computes what those runs did); a record under one of them is reused too.
    """

    name: str
    fingerprint: str
    spec: Any = None
    earlier: tuple[str, ...] = ()


@dataclass(frozen=True)
class GridRun:
    """What :func:`run_grid` did.

    Attributes:
        records: Every cell's record by cell name, in the order of the cells given.
        computed: How many cells this run computed.
        reused: How many records an earlier run into the same folder had written.
    """

    records: dict[str, dict[str, Any]]
    computed: int
    reused: int


#: Computes the given cells and yields ``(cell, record)`` in any order (e.g. from a process pool).
Mapper = Callable[[Sequence[Cell]], Iterable[tuple[Cell, dict[str, Any]]]]


def stored_record(path: Path, expected: str, earlier: Iterable[str] = ()) -> dict[str, Any] | None:
    """The record at ``path`` if it exists and was made under the fingerprint ``expected`` (or one of the
    ``earlier`` fingerprints of the same settings), else None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get(FINGERPRINT_KEY) == expected or record.get(FINGERPRINT_KEY) in set(earlier):
        return record
    logger.info("%s changed since its last run: recomputing", path.stem)
    return None


def save_record(path: Path, record: Mapping[str, Any], indent: int | None = None) -> None:
    """Write a record whole, then rename it into place, so a cut-off write never looks like a finished cell."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=indent))
    os.replace(tmp, path)


def run_grid(cells: Sequence[Cell], compute: Callable[[Cell], dict[str, Any]], folder: str | Path, *,
             mapper: Mapper | None = None, first: Callable[[Cell], Any] | None = None,
             on_record: Callable[[Cell, dict[str, Any]], None] | None = None, indent: int | None = None,
             progress: bool = True, desc: str = "cells") -> GridRun:
    """Reuse the finished cells of ``folder`` and compute the others, saving each record as it finishes.

    Args:
        cells: The grid, with unique names.
        compute: Produces one cell's record in this process; the record must hold the cell's fingerprint
            under ``"fingerprint"`` so that a later run can reuse it.
        folder: Where the records live, one ``<cell name>.json`` each.
        mapper: Computes the pending cells some other way (worker processes) instead of ``compute``.
        first: A sort key for the pending cells (e.g. the slowest first, so parallel workers end together).
        on_record: Called with each newly computed record after it is saved.
        indent: JSON indent of the saved records.
        progress: Show a progress bar over the pending cells.
        desc: The progress bar's label.

    Returns:
        The records of every cell, and how many were computed and reused.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    pending: list[Cell] = []
    for cell in cells:
        path = folder / f"{cell.name}.json"
        record = stored_record(path, cell.fingerprint, cell.earlier)
        if record is None:
            pending.append(cell)
        else:
            logger.info("%s already done: reusing %s", cell.name, path)
            records[cell.name] = record
    if first is not None:
        pending.sort(key=first)
    finished: Iterable[tuple[Cell, dict[str, Any]]] = (mapper or _in_turn(compute))(pending)
    with tqdm(total=len(pending), desc=desc, disable=not progress) as bar:
        for cell, record in finished:
            save_record(folder / f"{cell.name}.json", record, indent)
            records[cell.name] = record
            if on_record is not None:
                on_record(cell, record)
            bar.update()
    return GridRun({cell.name: records[cell.name] for cell in cells}, computed=len(pending),
                   reused=len(cells) - len(pending))


def _in_turn(compute: Callable[[Cell], dict[str, Any]]) -> Mapper:
    def mapper(pending: Sequence[Cell]) -> Iterator[tuple[Cell, dict[str, Any]]]:
        for cell in pending:
            yield cell, compute(cell)

    return mapper


__all__ = ["FINGERPRINT_KEY", "Cell", "GridRun", "Mapper", "fingerprint", "run_grid", "save_record", "stored_record"]
