"""The default corpus: the running interpreter's standard-library sources, split by file.

Every machine with Python has ~30 MB of long, real code files, so the quick comparison needs no
download. Files (not lines) are split between training and held-out sets so that evaluation text
is never seen in training, and the split is a pure function of each file's relative path, so it is
the same on every machine that has the same Python version.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

# Folders that are not the standard library proper (third-party packages) or are not code.
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_root() -> Path:
    """Return the folder holding the standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """List the standard-library ``.py`` files, sorted by relative path, third-party code excluded."""
    root = root or stdlib_root()
    files = [
        path
        for path in root.rglob("*.py")
        if not _EXCLUDED_PARTS.intersection(path.relative_to(root).parts) and path.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(relative_path: str, held_out_percent: int) -> bool:
    """Decide a file's split from a hash of its relative path (stable across runs and machines)."""
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < held_out_percent


def split_files(held_out_percent: int = 5, root: Path | None = None) -> dict[str, list[str]]:
    """Split the standard-library files into ``{"train": [...], "validation": [...]}`` paths."""
    if not 0 < held_out_percent < 100:
        raise ValueError(f"held_out_percent must be in 1..99, got {held_out_percent}")
    root = root or stdlib_root()
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for path in stdlib_files(root):
        relative = path.relative_to(root).as_posix()
        splits["validation" if is_held_out(relative, held_out_percent) else "train"].append(str(path))
    return splits


def load_stdlib_dataset(held_out_percent: int = 5, cache: Path | None = None):
    """Load the split as a ``datasets.DatasetDict`` with one row (column ``text``) per file.

    Uses the ``text`` builder with ``sample_by="document"`` so each source file stays whole and
    long-context windows can be cut from within a file.
    """
    import datasets

    splits = split_files(held_out_percent)
    return datasets.load_dataset(
        "text",
        data_files=splits,
        sample_by="document",
        # A handful of stdlib test files are deliberately not UTF-8; keep them rather than fail.
        encoding_errors="replace",
        cache_dir=str(cache) if cache else None,
    )
