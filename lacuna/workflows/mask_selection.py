"""Which masks a participant-level run analyses: datasets, filters, and their checks."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lacuna.workflows import messages
from lacuna.workflows.config import MASK_SUFFIXES, RunConfig
from lacuna.core.entities import mask_label, parse_entities
from lacuna.core.errors import (
    InputNotFoundError,
    InvalidDatasetError,
    NothingSelectedError,
    OutputError,
    UsageError,
)
from lacuna.bids.inputs import find_mask_files

log = logging.getLogger(__name__)

#: Long entity names of a ``--bids-filter-file`` (as pybids names them) and ours.
FILTER_ENTITIES = {
    "subject": "sub",
    "session": "ses",
    "acquisition": "acq",
    "run": "run",
    "space": "space",
    "resolution": "res",
    "label": "label",
    "desc": "desc",
    "description": "desc",
    "datatype": "datatype",
}
#: The query of a filter file that selects lesion masks.
FILTER_QUERY = "mask"


def check_bids_dataset(bids_dir: Path, output_dir: Path | None = None) -> None:
    """Fail only on what makes the dataset unusable (or would damage it).

    Raises
    ------
    UsageError
        If the output folder is the input folder or contains it.
    InputNotFoundError
        If the folder does not exist or has no ``sub-`` folders.
    InvalidDatasetError
        If it has no ``dataset_description.json``.
    """
    if output_dir is not None and (output_dir == bids_dir or output_dir in bids_dir.parents):
        raise UsageError(messages.OUTPUT_CONTAINS_INPUT.format(output=output_dir, bids=bids_dir))
    if not bids_dir.is_dir():
        raise InputNotFoundError(messages.NO_BIDS_DIR.format(path=bids_dir))
    if not (bids_dir / "dataset_description.json").is_file():
        raise InvalidDatasetError(messages.NO_DESCRIPTION.format(path=bids_dir))
    if not any(p.is_dir() and p.name.startswith("sub-") for p in bids_dir.iterdir()):
        raise InputNotFoundError(messages.NO_SUBJECTS.format(path=bids_dir))


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and check a file can be written in it.

    Raises
    ------
    OutputError
        Naming the folder (or the first parent that cannot be created) and the fix.
    """
    probe = folder / f".lacuna-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(messages.UNWRITABLE.format(path=exc.filename or folder, reason=exc.strerror or exc)) from exc


# ----------------------------------------------------------------------- filters


@dataclass
class MaskFilter:
    """Entities a mask must have: each key maps to the accepted values, where None
    accepts a mask without that entity."""

    entities: dict[str, tuple[str | None, ...]] = field(default_factory=dict)

    def accepts(self, path: Path) -> bool:
        """Whether a mask file passes the filter."""
        found = _entities_of(path)
        for key, accepted in self.entities.items():
            value = found.get(key)
            if value is None:
                if None not in accepted:
                    return False
            elif not any(a is not None and _same_value(key, value, a) for a in accepted):
                return False
        return True


def _entities_of(path: Path) -> dict[str, str]:
    entities = parse_entities(path.name)
    entities.pop("suffix", None)
    entities["datatype"] = path.parent.name
    return entities


def _same_value(key: str, value: str, accepted: str) -> bool:
    if key == "run" and value.isdigit() and accepted.isdigit():
        return int(value) == int(accepted)  # run-1 and run-01 are the same index
    return value == accepted


