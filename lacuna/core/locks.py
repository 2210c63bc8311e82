"""Advisory file locks (``flock``) shared across processes."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(lock_path: str | Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created, with its folder).

    Parameters
    ----------
    lock_path : str or Path
        The lock file.
    wait : bool
        Wait for another holder to let go; ``False`` raises at once instead.

    Raises
    ------
    BlockingIOError
        With ``wait=False``, when another process holds the lock.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
