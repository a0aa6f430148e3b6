"""Where the extension toolkit caches what it builds (tokenizer, base model, tokenized corpus)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

#: Environment variable that overrides the cache root.
CACHE_ENV = "HF_POSENC_CACHE"


def cache_dir() -> Path:
    """Return the cache root, creating it if needed.

    ``$HF_POSENC_CACHE`` wins; otherwise ``~/.cache/hf_posenc``. The tests point it at a temporary
    folder so they never touch (or depend on) a user's cache.
    """
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_posenc")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing).

    Two processes (two ``accelerate`` ranks, or a user running two recipes) may want the same cached
    artefact at once; the second waits and then finds it built instead of building it twice.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
