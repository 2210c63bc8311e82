"""Group level: a pure reduction of what participant runs wrote.

Reads only completed participant outputs (masks whose provenance file exists) and
writes, under ``group/``:

* one TSV per analysis table, parcellation and measure: one row per
  subject/session/mask, one column per parcel (``..._desc-<table><Measure>_parcelstats.tsv``);
* one TSV per analysis of its scalar results (lesion volume, percentage of streamlines
  disconnected, peak t, ...): one row per mask (``desc-<analysis>_scalars.tsv``);
* lesion-overlap maps per space and resolution: the count of masks covering each voxel
  (``desc-lesioncount_statmap``) and the proportion (``desc-lesionoverlap_probseg``);
* ``summary.json``: which masks went in, which were incomplete, which files came out.

No analysis is ever recomputed here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from lacuna._version import __version__
from lacuna.core.entities import parse_entities
from lacuna.core.provenance import utc_now
from lacuna.core.results import write_tsv
from lacuna.core.spaces import Grid, resample_mask
from lacuna.core.errors import InputNotFoundError
from lacuna.core.atomic import atomic_path, write_json
from lacuna.bids.group_selection import crash_selected, select_completed, staged_folder
from lacuna.bids.integrity import CrashRecord, output_problems, read_crash_records
from lacuna.bids.names import GROUP_DIR, group_overlap, group_scalars, group_table, measure_label, sidecar_of
from lacuna.core.entities import alphanumeric

log = logging.getLogger(__name__)

IDENTITY_COLUMNS = ("participant_id", "session_id", "label")
_TABLE_KEYS = ("index", "name")


@dataclass
class CompletedMask:
    """A participant-level mask whose outputs are complete."""

    identity: dict[str, str]
    provenance_path: Path
    outputs: list[Path]

    @property
    def sort_key(self) -> tuple:
        return tuple(self.identity.get(c) or "" for c in (*IDENTITY_COLUMNS, "acq", "run"))


@dataclass
class GroupSummary:
    """What the group level read and wrote."""

    masks: list[CompletedMask] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    failed: list[CrashRecord] = field(default_factory=list)
    inference: object | None = None  #: lacuna.workflows.group_inference.InferenceSummary


def find_completed_masks(output_dir: Path) -> tuple[list[CompletedMask], list[str]]:
    """Completed masks (with provenance) and masks whose outputs are incomplete."""
    completed, incomplete = [], []
    for provenance_path in sorted(output_dir.glob("sub-*/**/anat/*_provenance.json")):
        try:
            record = json.loads(provenance_path.read_text(encoding="utf-8"))
            outputs = [output_dir / item["path"] for item in record["outputs"]]
        except (OSError, ValueError, KeyError) as exc:
            incomplete.append(f"{provenance_path.relative_to(output_dir)} (unreadable: {exc})")
            continue
        problems = output_problems(output_dir, record) or _unreadable_outputs(outputs)
        if problems:
            incomplete.append(f"{provenance_path.relative_to(output_dir)} ({problems[0]})")
            continue
        entities = parse_entities(provenance_path.name)
        identity = {
            "participant_id": f"sub-{entities['sub']}",
            "session_id": f"ses-{entities['ses']}" if "ses" in entities else None,
            "label": entities.get("label"),
        }
        for key in ("acq", "run", "desc"):
            if key in entities:
                identity[key] = entities[key]
        completed.append(CompletedMask(identity, provenance_path, outputs))
    for mask_path in sorted(output_dir.glob("sub-*/**/anat/*_mask.nii.gz")):
        stem = mask_path.name.split("_space-")[0]
        if not any(m.provenance_path.name.startswith(stem + "_") for m in completed) and not any(
            stem in entry for entry in incomplete
        ):
            incomplete.append(f"{mask_path.relative_to(output_dir)} (no provenance: run did not finish)")
    completed.sort(key=lambda m: m.sort_key)
    return completed, incomplete


def _unreadable_outputs(outputs: list[Path]) -> list[str]:
    """JSON outputs that do not parse (their checksum may not have been recorded)."""
    problems = []
    for path in outputs:
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                problems.append(f"{path.name} is not valid JSON ({exc})")
    return problems


def run_group(
    output_dir: str | Path,
    participant_labels: tuple[str, ...] = (),
    session_labels: tuple[str, ...] = (),
    mask_labels: tuple[str, ...] = (),
    inference=None,
) -> GroupSummary:
    """Write the group-level outputs from the participant outputs in ``output_dir``.

    Every output is checked against the checksum its provenance recorded; a mask with a
    missing, empty, edited or half-written output is left out with a warning naming the
    file. The new ``group/`` is written to a hidden folder and swapped in whole, so an
    error never leaves it half-rewritten.

    Parameters
    ----------
    output_dir : str or Path
        The derivatives folder of the participant level.
    participant_labels, session_labels, mask_labels : tuple of str
        Only the masks of these participants, sessions and labels (default: all).
    inference : lacuna.bids.group_options.InferenceOptions, optional
        Group inference (sensitivity, specificity, association maps and parcel tables;
        :mod:`lacuna.workflows.group_inference`); its options are checked before anything else.

    Raises
    ------
    InputNotFoundError
        If there is no completed participant output to reduce.
    NothingSelectedError
        If the labels select none of the completed masks.
    """
    output_dir = Path(output_dir)
    if inference is not None:
        from lacuna.workflows.group_inference import prepare_inference, run_inference

        participants = prepare_inference(inference)
    masks, incomplete = find_completed_masks(output_dir)
    for entry in incomplete:
        log.warning("group level leaves out %s", entry)
    if not masks:
        raise InputNotFoundError(
            f"no completed participant outputs in {output_dir}; run the participant level first"
        )
    masks = select_completed(masks, participant_labels, session_labels, mask_labels, output_dir)
    records = read_crash_records(output_dir)
    failed = [r for r in records if crash_selected(r, participant_labels, session_labels)]
    summary = GroupSummary(masks=masks, incomplete=incomplete, failed=failed)
    with staged_folder(output_dir / GROUP_DIR) as staging:
        target = staging.parent
        summary.written.extend(_write_group_tables(output_dir, masks, target))
        summary.written.extend(_write_group_scalars(output_dir, masks, target))
        summary.written.extend(_write_overlap_maps(output_dir, masks, target))
        if inference is not None:
            summary.inference = run_inference(target, masks, inference, participants)
            summary.written.extend(summary.inference.written)
        summary.written.append(_write_summary(output_dir, summary, target))
    summary.written = [output_dir / GROUP_DIR / p.relative_to(staging) for p in summary.written]
    return summary


def _identity_columns(mask: CompletedMask) -> dict:
    row = {column: mask.identity.get(column) for column in IDENTITY_COLUMNS}
    for key in ("acq", "run", "desc"):
        if key in mask.identity:
            row[key] = mask.identity[key]
    return row


def _write_group_tables(output_dir: Path, masks: list[CompletedMask], target: Path | None = None) -> list[Path]:
    # (parcellation, table desc, measure) -> rows; plus column descriptions.
    rows: dict[tuple[str, str, str], list[dict]] = {}
    descriptions: dict[tuple[str, str, str], dict] = {}
    for mask in masks:
        for path in mask.outputs:
            if not path.name.endswith("_parcelstats.tsv"):
                continue
            entities = parse_entities(path.name)
            parcellation = "_".join(p for p in (entities["atlas"], entities.get("seg")) if p)
            frame = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
            sidecar = json.loads(sidecar_of(path).read_text(encoding="utf-8"))
            regions = _unique_region_columns(frame)
            for measure in [c for c in frame.columns if c not in _TABLE_KEYS]:
                key = (parcellation, entities["desc"], measure)
                row = _identity_columns(mask)
                row.update(dict(zip(regions, frame[measure].tolist())))
                rows.setdefault(key, []).append(row)
                descriptions.setdefault(key, sidecar.get(measure, {}))
    written = []
    for (parcellation, desc, measure), table_rows in sorted(rows.items()):
        path = (target or output_dir) / group_table(parcellation, f"{desc}{measure_label(measure)}")
        frame = pd.DataFrame(table_rows)
        with atomic_path(path) as temporary:
            write_tsv(frame, temporary)
        column_info = descriptions[(parcellation, desc, measure)]
        sidecar = {
            "participant_id": {"Description": "Participant of the mask"},
            "session_id": {"Description": "Session of the mask (n/a when none)"},
            "label": {"Description": "Label (label- entity) of the mask"},
            **{k: {"Description": f"{k} entity of the mask"} for k in ("acq", "run", "desc") if k in frame},
            **{
                region: {
                    "Description": f"{column_info.get('Description', measure)} — region {region}",
                    **({"Units": column_info["Units"]} if column_info.get("Units") else {}),
                }
                for region in frame.columns
                if region not in (*IDENTITY_COLUMNS, "acq", "run", "desc")
            },
        }
        write_json(sidecar_of(path), sidecar)
        written.append(path)
    return written


def _write_group_scalars(output_dir: Path, masks: list[CompletedMask], target: Path | None = None) -> list[Path]:
    """One table per analysis: a row per mask, a column per scalar result."""
    rows: dict[str, list[dict]] = {}
    columns: dict[str, dict] = {}
    for mask in masks:
        for path in mask.outputs:
            if not path.name.endswith("_scalars.json"):
                continue
            document = json.loads(path.read_text(encoding="utf-8"))
            for analysis, scalars in document.items():
                row = _identity_columns(mask)
                row.update({key: entry.get("Value") for key, entry in scalars.items()})
                rows.setdefault(analysis, []).append(row)
                for key, entry in scalars.items():
                    columns.setdefault(analysis, {}).setdefault(key, entry)
    written = []
    for analysis, table_rows in sorted(rows.items()):
        path = (target or output_dir) / group_scalars(alphanumeric(analysis).lower())
        frame = pd.DataFrame(table_rows)
        with atomic_path(path) as temporary:
            write_tsv(frame, temporary)
        sidecar = {
            "participant_id": {"Description": "Participant of the mask"},
            "session_id": {"Description": "Session of the mask (n/a when none)"},
            "label": {"Description": "Label (label- entity) of the mask"},
            **{k: {"Description": f"{k} entity of the mask"} for k in ("acq", "run", "desc") if k in frame},
            **{
                key: {"Description": entry.get("Description") or key, **({"Units": entry["Units"]} if entry.get("Units") else {})}
                for key, entry in columns[analysis].items()
            },
        }
        write_json(sidecar_of(path), sidecar)
        written.append(path)
    return written


def _unique_region_columns(frame: pd.DataFrame) -> list[str]:
    """Region names as column names; duplicated names get their index appended."""
    names = frame["name"].astype(str).tolist()
    if len(set(names)) == len(names):
        return names
    return [f"{name}_{index}" for name, index in zip(names, frame["index"].tolist())]


def _write_overlap_maps(output_dir: Path, masks: list[CompletedMask], target: Path | None = None) -> list[Path]:
    """Lesion count and proportion per (space, res) of the masks: on the grid of the
    first mask of each group; a mask on another grid (masks without ``res-`` on
    different grids) is moved onto it by the half-coverage rule, and counted in the
    sidecar's ``NumberOfMasksResampled``."""
    groups: dict[tuple[str, str | None], list[Path]] = {}
    for mask in masks:
        for path in mask.outputs:
            if path.name.endswith("_mask.nii.gz"):
                entities = parse_entities(path.name)
                groups.setdefault((entities["space"], entities.get("res")), []).append(path)
    written = []
    for (space, res), paths in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        first = nib.load(paths[0])
        grid = Grid.of(first)
        count = np.zeros(grid.shape, dtype=np.int32)
        resampled = 0
        for path in paths:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj).astype(bool)
            if not Grid.of(img).matches(grid):
                data = resample_mask(data, img.affine, grid)
                resampled += 1
            count += data
        if res is not None:
            resolution = float(res.replace("p", "."))
            described = {res: f"{resolution:g} mm isotropic, {space} template grid"}
        else:
            described = f"grid of {paths[0].name} ({grid.describe()})"
        common = {
            "SpatialReference": space,
            "Resolution": described,
            "NumberOfMasks": len(paths),
            "NumberOfMasksResampled": resampled,
            "Sources": [f"bids::{p.relative_to(output_dir).as_posix()}" for p in paths],
        }
        maps = [
            ("lesioncount", "statmap", count.astype(np.float32), "Number of lesion masks covering each voxel", "masks"),
            ("lesionoverlap", "probseg", (count / len(paths)).astype(np.float32), "Proportion of lesion masks covering each voxel", ""),
        ]
        for desc, suffix, data, description, units in maps:
            path = (target or output_dir) / group_overlap(space, res, desc, suffix)
            img = nib.Nifti1Image(data, grid.affine)
            img.header.set_xyzt_units("mm")
            with atomic_path(path) as temporary:
                nib.save(img, temporary)
            write_json(sidecar_of(path), {"Description": description, "Units": units, **common})
            written.append(path)
    return written


def _write_summary(output_dir: Path, summary: GroupSummary, target: Path | None = None) -> Path:
    target = target or output_dir
    path = target / GROUP_DIR / "summary.json"
    document = {
        "lacuna_version": __version__,
        "created": utc_now(),
        "n_masks": len(summary.masks),
        "masks": [
            {**{k: v for k, v in m.identity.items() if v}, "provenance": m.provenance_path.relative_to(output_dir).as_posix()}
            for m in summary.masks
        ],
        "incomplete": summary.incomplete,
        "n_failed": len(summary.failed),
        "failed": [{"mask": r.mask, "reason": r.error, "time": r.time} for r in summary.failed],
        "tables": [p.relative_to(target).as_posix() for p in summary.written],
        "inference": summary.inference.to_dict() if summary.inference is not None else None,
    }
    return write_json(path, document)
