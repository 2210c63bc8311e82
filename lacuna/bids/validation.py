"""Check a derivatives folder against the bundled schema of what Lacuna writes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema

from lacuna.core.errors import BidsError
from lacuna.core.atomic import TEMP_MARKER
from lacuna.bids.integrity import CRASH_PREFIX, LOGS_DIR
from lacuna.bids.names import GROUP_DIR, sidecar_of


@lru_cache(maxsize=1)
def derivatives_schema() -> dict:
    """The bundled JSON description of Lacuna's outputs."""
    text = resources.files("lacuna.data").joinpath("derivatives_schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@dataclass
class _Report:
    root: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, path: Path, message: str) -> None:
        self.errors.append(f"{self._rel(path)}: {message}")

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append(f"{self._rel(path)}: {message}")

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix() or "."
        except ValueError:
            return str(path)


def validate_bids_derivatives(derivatives_dir: str | Path, raise_on_error: bool = True) -> dict[str, list[str]]:
    """Validate a Lacuna derivatives folder.

    Checks that ``dataset_description.json`` exists, is valid JSON and has ``Name``,
    ``BIDSVersion``, ``GeneratedBy`` and ``DatasetType: derivative``; that subject and
    session folders are ``sub-<label>``/``ses-<label>``; that every file name matches a
    pattern of the bundled schema and agrees with its folders; that NIfTI and TSV files
    have JSON sidecars with the required metadata (``Resolution`` with ``res-``); and
    that tables have their required columns, each described in the sidecar.

    Parameters
    ----------
    derivatives_dir : str or Path
        Derivatives root (e.g. ``derivatives/lacuna``).
    raise_on_error : bool
        Raise :class:`BidsError` when errors are found.

    Returns
    -------
    dict
        ``{"errors": [...], "warnings": [...]}``; empty lists mean the folder passes.

    Raises
    ------
    FileNotFoundError
        If the folder does not exist.
    BidsError
        If errors are found and ``raise_on_error``.
    """
    root = Path(derivatives_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"derivatives folder not found: {root}")
    schema = derivatives_schema()
    report = _Report(root)
    _check_description(root, schema, report)
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            _check_hidden(entry, report)
        elif entry.is_dir() and entry.name == GROUP_DIR:
            _check_folder_files(entry, schema["group_kinds"], schema, report, identity={})
        elif entry.is_dir() and entry.name == LOGS_DIR:
            _check_logs(entry, report)
        elif entry.is_dir():
            _check_subject(entry, schema, report)
        elif entry.name not in schema["root_files"] and not any(
            re.match(p, entry.name) for p in schema["root_file_patterns"]
        ):
            report.error(entry, "unexpected file at the dataset root")
    if not any(p.is_dir() and re.match(schema["subject_folder"], p.name) for p in root.iterdir()):
        report.warn(root, "no sub-<label> folders: no participant outputs yet")
    result = {"errors": report.errors, "warnings": report.warnings}
    if report.errors and raise_on_error:
        shown = "\n  ".join(report.errors[:20])
        more = f"\n  ... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        raise BidsError(f"{root} is not a valid Lacuna derivatives folder:\n  {shown}{more}")
    return result


def _check_hidden(entry: Path, report: _Report) -> None:
    if TEMP_MARKER in entry.name:
        report.warn(entry, "temporary file left by an interrupted run (delete it, or re-run)")


def _check_description(root: Path, schema: dict, report: _Report) -> None:
    path = root / "dataset_description.json"
    if not path.is_file():
        report.error(path, "missing dataset_description.json")
        return
    document = _load_json(path, report)
    if document is not None:
        _check_schema(path, document, schema["schemas"]["dataset_description"], report)


def _load_json(path: Path, report: _Report):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        report.error(path, f"not valid JSON ({exc})")
        return None


def _check_schema(path: Path, document, schema: dict, report: _Report) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    for problem in sorted(validator.iter_errors(document), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in problem.path) or "document"
        report.error(path, f"{where}: {problem.message}")


def _check_subject(folder: Path, schema: dict, report: _Report) -> None:
    match = re.match(schema["subject_folder"], folder.name)
    if not match:
        report.error(folder, "folder is not a sub-<label> folder (letters and digits only)")
        return
    subject = folder.name[4:]
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            _check_hidden(child, report)
        elif child.is_dir() and re.match(schema["session_folder"], child.name):
            anat = child / "anat"
            _check_datatype_folder(child, anat, schema, report, {"sub": subject, "ses": child.name[4:]})
            if anat.is_dir():
                _check_completeness(anat, report)
        elif child.is_dir() and child.name == "anat":
            _check_folder_files(child, schema["file_kinds"], schema, report, {"sub": subject, "ses": None})
            _check_completeness(child, report)
        else:
            report.error(child, "expected ses-<label>/ or anat/ inside a subject folder")


