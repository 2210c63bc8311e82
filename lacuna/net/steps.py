"""Marker files of completed steps, so that a re-run skips what is done."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lacuna.core.atomic import write_json
from lacuna.core.provenance import utc_now

MARKER_DIR = ".lacuna_fetch"
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


class StepMarkers:
    """Marker files of completed fetch steps in ``<output_dir>/.lacuna_fetch/``.

    Each marker is a small JSON file written atomically once its step is complete
    (``download_<file>``: downloaded and verified; ``extract_<file>``; ``downloaded``;
    ``converted``; ``registered``), holding what the step was done with, so a re-run
    skips exactly the steps whose inputs are unchanged.
    """

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir) / MARKER_DIR

    def path(self, step: str) -> Path:
        """Marker file of ``step``."""
        return self.folder / f"{_SLUG.sub('_', step)}.json"

    def read(self, step: str) -> dict | None:
        """Recorded information of a completed step, or None."""
        path = self.path(step)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def done(self, step: str, **expected: Any) -> bool:
        """Whether ``step`` completed with the ``expected`` recorded values."""
        info = self.read(step)
        return info is not None and all(info.get(key) == value for key, value in expected.items())

    def mark(self, step: str, **info: Any) -> None:
        """Record ``step`` as completed (atomically)."""
        write_json(self.path(step), {"step": step, "completed": utc_now(), **info})

    def remove(self, step: str) -> None:
        """Forget one step."""
        self.path(step).unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every step (``force``)."""
        if self.folder.is_dir():
            for path in self.folder.glob("*.json"):
                path.unlink()
