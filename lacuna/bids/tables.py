"""Results as flat tables (CSV/TSV) and JSON, for one subject or many."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lacuna.core.results import ConnectivityMatrix, ParcelData, ScalarMetric, VoxelMap
from lacuna.core.subject import SubjectData
from lacuna.core.atomic import atomic_path, write_json
from lacuna.bids.derivatives import provenance_record


def flatten_results(subject: SubjectData, analysis_name: str | None = None) -> dict:
    """Results as one flat ``{column: value}`` mapping with dotted column names.

    ``results["A"]["k"]`` becomes ``A.k`` for a scalar, ``A.k.<region>`` for parcel
    data, and ``A.k.<statistic>`` for maps and matrices (their summary values).

    Raises
    ------
    ValueError
        If the subject has no results, or none for ``analysis_name``.
    """
    if not subject.results:
        raise ValueError(f"{subject!r} has no results to export; run an analysis first")
    if analysis_name is not None and analysis_name not in subject.results:
        raise ValueError(
            f"no results for analysis {analysis_name!r}; available: {', '.join(subject.results)}"
        )
    names = [analysis_name] if analysis_name else list(subject.results)
    flat: dict = {}
    for analysis in names:
        for key, result in subject.results[analysis].items():
            for sub_key, value in result.flatten().items():
                flat[".".join(part for part in (analysis, key, sub_key) if part)] = value
    return flat


def _metadata_columns(subject: SubjectData) -> dict:
    return {
        "subject_id": subject.subject_id,
        "session_id": subject.session_id,
        "label": subject.label,
        "coordinate_space": subject.space,
    }


def _row(subject: SubjectData, analysis_name: str | None, include_metadata: bool) -> dict:
    row = _metadata_columns(subject) if include_metadata else {}
    row.update(flatten_results(subject, analysis_name))
    return row


def _write_table(frame: pd.DataFrame, output_path: str | Path, separator: str) -> Path:
    output_path = Path(output_path)
    with atomic_path(output_path) as temporary:
        frame.to_csv(temporary, sep=separator, index=False, na_rep="n/a", lineterminator="\n")
    return output_path


def export_results_to_csv(
    mask_data: SubjectData,
    output_path: str | Path,
    analysis_name: str | None = None,
    include_metadata: bool = True,
) -> Path:
    """Write a subject's results as a one-row CSV with dotted column names.

    Parameters
    ----------
    mask_data : SubjectData
        Subject with analysis results.
    output_path : str or Path
        CSV path.
    analysis_name : str, optional
        Export only this analysis (e.g. ``"RegionalDamage"``).
    include_metadata : bool
        Add ``subject_id``, ``session_id``, ``label`` and ``coordinate_space`` columns.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        If there are no results or ``analysis_name`` is unknown.
    """
    frame = pd.DataFrame([_row(mask_data, analysis_name, include_metadata)])
    return _write_table(frame, output_path, ",")


def export_results_to_tsv(
    mask_data: SubjectData,
    output_path: str | Path,
    analysis_name: str | None = None,
    include_metadata: bool = True,
) -> Path:
    """Same as :func:`export_results_to_csv`, tab-separated (preferred in BIDS)."""
    frame = pd.DataFrame([_row(mask_data, analysis_name, include_metadata)])
    return _write_table(frame, output_path, "\t")


def _nested_results(subject: SubjectData, analysis_name: str | None) -> dict:
    flatten_results(subject, analysis_name)  # same checks as the tables
    names = [analysis_name] if analysis_name else list(subject.results)
    nested: dict = {}
    for analysis in names:
        entries = {}
        for key, result in subject.results[analysis].items():
            if isinstance(result, ScalarMetric):
                entries[key] = result.to_dict()
            elif isinstance(result, ParcelData):
                entries[key] = {
                    "parcellation": result.parcellation,
                    "measure": result.measure,
                    "units": result.units,
                    "values": result.flatten(),
                }
            elif isinstance(result, (VoxelMap, ConnectivityMatrix)):
                entries[key] = {"type": type(result).__name__, "summary": result.flatten()}
        nested[analysis] = entries
    return nested


def export_results_to_json(
    mask_data: SubjectData,
    output_path: str | Path,
    analysis_name: str | None = None,
    include_metadata: bool = True,
    include_provenance: bool = False,
    indent: int = 2,
) -> Path:
    """Write a subject's results as JSON: ``metadata``, ``results``, ``provenance``.

    Parameters
    ----------
    mask_data : SubjectData
        Subject with analysis results.
    output_path : str or Path
        JSON path.
    analysis_name : str, optional
        Export only this analysis.
    include_metadata : bool
        Include the ``metadata`` object.
    include_provenance : bool
        Include the ``provenance`` object.
    indent : int
        Indentation; 0 writes compact JSON.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        If there are no results or ``analysis_name`` is unknown.
    """
    document: dict = {}
    if include_metadata:
        document["metadata"] = _metadata_columns(mask_data)
    document["results"] = _nested_results(mask_data, analysis_name)
    if include_provenance:
        document["provenance"] = provenance_record(mask_data)
    return write_json(output_path, document, indent=indent)


def _batch_frame(mask_data_list: list[SubjectData], analysis_name: str | None, include_metadata: bool) -> pd.DataFrame:
    if not mask_data_list:
        raise ValueError("no subjects to export: the list is empty")
    rows = [_row(subject, analysis_name, include_metadata) for subject in mask_data_list]
    # Union of columns in first-seen order; missing values become NaN.
    return pd.DataFrame(rows)


def batch_export_to_csv(
    mask_data_list: list[SubjectData],
    output_path: str | Path,
    analysis_name: str | None = None,
    include_metadata: bool = True,
) -> Path:
    """Write many subjects' results as one CSV, one row per subject.

    Columns are the union over subjects; missing values are NaN (written ``n/a``).

    Raises
    ------
    ValueError
        If the list is empty or a subject has no results.
    """
    return _write_table(_batch_frame(mask_data_list, analysis_name, include_metadata), output_path, ",")


def batch_export_to_tsv(
    mask_data_list: list[SubjectData],
    output_path: str | Path,
    analysis_name: str | None = None,
    include_metadata: bool = True,
) -> Path:
    """Same as :func:`batch_export_to_csv`, tab-separated."""
    return _write_table(_batch_frame(mask_data_list, analysis_name, include_metadata), output_path, "\t")


def export_provenance_to_json(mask_data: SubjectData, output_path: str | Path, indent: int = 2) -> Path:
    """Write a subject's provenance: sources with checksums, steps, versions, parameters.

    Raises
    ------
    ValueError
        If the subject has no provenance.
    """
    if not mask_data.provenance:
        raise ValueError(f"{mask_data!r} has no provenance to export")
    return write_json(output_path, provenance_record(mask_data), indent=indent)
