"""Where the extension toolkit caches what it builds (tokenizer, base model, tokenized corpus)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

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
    """Hold an exclusive lock on ``path`` (created if missing), waiting as long as it takes.

    Two processes (two ``accelerate`` ranks, or a user running two recipes) may want the same cached
    artefact at once; the second waits and then finds it built instead of building it twice.
    ``filelock`` picks the OS primitive (``flock`` on POSIX, ``msvcrt`` locking on Windows), so the
    cache works on every platform transformers supports.

    Args:
        path: The lock file. Its parent folders are created.

    Yields:
        None, while the lock is held; it is released when the block exits, also on an exception.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # timeout=-1: a base-model build takes minutes, and giving up would only make the waiter build it again.
    with FileLock(str(path), timeout=-1):
        yield
