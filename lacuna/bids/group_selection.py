"""Group level: which completed masks go in, and replacing ``group/`` as a whole."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from lacuna.core.atomic import TEMP_MARKER, is_stale_temporary, owner_tag
from lacuna.core.entities import parse_entities
from lacuna.core.errors import NothingSelectedError
from lacuna.bids.integrity import CrashRecord

log = logging.getLogger(__name__)


def _wanted(labels: tuple[str, ...], prefix: str) -> set[str]:
    return {label.removeprefix(prefix) for label in labels}


def select_completed(
    masks: list, participant_labels=(), session_labels=(), mask_labels=(), where: Path | None = None
) -> list:
    """The completed masks (:class:`lacuna.workflows.group.CompletedMask`) of the given
    participants, sessions and labels (all when none is given); a label that matches no
    completed mask is named in a warning.

    Raises
    ------
    NothingSelectedError
        If labels are given and select no mask.
    """
    filters = [
        ("--participant-label", "participant_id", "sub-", _wanted(participant_labels, "sub-")),
        ("--session-label", "session_id", "ses-", _wanted(session_labels, "ses-")),
        ("--mask-label", "label", "", _wanted(mask_labels, "label-")),
    ]
    filters = [f for f in filters if f[3]]
    if not filters:
        return masks

    def value(mask, key: str, prefix: str) -> str | None:
        found = mask.identity.get(key)
        return found.removeprefix(prefix) if found else None

    for option, key, prefix, wanted in filters:
        present = {value(m, key, prefix) for m in masks}
        for label in sorted(wanted - present):
            log.warning("%s %s matches no completed participant output in %s; ignored", option, label, where)
    selected = [m for m in masks if all(value(m, key, prefix) in wanted for _, key, prefix, wanted in filters)]
    if not selected:
        chosen = "; ".join(f"{option} {' '.join(sorted(wanted))}" for option, _, _, wanted in filters)
        raise NothingSelectedError(
            f"no completed participant outputs selected: {chosen} matches none of the {len(masks)} "
            f"completed masks in {where}; check the labels, or run the participant level for them first"
        )
    return selected


def crash_selected(record: CrashRecord, participant_labels=(), session_labels=()) -> bool:
    """Whether a failed mask belongs to the selected participants and sessions."""
    entities = parse_entities(Path(record.mask).name)
    if participant_labels and entities.get("sub") not in _wanted(participant_labels, "sub-"):
        return False
    return not session_labels or entities.get("ses") in _wanted(session_labels, "ses-")


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield an empty hidden folder ``<tmp>/<final.name>`` beside ``final``; when the
    block succeeds it replaces ``final`` whole, else it is removed and ``final`` stays
    as it was. Staging folders left by dead runs are removed first."""
    parent = final.parent
    prefix = f".{final.name}{TEMP_MARKER}"
    for leftover in parent.glob(prefix + "*"):
        if leftover.is_dir() and is_stale_temporary(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    root = parent / f"{prefix}{owner_tag()}-{threading.get_ident()}"
    staging = root / final.name
    staging.mkdir(parents=True)
    try:
        yield staging
        previous = root / "previous"
        if final.exists():
            os.replace(final, previous)
        try:
            os.replace(staging, final)
        except OSError:
            if previous.exists():
                os.replace(previous, final)
            raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
