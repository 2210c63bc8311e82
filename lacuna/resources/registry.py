"""Persistent JSON registries in the data directory, safe across processes.

Registrations (parcellations, connectomes) live in small JSON files of the data
directory. Writers take an exclusive ``flock`` on a sibling ``.lock`` file, read the
current entries, change them and write the file back atomically, so concurrent
``register`` calls from several processes lose nothing. Paths inside the data directory
are stored relative to it, so a cache mounted elsewhere (a container's ``/cache``) still
resolves; other paths are stored absolute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lacuna.core.atomic import atomic_write_text
from lacuna.core.datadir import get_data_dir
from lacuna.core.errors import LacunaError
from lacuna.core.locks import file_lock


class JsonRegistry:
    """Named entries (JSON objects) under one key of a JSON file in the data directory.

    Parameters
    ----------
    filename : str
        File name inside the data directory.
    section : str
        Key of the entries object in the file (e.g. ``"parcellations"``).
    error : type of LacunaError
        Raised when the file is unreadable.
    version : int
        Layout version written into the file.
    """

    def __init__(self, filename: str, section: str, error: type[LacunaError], version: int = 1):
        self.filename = filename
        self.section = section
        self.error = error
        self.version = version

    @property
    def path(self) -> Path:
        """The registry file (in the current data directory)."""
        return get_data_dir() / self.filename

    def read(self) -> dict[str, dict]:
        """Current entries by name (empty when the file does not exist)."""
        path = self.path
        if not path.is_file():
            return {}
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            entries = content[self.section]
            if not isinstance(entries, dict):
                raise TypeError(f"{self.section!r} is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self.error(
                f"the registry {path} is unreadable ({exc}). Repair the JSON, or delete the "
                "file and register again."
            ) from exc
        return entries

    @contextmanager
    def editing(self) -> Iterator[dict[str, dict]]:
        """The entries, locked; written back atomically when the block succeeds."""
        path = self.path
        with file_lock(path.with_name(path.name + ".lock")):
            entries = self.read()
            yield entries
            content = {"version": self.version, self.section: entries}
            atomic_write_text(path, json.dumps(content, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def store_path(path: str | Path) -> str:
        """``path`` as stored: relative to the data directory when inside it."""
        path = Path(path).expanduser().resolve()
        try:
            return path.relative_to(get_data_dir()).as_posix()
        except ValueError:
            return str(path)

    @staticmethod
    def resolve_path(stored: str) -> Path:
        """A stored path made absolute (relative ones are under the data directory)."""
        path = Path(stored)
        return path if path.is_absolute() else get_data_dir() / path
