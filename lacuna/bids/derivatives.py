"""BIDS derivatives of one mask: every output file planned, written atomically, and
listed with its checksum in the provenance file written last."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.bids.dataset import initialise_derivatives
from lacuna.bids.integrity import output_problems, recorded_input_sha256
from lacuna.bids.names import MaskOutputs, format_resolution, sidecar_of
from lacuna.core.atomic import atomic_write_bytes, json_bytes, write_json
from lacuna.core.errors import LacunaError
from lacuna.core.nifti_files import binary_mask_bytes, image_bytes
from lacuna.core.provenance import remember_sha256, sha256_file, software_versions, utc_now
from lacuna.core.results import ConnectivityMatrix, ParcelData, ScalarMetric, VoxelMap
from lacuna.core.spaces import identify_standard_grid
from lacuna.core.subject import SubjectData
from lacuna.core.tsv import matrix_columns, tsv_bytes

log = logging.getLogger(__name__)


def save_nifti(mask_data: SubjectData, output_path: str | Path, save_anatomical: bool = False) -> None:
    """Save the lesion mask (and, if asked and present, the anatomical image beside it).

    Parameters
    ----------
    mask_data : SubjectData
        Lesion to save.
    output_path : str or Path
        ``.nii`` or ``.nii.gz`` path.
    save_anatomical : bool
        Also write ``<name>_anatomical.nii[.gz]`` when the subject has an anatomical image.

    Raises
    ------
    ValueError
        If ``output_path`` is not a ``.nii``/``.nii.gz`` path.
    """
    output_path = Path(output_path)
    extension = ".nii.gz" if output_path.name.endswith(".nii.gz") else output_path.suffix
    if extension not in (".nii", ".nii.gz"):
        raise ValueError(f"{output_path}: NIfTI files must end in .nii or .nii.gz")
    _save_image(mask_data.mask_img, output_path, durable=True)
    if save_anatomical and mask_data.anatomical_img is not None:
        stem = output_path.name[: -len(extension)]
        _save_image(mask_data.anatomical_img, output_path.with_name(f"{stem}_anatomical{extension}"), durable=True)


def _save_image(img: nib.Nifti1Image, path: Path, durable: bool = False) -> str:
    """Write a NIfTI image atomically (fast gzip: :mod:`lacuna.core.compression`; not
    flushed to the disk unless ``durable``: a mask's outputs are covered by the
    checksums of its provenance file, which is); returns its SHA-256."""
    return _save_bytes(image_bytes(img, path.name), path, durable)


def _save_mask(subject: SubjectData, path: Path) -> str:
    """Write the mask as analysed (:func:`~lacuna.core.nifti_files.binary_mask_image`
    of its data) atomically, not flushed (see :func:`_save_image`); returns its SHA-256."""
    data = np.asanyarray(subject.mask_img.dataobj)
    return _save_bytes(binary_mask_bytes(data, subject.affine, path.name), path)


def _save_bytes(data: bytes, path: Path, durable: bool = False) -> str:
    """Write ``data`` atomically; returns its SHA-256 (so the file is not read back)."""
    atomic_write_bytes(path, data, durable=durable)
    return hashlib.sha256(data).hexdigest()


def _write_output_json(path: Path, data: dict) -> str:
    """A sidecar or table of a mask's outputs (not flushed: see :func:`_save_image`)."""
    return _save_bytes(json_bytes(data), path)


# -------------------------------------------------------------------------- output


@dataclass
class _PlannedFile:
    """One output: where it goes and how to write it (``write(path)`` returns the
    SHA-256 of what is in the file)."""

    path: Path
    write: callable


def _resolution_entry(space: str, resolution: float) -> dict:
    return {format_resolution(resolution): f"{resolution:g} mm isotropic, {space} template grid"}


def _mask_grid_resolution(names: MaskOutputs, on_template_grid: bool) -> dict | str:
    """``Resolution`` of an output on the mask's own grid: keyed by its ``res-`` label
    when the name has one (the validator requires it then)."""
    if on_template_grid:
        return _resolution_entry(names.space, names.resolution)
    text = f"the lesion mask's own grid ({names.grid.describe()}), {names.space}"
    return {names.res_label: text} if names.res_label else text


