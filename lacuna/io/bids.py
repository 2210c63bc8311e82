"""BIDS input (finding and loading lesion masks) and output (derivatives)."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from lacuna._version import __version__
from lacuna.core.entities import parse_entities
from lacuna.core.errors import BidsError, LacunaError
from lacuna.core.nifti_files import image_bytes
from lacuna.core.provenance import remember_sha256, sha256_file, software_versions, utc_now
from lacuna.core.results import ConnectivityMatrix, ParcelData, ScalarMetric, VoxelMap, write_tsv
from lacuna.core.spaces import ACCEPTED_SPACES, identify_standard_grid
from lacuna.core.subject import SubjectData
from lacuna.core.tsv import write_columns_tsv
from lacuna.core.atomic import atomic_path, atomic_write_bytes, write_json
from lacuna.io.bids_layout import SKIPPED_FOLDERS, inherited_metadata, source_dataset_entry, walk_dataset  # noqa: F401 (SKIPPED_FOLDERS: public here before)
from lacuna.io.integrity import output_problems, recorded_input_sha256
from lacuna.io.naming import BIDSIGNORE_PATTERNS, MaskOutputs, format_resolution, sidecar_of

log = logging.getLogger(__name__)

BIDS_VERSION = "1.10.0"
CODE_URL = "https://github.com/lacuna-neuro/lacuna"



# --------------------------------------------------------------------------- input


def find_mask_files(
    bids_root: str | Path,
    pattern: str = "*",
    suffix: str = "_mask.nii.gz",
    recursive: bool = True,
    subjects: Iterable[str] | None = None,
    exclude: Iterable[str | Path] = (),
) -> list[Path]:
    """Mask files below ``bids_root``, sorted, without loading them.

    Parameters
    ----------
    bids_root : str or Path
        Dataset root or any folder below it.
    pattern : str
        fnmatch glob matched anywhere in the file name without ``suffix``
        (``"CAS001"`` behaves like ``"*CAS001*"``).
    suffix : str
        File-name ending of the masks.
    recursive : bool
        Search sub-folders.
    subjects : iterable of str, optional
        Subject labels (``sub-`` optional) to keep.
    exclude : iterable of path
        Folders to skip in addition to ``derivatives/``, ``sourcedata/``, ``code/``,
        nested datasets (any folder with its own ``dataset_description.json``, such as
        an earlier output folder) and what the dataset's ``.bidsignore`` lists (e.g. the
        output and work folders when they sit inside the dataset).

    Raises
    ------
    FileNotFoundError
        If ``bids_root`` does not exist.
    """
    root = Path(bids_root)
    if not root.exists():
        raise FileNotFoundError(f"BIDS folder not found: {root}")
    wanted = {s.removeprefix("sub-") for s in subjects} if subjects else None
    glob = f"*{pattern}*" if pattern not in ("", "*") else "*"
    files = walk_dataset(root, exclude) if recursive else (p for p in sorted(root.iterdir()) if p.is_file())
    found = []
    for path in files:
        filename = path.name
        if not filename.endswith(suffix) or filename.startswith("."):
            continue
        if not fnmatch.fnmatchcase(filename[: -len(suffix)], glob):
            continue
        if wanted is not None and parse_entities(filename).get("sub") not in wanted:
            continue
        found.append(path)
    return sorted(found)


def detect_space(path: Path, space: str | None = None, root: str | Path | None = None) -> str | None:
    """Declared space of a mask: argument, else ``space-`` entity, else its sidecars.

    The sidecars follow the BIDS inheritance principle: a dataset-level
    ``label-lesion_mask.json`` with ``"SpatialReference"`` applies to every
    ``*_label-lesion_mask.nii.gz`` below it, unless a more specific sidecar says
    otherwise. ``root`` is the dataset root (default: the nearest folder above the mask
    with a ``dataset_description.json``).
    """
    if space:
        return space
    entity = parse_entities(path.name).get("space")
    if entity:
        return entity
    try:
        sidecar = inherited_metadata(path, root)
    except (OSError, ValueError):
        return None
    found = sidecar.get("SpatialReference") or sidecar.get("Space")
    return found if isinstance(found, str) else None


def load_bids_dataset(
    bids_root: str | Path,
    pattern: str = "*",
    suffix: str = "_mask.nii.gz",
    recursive: bool = True,
    space: str | None = None,
    resolution: float | None = None,
    subjects: list[str] | None = None,
) -> dict[str, SubjectData]:
    """Load lesion masks from a BIDS dataset using pattern matching (no pybids needed).

    Parameters
    ----------
    bids_root : str or Path
        Dataset root or any folder below it (e.g. one subject's ``anat/``).
    pattern : str
        fnmatch glob matched anywhere in the file name without the suffix:
        ``"CAS001"`` selects subject CAS001, ``"CAS001*ses-01*acuteinfarct"`` one
        subject, session and label, ``"*"`` everything.
    suffix : str
        File-name ending of the masks (``"_mask.nii.gz"``, ``"_mask.nii"``, ``".nii.gz"``).
    recursive : bool
        Search sub-folders.
    space : str, optional
        Space of all masks; else each file's ``space-`` entity, else its JSON sidecar.
        Files whose space is unknown or unsupported are skipped with a warning.
    resolution : float, optional
        Resolution in mm; else the ``res-`` entity, else the sidecar (the image header
        wins when they disagree).
    subjects : list of str, optional
        Subject IDs (without ``sub-``) to load; filtered before loading.

    Returns
    -------
    dict of str to SubjectData
        Keyed by file name without the suffix.

    Raises
    ------
    FileNotFoundError
        If ``bids_root`` does not exist.
    BidsError
        If no file matches.
    """
    paths = find_mask_files(bids_root, pattern, suffix, recursive, subjects)
    if not paths:
        raise BidsError(
            f"no files ending in {suffix!r} matching {pattern!r} under {bids_root}"
            + (f" for subjects {subjects}" if subjects else "")
        )
    dataset: dict[str, SubjectData] = {}
    for path in paths:
        declared = detect_space(path, space)
        if declared is None:
            log.warning("skipping %s: no space declared (space- entity, sidecar or argument)", path)
            continue
        if declared not in ACCEPTED_SPACES:
            log.warning(
                "skipping %s: space %s is not supported (supported: %s)",
                path,
                declared,
                ", ".join(ACCEPTED_SPACES),
            )
            continue
        try:
            subject = SubjectData.from_nifti(path, space=declared, resolution=resolution)
        except LacunaError as exc:
            log.warning("skipping %s", exc)
            continue
        subject.metadata["bids_relpath"] = _relative_to_dataset(path, bids_root)
        dataset[path.name[: -len(suffix)]] = subject
    if not dataset:
        raise BidsError(f"no usable mask among the {len(paths)} matching files under {bids_root}")
    return dataset


def _relative_to_dataset(path: Path, root: str | Path) -> str:
    root = Path(root).resolve()
    while root != root.parent and not (root / "dataset_description.json").is_file():
        root = root.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return path.name


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


def _save_image(img: nib.Nifti1Image, path: Path, durable: bool = False) -> None:
    """Write a NIfTI image atomically (fast gzip: :mod:`lacuna.core.compression`; not
    flushed to the disk unless ``durable``: a mask's outputs are covered by the
    checksums of its provenance file, which is)."""
    _save_bytes(image_bytes(img, path.name), path, durable)


def _save_bytes(data: bytes, path: Path, durable: bool = False) -> None:
    atomic_write_bytes(path, data, durable=durable)
    remember_sha256(path, data)


def _write_output_json(path: Path, data: dict) -> None:
    """A sidecar or table of a mask's outputs (not flushed: see :func:`_save_image`)."""
    write_json(path, data, durable=False)


# -------------------------------------------------------------------------- output


@dataclass
class _PlannedFile:
    """One output: where it goes and how to write it."""

    path: Path
    write: callable


def container_info() -> dict | None:
    """``{"Type", "Tag"}`` of the container Lacuna runs in, or None.

    Read from ``LACUNA_CONTAINER_TYPE``/``LACUNA_CONTAINER_TAG`` (set by Lacuna's
    Dockerfile and Singularity.def), else from Apptainer/Singularity's own variables.
    """
    kind = os.environ.get("LACUNA_CONTAINER_TYPE")
    tag = os.environ.get("LACUNA_CONTAINER_TAG", "")
    if not kind:
        if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
            kind = "singularity"
            tag = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER", "")
    if not kind:
        return None
    info = {"Type": kind}
    if tag:
        info["Tag"] = tag
    return info


def dataset_description(source_dir: str | Path | None = None, linked: dict[str, Path] | None = None) -> dict:
    """Contents of the derivatives' ``dataset_description.json``.

    ``source_dir`` (linked as ``raw``) and the ``linked`` datasets (e.g. lesion masks
    kept as a derivative dataset) are listed in ``SourceDatasets`` with the DOI and
    License their own descriptions declare, and in ``DatasetLinks``.
    """
    generated_by = {
        "Name": "lacuna",
        "Version": __version__,
        "Description": "Lesion network mapping: regional damage, functional and structural LNM",
        "CodeURL": CODE_URL,
    }
    container = container_info()
    if container:
        generated_by["Container"] = container
    description = {
        "Name": "Lacuna lesion network mapping derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
    }
    sources = {"raw": Path(source_dir)} if source_dir is not None else {}
    sources.update(linked or {})
    if sources:
        entries = {name: source_dataset_entry(folder) for name, folder in sources.items()}
        description["SourceDatasets"] = list(entries.values())
        description["DatasetLinks"] = {name: entry["URL"] for name, entry in entries.items()}
    return description


_README = """# Lacuna derivatives

Generated by Lacuna {version}: lesion masks, regional damage and lesion network maps per
participant (`sub-*/`), group-level tables and lesion-overlap maps (`group/`).
Outputs not yet named by the BIDS specification (statistical maps, per-parcel tables,
scalars, provenance) are listed in `.bidsignore`.
"""


def initialise_derivatives(
    output_dir: str | Path, source_dir: str | Path | None = None, linked: dict[str, Path] | None = None
) -> Path:
    """Create the derivatives root: ``dataset_description.json``, ``.bidsignore``, README.

    An existing description is rewritten (it records the current version and
    container); an existing README is kept. ``linked``: see :func:`dataset_description`.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    description_path = root / "dataset_description.json"
    if source_dir is None and description_path.is_file():
        return root
    write_json(description_path, dataset_description(source_dir, linked))
    with atomic_path(root / ".bidsignore") as temporary:
        temporary.write_text("\n".join(BIDSIGNORE_PATTERNS) + "\n", encoding="utf-8")
    if not (root / "README.md").exists():
        with atomic_path(root / "README.md") as temporary:
            temporary.write_text(_README.format(version=__version__), encoding="utf-8")
    return root


def _resolution_entry(space: str, resolution: float) -> dict:
    return {format_resolution(resolution): f"{resolution:g} mm isotropic, {space} template grid"}


def _mask_grid_resolution(names: MaskOutputs, on_template_grid: bool) -> dict | str:
    """``Resolution`` of an output on the mask's own grid: keyed by its ``res-`` label
    when the name has one (the validator requires it then)."""
    if on_template_grid:
        return _resolution_entry(names.space, names.resolution)
    text = f"the lesion mask's own grid ({names.grid.describe()}), {names.space}"
    return {names.res_label: text} if names.res_label else text


def _plan_outputs(
    subject: SubjectData,
    names: MaskOutputs,
    export_lesion_mask: bool,
    export_voxelmaps: bool,
    export_parcel_data: bool,
    export_connectivity: bool,
    export_scalars: bool,
) -> list[_PlannedFile]:
    planned: list[_PlannedFile] = []
    mask_path = names.mask()
    if export_lesion_mask:
        planned.append(_PlannedFile(mask_path, lambda p: _save_image(subject.mask_img, p)))
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
            if isinstance(result, VoxelMap) and export_voxelmaps:
                planned.extend(_plan_voxel_map(result, analysis, names, mask_path))
            elif isinstance(result, ParcelData) and export_parcel_data:
                table = result.table or analysis.lower()
                parcel_tables.setdefault((analysis, result.parcellation, table), []).append(result)
            elif isinstance(result, ConnectivityMatrix) and export_connectivity:
                planned.extend(_plan_connectivity(result, key, analysis, names))
            elif isinstance(result, ScalarMetric) and export_scalars:
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


def _write_voxel_map(result: VoxelMap, path: Path) -> None:
    if result.written_to and Path(result.written_to) == path and path.is_file():
        return  # already on disk with this content
    _save_bytes(result.file_bytes(path.name), path)


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
            _save_bytes(result.file_bytes(path.name), path)
            result = dataclasses.replace(result, data=nib.load(path).dataobj, written_to=str(path))
        released[key] = result
    new = copy.copy(subject)
    new.results = {**subject.results, analysis_name: released}
    return new


def parcel_columns(columns: list[ParcelData]) -> dict[str, list]:
    """Columns of one parcellation's table: ``index``, ``name``, then one per measure."""
    first = columns[0]
    table = {"index": list(first.region_ids), "name": list(first.region_names)}
    for column in columns:
        if list(column.region_ids) != list(first.region_ids):
            raise ValueError(f"measures of {first.parcellation} disagree on the regions")
        table[column.measure] = [float(value) for value in column.values]
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
    frame = result.to_frame().reset_index(names="name")
    sidecar = {
        "name": {"Description": "Region name (row); columns are the same regions in order"},
        **{region: {"Description": f"{result.description} with {region}"} for region in result.region_names},
    }
    return [
        _PlannedFile(path, lambda p: _write_frame(frame, p)),
        _PlannedFile(sidecar_of(path), lambda p: _write_output_json(p, sidecar)),
    ]


def _write_frame(frame, path: Path) -> None:
    with atomic_path(path, durable=False) as temporary:
        write_tsv(frame, temporary)


def _write_columns(table: dict[str, list], path: Path) -> None:
    with atomic_path(path, durable=False) as temporary:
        write_columns_tsv(temporary, table)


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
    planned = _plan_outputs(
        subject_data,
        names,
        export_lesion_mask,
        export_voxelmaps,
        export_parcel_data,
        export_connectivity,
        export_scalars,
    )
    provenance_path = names.provenance()
    targets = [p.path for p in planned] + ([provenance_path] if export_provenance else [])
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
    for item in planned:
        item.write(root / item.path)
    if export_provenance:
        record = provenance_record(subject_data)
        record["outputs"] = [
            {"path": item.path.as_posix(), "sha256": sha256_file(root / item.path)} for item in planned
        ]
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
