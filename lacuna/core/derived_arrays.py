"""Arrays derived from inputs, kept between runs in the data cache.

Some arrays cost far more to derive than to read back, and depend on nothing but
their inputs: the sparse parcel operator of a (map grid, parcellation) pair takes half
a second of every run to build and a hundredth to load. They are kept as ``.npz``
files (:func:`cached_arrays`), or as folders of ``.npy`` files read back memory-mapped
(:func:`mapped_arrays`), under ``<data dir>/derived/<kind>/`` (see
:func:`lacuna.core.datadir.get_data_dir`),
named by a SHA-256 digest of everything they are derived from: the input arrays' own
bytes, never file names or dates, so a changed input cannot be served an old result.
A cache that is missing, unreadable or not writable only costs the time to derive
the arrays again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from collections.abc import Callable

import numpy as np

from lacuna.core.atomic import atomic_write_bytes
from lacuna.core.datadir import get_data_dir

log = logging.getLogger(__name__)


def digest(*parts) -> str:
    """SHA-256 (hex) of ``parts``: arrays (dtype, shape and bytes), bytes, strings and
    numbers, in order."""
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            order = "F" if part.flags.f_contiguous and not part.flags.c_contiguous else "C"
            hasher.update(f"array {part.dtype.str} {part.shape} {order}\n".encode())
            hasher.update(part.ravel(order=order).data)  # a contiguous array is not copied
        elif isinstance(part, bytes):
            hasher.update(b"bytes %d\n" % len(part))
            hasher.update(part)
        else:
            hasher.update(f"{type(part).__name__} {part!r}\n".encode())
    return hasher.hexdigest()


def cached_arrays(kind: str, key: str, derive: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays ``derive()`` returns, read from the data cache when an earlier run
    stored them under ``kind`` and ``key`` (a :func:`digest`), else derived and stored.

    Parameters
    ----------
    kind : str
        Folder of this kind of arrays under ``<data dir>/derived``.
    key : str
        Digest of everything the arrays depend on.
    derive : callable
        Returns the arrays by name.
    """
    path = get_data_dir() / "derived" / kind / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        log.debug("derived arrays %s unreadable (%s); deriving them again", path, exc)
    arrays = derive()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        atomic_write_bytes(path, buffer.getvalue(), durable=False)
    except OSError as exc:
        log.debug("derived arrays not kept in %s: %s", path.parent, exc)
    return arrays


def mapped_arrays(kind: str, key: str, derive: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """:func:`cached_arrays`, with each array kept as a ``.npy`` file of one folder and
    read back memory-mapped, read-only: a large array of which a run reads only parts
    (an atlas's labels around each lesion) then costs nothing until touched, and the
    page cache holds one copy for all processes. The folder is written under a
    temporary name and renamed, so a folder that exists is complete."""
    folder = get_data_dir() / "derived" / kind / key
    if folder.is_dir():
        try:
            return {path.stem: np.asarray(np.load(path, mmap_mode="r", allow_pickle=False)) for path in folder.glob("*.npy")}
        except (OSError, ValueError) as exc:
            log.debug("derived arrays %s unreadable (%s); deriving them again", folder, exc)
    arrays = derive()
    try:
        _store_folder(folder, arrays)
    except OSError as exc:
        log.debug("derived arrays not kept in %s: %s", folder.parent, exc)
    return arrays


def _store_folder(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array, allow_pickle=False)
        os.rename(staging, folder)  # fails when another process stored it first: theirs is kept
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