@dataclass(frozen=True)
class OutputSelection:
    """Which outputs of a mask :func:`export_bids_derivatives` writes."""

    lesion_mask: bool = True
    voxel_maps: bool = True
    parcel_data: bool = True
    connectivity: bool = True
    scalars: bool = True
    provenance: bool = True


def _plan_outputs(subject: SubjectData, names: MaskOutputs, selection: OutputSelection) -> list[_PlannedFile]:
    planned: list[_PlannedFile] = []
    mask_path = names.mask()
    if selection.lesion_mask:
        planned.append(_PlannedFile(mask_path, lambda p: _save_mask(subject, p)))
        planned.append(
            _PlannedFile(
                sidecar_of(mask_path),
                lambda p: _write_output_json(
                    p,
                    {
                        "Type": "Lesion",
                        "Description": "Binary lesion mask as analysed by Lacuna",
                        "SpatialReference": subject.declared_space,
                        "Resolution": _mask_grid_resolution(names, subject.on_template_grid),
                        "LesionVolume": subject.get_volume_mm3(),
                        "LesionVolumeUnits": "mm^3",
                        **_raw_sources(subject),
                    },
                ),
            )
        )
    parcel_tables: dict[tuple[str, str, str], list[ParcelData]] = {}
    scalars: dict[str, dict] = {}
    for analysis, results in subject.results.items():
        for key, result in results.items():
            if isinstance(result, VoxelMap) and selection.voxel_maps:
                planned.extend(_plan_voxel_map(result, analysis, names, mask_path))
            elif isinstance(result, ParcelData) and selection.parcel_data:
                table = result.table or analysis.lower()
                parcel_tables.setdefault((analysis, result.parcellation, table), []).append(result)
            elif isinstance(result, ConnectivityMatrix) and selection.connectivity:
                planned.extend(_plan_connectivity(result, key, analysis, names))
            elif isinstance(result, ScalarMetric) and selection.scalars:
                scalars.setdefault(analysis, {})[key] = result.to_dict()
    for (_, parcellation, table), columns in parcel_tables.items():
        planned.extend(_plan_parcel_table(columns, names.parcel_table(parcellation, table)))
    if scalars:
        planned.append(_PlannedFile(names.scalars(), lambda p: _write_output_json(p, scalars)))
    return planned


def _raw_sources(subject: SubjectData) -> dict:
    """``Sources`` of the mask in its input dataset (``DatasetLinks`` name ``raw``, or
    the name of the derivative dataset it came from)."""
    relpath = subject.metadata.get("bids_relpath")
    dataset = subject.metadata.get("bids_dataset") or "raw"
    return {"Sources": [f"bids:{dataset}:{relpath}"]} if relpath else {}


def _voxel_map_path(result: VoxelMap, analysis: str, names: MaskOutputs) -> Path:
    desc = result.desc or f"{analysis.lower()}{result.name}".replace("_", "")
    return names.voxel_map(desc, result.suffix, result.space, result.resolution, grid=result.grid)


def _write_voxel_map(result: VoxelMap, path: Path) -> str:
    if result.written_to and Path(result.written_to) == path and path.is_file():
        return sha256_file(path)  # already on disk with this content (digest remembered)
    return _save_bytes(result.file_bytes(path.name), path)


def _plan_voxel_map(result: VoxelMap, analysis: str, names: MaskOutputs, mask_path: Path) -> list[_PlannedFile]:
    path = _voxel_map_path(result, analysis, names)
    on_mask_grid = names.grid is not None and result.grid.matches(names.grid)
    template = identify_standard_grid(result.space, result.grid) is not None
    sidecar = {
        **result.sidecar(),
        "Analysis": analysis,
        "SpatialReference": names.space if on_mask_grid else result.space,
        "Resolution": _mask_grid_resolution(names, template) if on_mask_grid else _resolution_entry(result.space, result.resolution),
        "Sources": [f"bids::{mask_path.as_posix()}"],
    }
    return [
        _PlannedFile(path, lambda p: _write_voxel_map(result, p)),
        _PlannedFile(sidecar_of(path), lambda p: _write_output_json(p, sidecar)),
    ]


