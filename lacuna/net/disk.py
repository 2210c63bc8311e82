"""Free disk space: checked before large downloads and extractions."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from lacuna.core.errors import DownloadError


class InsufficientDiskSpaceError(DownloadError):
    """Raised before a download when the target file system has too little free space."""


def format_bytes(n: float | None) -> str:
    """``n`` bytes as a short human-readable size (``1.5 GB``)."""
    if n is None:
        return "unknown size"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def check_disk_space(folder: Path, needed_bytes: float, what: str) -> None:
    """Raise :class:`InsufficientDiskSpaceError` unless ``folder`` has ``needed_bytes``
    free (``shutil.disk_usage``)."""
    if needed_bytes <= 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise InsufficientDiskSpaceError(
            f"not enough free disk space in {folder}: {what} needs about "
            f"{format_bytes(math.ceil(needed_bytes))}, but only {format_bytes(free)} is free. "
            "Free some space, or fetch into another folder (--output-dir, or LACUNA_DATA_DIR "
            "for the whole data cache)."
        )