def _check_datatype_folder(session: Path, anat: Path, schema: dict, report: _Report, identity: dict) -> None:
    for child in sorted(session.iterdir()):
        if child != anat and not child.name.startswith("."):
            report.error(child, "expected only anat/ inside a session folder")
    if anat.is_dir():
        _check_folder_files(anat, schema["file_kinds"], schema, report, identity)


def _check_folder_files(folder: Path, kinds: list[dict], schema: dict, report: _Report, identity: dict) -> None:
    files = {p.name: p for p in sorted(folder.iterdir())}
    sidecars_used: set[str] = set()
    for name, path in files.items():
        if name.startswith("."):
            _check_hidden(path, report)
            continue
        if path.is_dir():
            report.error(path, "unexpected folder")
            continue
        kind = next((k for k in kinds if re.match(k["pattern"], name)), None)
        if kind is None:
            if name.endswith(".json") and _is_sidecar_of_listed(name, files):
                continue
            orphan = _data_file_of_sidecar(name, kinds) if name.endswith(".json") else None
            if orphan:
                report.error(path, f"sidecar of {orphan}, which is missing (re-run the participant level for this mask)")
            else:
                report.error(path, "file name does not match any pattern of the Lacuna derivatives schema")
            continue
        _check_identity(path, re.match(kind["pattern"], name), identity, report)
        if "schema" in kind:
            document = _load_json(path, report)
            if document is not None:
                _check_schema(path, document, schema["schemas"][kind["schema"]], report)
        if "sidecar" in kind:
            sidecars_used.add(sidecar_of(path).name)
            _check_sidecar(path, kind, schema, report)
        if "required_columns" in kind:
            _check_table(path, kind["required_columns"], report)


def _data_file_of_sidecar(name: str, kinds: list[dict]) -> str | None:
    """The table or image a JSON file is named as the sidecar of, if that name is one
    Lacuna writes."""
    stem = name[: -len(".json")]
    for extension in (".tsv", ".nii.gz"):
        if any(re.match(k["pattern"], stem + extension) for k in kinds):
            return stem + extension
    return None


def _check_completeness(folder: Path, report: _Report) -> None:
    """Every lesion mask is listed by a provenance file (written last, so its absence
    means the outputs are incomplete), and every output a provenance lists exists."""
    listed: set[str] = set()
    for provenance in sorted(folder.glob("*_provenance.json")):
        try:
            record = json.loads(provenance.read_text(encoding="utf-8"))
            outputs = [str(item["path"]) for item in record["outputs"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # reported as invalid JSON or against its schema
        for relative in outputs:
            listed.add(relative)
            if not (report.root / relative).is_file():
                report.error(provenance, f"lists {relative}, which is missing (re-run the participant level for this mask)")
    for mask in sorted(folder.glob("*_mask.nii.gz")):
        if mask.relative_to(report.root).as_posix() not in listed:
            report.error(
                mask,
                "no provenance file lists this mask: its outputs are incomplete (interrupted run, or the "
                "provenance file was deleted); re-run the participant level for it",
            )


def _check_logs(folder: Path, report: _Report) -> None:
    for path in sorted(folder.iterdir()):
        if path.name.startswith(CRASH_PREFIX) and path.suffix == ".json":
            _load_json(path, report)
        elif not path.name.startswith("."):
            report.warn(path, "unexpected file in logs/ (Lacuna writes crash_<mask>.json there)")


def _is_sidecar_of_listed(name: str, files: dict) -> bool:
    stem = name[: -len(".json")]
    return any(other != name and other.startswith(stem + ".") for other in files)


def _check_identity(path: Path, match: re.Match, identity: dict, report: _Report) -> None:
    for key in ("sub", "ses"):
        if key in identity and match.groupdict().get(key) != identity[key]:
            report.error(path, f"{key}- entity does not match its folder ({identity[key]!r})")


def _check_sidecar(path: Path, kind: dict, schema: dict, report: _Report) -> None:
    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        report.error(path, f"missing JSON sidecar {sidecar.name}")
        return
    document = _load_json(sidecar, report)
    if document is None:
        return
    _check_schema(sidecar, document, schema["schemas"][kind["sidecar"]], report)
    if "_res-" in path.name and isinstance(document, dict) and "Resolution" not in document:
        report.error(sidecar, "a file with res- needs 'Resolution' in its sidecar")


def _check_table(path: Path, required: list[str], report: _Report) -> None:
    try:
        header = path.read_text(encoding="utf-8").split("\n", 1)[0].split("\t")
    except OSError as exc:
        report.error(path, f"cannot be read ({exc})")
        return
    missing = [c for c in required if c not in header]
    if missing:
        report.error(path, f"missing required column(s) {missing}")
    sidecar = sidecar_of(path)
    if sidecar.is_file():
        try:
            described = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError:
            return
        undocumented = [c for c in header if c not in described]
        if undocumented:
            report.warn(path, f"columns not described in the sidecar: {undocumented[:5]}")
