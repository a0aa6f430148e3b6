"""Write an output folder in full beside its target, then swap it in: a failure or a kill during the write
never leaves the target holding files of two different models.

The new files go into a hidden sibling (``.NAME.partial-XXXX``, same file system, so the swap is a rename);
an existing target is renamed aside (``.NAME.old-XXXX``) and deleted only once the new folder is in place.
A kill during the write leaves the target untouched (and the hidden partial folder, which a later run of
the same command removes); a kill between the two renames leaves the old folder under its ``.old`` name.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _remove_stale_partials(target: Path) -> None:
    """Partial folders of this target left by a killed earlier run (never the target itself)."""
    for stale in target.parent.glob(_partial_prefix(target) + "*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty folder to write into; on a clean exit it replaces ``target`` as a whole.

    Args:
        target: The folder the caller means to write.
        overwrite: Allow replacing a non-empty ``target`` (its old files do not survive, not even those the
            new write lacks).

    Raises:
        FileExistsError: ``target`` is not empty and ``overwrite`` is False (checked before anything is written).
    """
    target = Path(target).resolve()  # "." or "x/.." have no name of their own to make a sibling from
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--out {target} is a file, not a folder; give a folder path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {target} exists and is not empty; pass --overwrite to replace its files.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = Path(tempfile.mkdtemp(prefix=_partial_prefix(target), dir=target.parent))
    try:
        yield partial
    except BaseException:  # KeyboardInterrupt too: the target stays as it was
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.replace(old / target.name)
    partial.replace(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