def load_filter_file(path: Path) -> MaskFilter:
    """Read a ``--bids-filter-file``: ``{"mask": {"session": "01", "acquisition": ["flair", null]...}}``.

    Values are a label, null (the entity must be absent), or a list of them; keys are
    pybids' long entity names (``subject``, ``session``, ``acquisition``, ``run``,
    ``space``, ``resolution``, ``label``, ``desc``, ``datatype``) or BIDS' short ones.

    Raises
    ------
    UsageError
        If the file is missing, not JSON, or asks for what Lacuna cannot filter on.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"--bids-filter-file {path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"--bids-filter-file {path}: not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or not isinstance(document.get(FILTER_QUERY), dict):
        raise UsageError(
            f'--bids-filter-file {path}: expected {{"{FILTER_QUERY}": {{"session": "01", ...}}}} '
            f"(Lacuna selects lesion masks with the {FILTER_QUERY!r} query)"
        )
    ignored = sorted(set(document) - {FILTER_QUERY})
    if ignored:
        log.warning("--bids-filter-file %s: queries %s do not apply to lesion masks; ignored", path, ignored)
    short_names = set(FILTER_ENTITIES.values())
    entities: dict[str, tuple[str | None, ...]] = {}
    for key, value in document[FILTER_QUERY].items():
        short = FILTER_ENTITIES.get(key, key if key in short_names else None)
        if short is None:
            raise UsageError(f"--bids-filter-file {path}: unknown entity {key!r} (known: {', '.join(FILTER_ENTITIES)})")
        entities[short] = _filter_values(path, key, value)
    return MaskFilter(entities)


def _filter_values(path: Path, key: str, value) -> tuple[str | None, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(v is None or isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        raise UsageError(f"--bids-filter-file {path}: {key} must be a label, null, or a list of them, not {value!r}")
    prefix = {"subject": "sub-", "sub": "sub-", "session": "ses-", "ses": "ses-"}.get(key, "")
    return tuple(None if v is None else str(v).removeprefix(prefix) for v in values)


# --------------------------------------------------------------------- selection


@dataclass(frozen=True)
class MaskSource:
    """A dataset that lesion masks are read from, and its name in ``DatasetLinks``."""

    root: Path
    link: str


def mask_sources(config: RunConfig) -> list[MaskSource]:
    """The input dataset and the ``--derivatives`` datasets, in that order.

    Raises
    ------
    InputNotFoundError
        If a ``--derivatives`` folder does not exist or is not a dataset.
    """
    sources = [MaskSource(config.bids_dir, "raw")]
    for index, folder in enumerate(config.derivatives, start=1):
        if not (folder / "dataset_description.json").is_file():
            raise InputNotFoundError(messages.NO_DERIVATIVES.format(path=folder))
        sources.append(MaskSource(folder, "lesions" if len(config.derivatives) == 1 else f"lesions{index}"))
    return sources


def _label_filters(config: RunConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    """(option, entity, values) of the label options that were given."""
    given = [
        ("--participant-label", "sub", config.participant_labels),
        ("--session-label", "ses", config.session_labels),
        ("--mask-label", "label", config.mask_labels),
    ]
    return [item for item in given if item[2]]


def _mask_label(path: Path) -> str | None:
    return mask_label(parse_entities(path.name))


def _value(path: Path, entity: str) -> str | None:
    return _mask_label(path) if entity == "label" else parse_entities(path.name).get(entity)


def find_candidate_masks(config: RunConfig, sources: list[MaskSource]) -> list[Path]:
    """Every mask file of the datasets, before any filter."""
    exclude = [p for p in (config.output_dir, config.work_dir) if p]
    paths: list[Path] = []
    for source in sources:
        for suffix in MASK_SUFFIXES:
            paths += find_mask_files(source.root, suffix=suffix, exclude=exclude)
    return sorted(set(paths))


def select_masks(config: RunConfig, sources: list[MaskSource] | None = None) -> list[Path]:
    """Masks chosen by the participant, session and mask-label options and the filter
    file; each label that matches no mask is named in a warning.

    Raises
    ------
    InputNotFoundError
        If the datasets hold no mask at all.
    NothingSelectedError
        If masks exist but the filters select none of them.
    """
    sources = sources or mask_sources(config)
    candidates = find_candidate_masks(config, sources)
    if not candidates:
        raise InputNotFoundError(messages.NO_MASKS.format(path=config.bids_dir))
    labels = _label_filters(config)
    for option, entity, values in labels:
        present = {_value(p, entity) for p in candidates}
        for value in values:
            if value not in present:
                available = ", ".join(sorted(v for v in present if v)) or "none"
                text = messages.UNMATCHED_FILTER.format(option=option, value=value, path=config.bids_dir, available=available)
                log.warning(text)
    file_filter = load_filter_file(config.bids_filter_file) if config.bids_filter_file else MaskFilter()
    selected = [
        p
        for p in candidates
        if all(_value(p, entity) in values for _, entity, values in labels) and file_filter.accepts(p)
    ]
    if not selected:
        selection = "; ".join(f"{option} {' '.join(values)}" for option, _, values in labels)
        if config.bids_filter_file:
            selection = "; ".join(filter(None, [selection, f"--bids-filter-file {config.bids_filter_file}"]))
        subjects = sorted({parse_entities(p.name).get("sub") or "?" for p in candidates})
        raise NothingSelectedError(
            messages.NOTHING_SELECTED.format(
                selection=selection, path=config.bids_dir, available="sub-" + ", sub-".join(subjects)
            )
        )
    return selected


def source_of(path: Path, sources: list[MaskSource]) -> MaskSource:
    """The dataset a selected mask belongs to (the deepest root above it)."""
    above = [s for s in sources if s.root in path.parents]
    return max(above, key=lambda s: len(s.root.parts)) if above else sources[0]