def write_voxel_maps(subject: SubjectData, output_dir: str | Path, analysis_name: str) -> SubjectData:
    """Write one analysis' voxel maps now and keep only lazy proxies of them in memory.

    Used when many subjects' maps would not fit in memory together: the returned copy
    of ``subject`` refers to the written files, which :func:`export_bids_derivatives`
    then lists without writing them again. The files are written atomically; the
    subject's outputs only count as complete once its provenance file exists.
    """
    root = Path(output_dir)
    names = MaskOutputs.for_subject(subject)
    released = {}
    for key, result in subject.results.get(analysis_name, {}).items():
        if isinstance(result, VoxelMap):
            path = root / _voxel_map_path(result, analysis_name, names)
            data = result.file_bytes(path.name)
            atomic_write_bytes(path, data, durable=False)
            remember_sha256(path, data)
            result = dataclasses.replace(result, data=nib.load(path).dataobj, written_to=str(path))
        released[key] = result
    new = copy.copy(subject)
    new.results = {**subject.results, analysis_name: released}
    return new


def parcel_columns(columns: list[ParcelData]) -> dict[str, list | np.ndarray]:
    """Columns of one parcellation's table: ``index``, ``name``, then one per measure
    (numeric columns as arrays: written in one call each, see
    :func:`~lacuna.core.tsv.tsv_bytes`)."""
    first = columns[0]
    table = {"index": np.asarray(first.region_ids, dtype=np.int64), "name": list(first.region_names)}
    for column in columns:
        if list(column.region_ids) != list(first.region_ids):
            raise ValueError(f"measures of {first.parcellation} disagree on the regions")
        table[column.measure] = np.asarray(column.values, dtype=np.float64)
    return table


def parcel_frame(columns: list[ParcelData]):
    """:func:`parcel_columns` as a pandas DataFrame."""
    import pandas as pd

    return pd.DataFrame(parcel_columns(columns))


def _plan_parcel_table(columns: list[ParcelData], path: Path) -> list[_PlannedFile]:
    sidecar = {
        "index": {"Description": f"Region index in the {columns[0].parcellation} parcellation"},
        "name": {"Description": "Region name"},
        **{column.measure: column.column_sidecar() for column in columns},
    }
    table = parcel_columns(columns)
    return [
        _PlannedFile(path, lambda p: _write_columns(table, p)),
        _PlannedFile(sidecar_of(path), lambda p: _write_output_json(p, sidecar)),
    ]


def _plan_connectivity(result: ConnectivityMatrix, key: str, analysis: str, names: MaskOutputs) -> list[_PlannedFile]:
    desc = f"{analysis.lower()}{result.measure}".replace("_", "")
    path = names.connectivity(result.parcellation, desc)
    table = matrix_columns(result.region_names, result.matrix)
    sidecar = {
        "name": {"Description": "Region name (row); columns are the same regions in order"},
        **{region: {"Description": f"{result.description} with {region}"} for region in result.region_names},
    }
    return [
        _PlannedFile(path, lambda p: _write_columns(table, p)),
        _PlannedFile(sidecar_of(path), lambda p: _write_output_json(p, sidecar)),
    ]


def _write_columns(table: dict[str, list], path: Path) -> str:
    return _save_bytes(tsv_bytes(table), path)


def provenance_record(subject: SubjectData) -> dict:
    """Provenance of a subject as a JSON-ready dict (no secrets: parameters only)."""
    return {
        "subject": {k: v for k, v in subject.metadata.items() if v is not None},
        "space": subject.space,
        "declared_space": subject.declared_space,
        "grid": subject.grid.describe(),
        "resolution_mm": subject.resolution,
        "software": software_versions(),
        "steps": [step.to_dict() for step in subject.provenance],
    }


