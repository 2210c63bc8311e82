"""Whether recorded outputs are still what was written, and the record of failed masks.

A mask's provenance file lists each of its outputs with its SHA-256; the participant
level checks them (and the input mask's checksum) before skipping a mask as complete,
and the group level before reading them. A mask that fails leaves a crash record in
``logs/`` (removed when the mask later succeeds), which the group summary lists.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lacuna._version import __version__
from lacuna.core.atomic import write_json
from lacuna.core.provenance import sha256_file, utc_now

log = logging.getLogger(__name__)

LOGS_DIR = "logs"
CRASH_PREFIX = "crash_"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def recorded_input_sha256(record: dict, role: str = "lesion_mask") -> str | None:
    """SHA-256 of the input mask as the provenance's ``load`` step recorded it."""
    for step in record.get("steps", []):
        for item in step.get("inputs", []) if step.get("name") == "load" else ():
            if item.get("role") == role:
                return item.get("sha256")
    return None


def output_problems(root: Path, record: dict) -> list[str]:
    """What is wrong with the outputs a provenance record lists (empty: all intact).

    Each problem names the file: missing, empty, or content that differs from the
    recorded checksum (edited, or half-written by a run that was killed).
    """
    problems = []
    outputs = record.get("outputs")
    if not isinstance(outputs, list):
        return ["the provenance lists no outputs"]
    for item in outputs:
        path = root / str(item.get("path", ""))
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{item.get('path')} is missing")
            continue
        if size == 0:
            problems.append(f"{item.get('path')} is empty (0 bytes)")
        elif item.get("sha256") and sha256_file(path) != item["sha256"]:
            problems.append(f"{item.get('path')} differs from the checksum in its provenance (edited or half-written)")
    return problems


# ------------------------------------------------------------------ crash records


@dataclass
class CrashRecord:
    """Why a mask failed, as written to ``logs/crash_<mask>.json``."""

    mask: str
    error: str
    details: str = ""
    time: str = ""
    lacuna_version: str = __version__


def crash_path(output_dir: Path, mask_path: Path) -> Path:
    """Where the crash record of an input mask goes."""
    stem = mask_path.name.split(".nii")[0]
    return output_dir / LOGS_DIR / f"{CRASH_PREFIX}{_UNSAFE.sub('-', stem)}.json"


def write_crash_record(output_dir: Path, mask_path: Path, relative: str, error: str, details: str = "") -> Path:
    """Record that a mask failed (``relative``: its path in the input dataset)."""
    record = CrashRecord(mask=relative, error=error, details=details, time=utc_now())
    return write_json(crash_path(output_dir, mask_path), record.__dict__)


def clear_crash_record(output_dir: Path, mask_path: Path) -> None:
    """Remove the crash record of a mask that has now succeeded."""
    crash_path(output_dir, mask_path).unlink(missing_ok=True)


def read_crash_records(output_dir: Path) -> list[CrashRecord]:
    """Every crash record in ``output_dir/logs`` (unreadable ones are named)."""
    records = []
    for path in sorted((output_dir / LOGS_DIR).glob(f"{CRASH_PREFIX}*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            records.append(
                CrashRecord(
                    mask=str(document["mask"]),
                    error=str(document["error"]),
                    details=str(document.get("details", "")),
                    time=str(document.get("time", "")),
                    lacuna_version=str(document.get("lacuna_version", "")),
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            records.append(CrashRecord(mask=path.name, error=f"unreadable crash record {path.name}: {exc}"))
    return records