def export_bids_derivatives(
    subject_data: SubjectData,
    output_dir: str | Path,
    export_lesion_mask: bool = True,
    export_voxelmaps: bool = True,
    export_parcel_data: bool = True,
    export_connectivity: bool = True,
    export_scalars: bool = True,
    export_provenance: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a subject and all its results as BIDS derivatives.

    Writes the mask (NIfTI), VoxelMaps (NIfTI), ParcelData (TSV, one per analysis table
    and parcellation), ConnectivityMatrix (TSV), scalars (JSON) and provenance (JSON),
    each with a JSON sidecar where BIDS asks for one, under
    ``output_dir/sub-XX[/ses-YY]/anat/``. Every file is written to a temporary name
    and renamed; the provenance file is written last and lists all outputs with their
    checksums, so its presence means the mask's outputs are complete.

    Parameters
    ----------
    subject_data : SubjectData
        Processed lesion with results.
    output_dir : str or Path
        Derivatives root (e.g. ``derivatives/lacuna-v0.1.0``); created with a
        ``dataset_description.json`` if needed.
    export_lesion_mask, export_voxelmaps, export_parcel_data, export_connectivity,
    export_scalars, export_provenance : bool
        Which outputs to write.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    Path
        The subject's derivatives folder (``output_dir/sub-XX[/ses-YY]``).

    Raises
    ------
    FileExistsError
        If outputs exist and ``overwrite`` is False.
    ValueError
        If the subject has no ``subject_id``.
    """
    names = MaskOutputs.for_subject(subject_data)
    root = Path(output_dir)
    selection = OutputSelection(
        lesion_mask=export_lesion_mask,
        voxel_maps=export_voxelmaps,
        parcel_data=export_parcel_data,
        connectivity=export_connectivity,
        scalars=export_scalars,
        provenance=export_provenance,
    )
    planned = _plan_outputs(subject_data, names, selection)
    provenance_path = names.provenance()
    targets = [p.path for p in planned] + ([provenance_path] if selection.provenance else [])
    if len(set(targets)) != len(targets):
        duplicates = sorted({str(t) for t in targets if targets.count(t) > 1})
        raise LacunaError(f"two results would be written to the same file: {duplicates}")
    existing = [] if overwrite else [str(t) for t in targets if (root / t).exists()]
    if existing:
        raise FileExistsError(
            f"{len(existing)} output(s) already exist in {root} (e.g. {existing[0]}); "
            "pass overwrite=True (--overwrite) to replace them"
        )
    initialise_derivatives(root)
    digests = [item.write(root / item.path) for item in planned]
    if selection.provenance:
        record = provenance_record(subject_data)
        record["outputs"] = [{"path": item.path.as_posix(), "sha256": digest} for item, digest in zip(planned, digests)]
        record["exported"] = utc_now()
        write_json(root / provenance_path, record)
    return root / names.folder.parent


def outputs_complete(output_dir: str | Path, subject: SubjectData, step_name: str, parameters: dict) -> bool:
    """Whether a mask's outputs exist in full for the same run configuration and input.

    True when the provenance file (written last) exists, holds a step ``step_name``
    with exactly ``parameters`` (same analyses and options), recorded the same input
    mask (its SHA-256, so a replaced mask of the same name is recomputed), and every
    output it lists still has its recorded checksum.
    """
    root = Path(output_dir)
    path = root / MaskOutputs.for_subject(subject).provenance()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    steps = [s for s in record.get("steps", []) if s.get("name") == step_name]
    if not steps or steps[-1].get("parameters") != json.loads(json.dumps(parameters)):
        return False
    current = recorded_input_sha256({"steps": [step.to_dict() for step in subject.provenance]})
    if current is None or recorded_input_sha256(record) != current:
        log.info("%s: the input mask changed since its outputs were written; recomputing", path.name)
        return False
    problems = output_problems(root, record)
    if problems:
        log.info("%s: %s; recomputing", path.name, problems[0])
    return not problems
