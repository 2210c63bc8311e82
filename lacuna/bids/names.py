"""Every output file name Lacuna writes, built in one place.

Names follow BIDS derivatives: entities in the specification's order
(``sub, ses, acq, run, space, atlas, seg, res, label, desc``), one ``desc-`` at most,
no invented entities. A parcellation named ``<atlas>_<desc>`` becomes
``atlas-<atlas>_seg-<desc>`` (BIDS: ``seg-`` distinguishes the realisations of one
atlas, e.g. 100 or 400 parcels), which leaves ``desc-`` free for the measure.

Per mask, under ``sub-<label>[/ses-<label>]/anat/``:

========================  ===========================================================
lesion mask               ``..._space-S_res-R_label-L_mask.nii.gz``
voxel map                 ``..._space-S_res-R_label-L_desc-D_statmap.nii.gz`` (or
                          ``_probseg`` for maps of values in [0, 1])
parcel table              ``..._space-S_atlas-A_seg-P_label-L_desc-D_parcelstats.tsv``
connectivity matrix       ``..._space-S_atlas-A_seg-P_label-L_desc-D_relmat.tsv``
scalars                   ``..._label-L_scalars.json``
provenance                ``..._label-L_provenance.json`` (written last: marks the mask
                          as complete)
========================  ===========================================================

The mask's own entities are kept: ``space-`` as declared (e.g. ``MNI152NLin2009aSym``
for an ATLAS v2.0 mask), its ``res-`` (on a template grid, the template resolution; on
another grid, the input's own ``res-`` if it had one, else none), and its ``desc-``
when it also has a ``label-`` (``label-L_desc-T1lesion``): the mask's ``desc`` then
leads every output's ``desc`` (``desc-T1lesionFlnmGSP1000t``).

``statmap``, ``parcelstats``, ``relmat``, ``scalars`` and ``provenance`` are not (yet) in
the BIDS specification; :data:`BIDSIGNORE_PATTERNS` lists them, and the ``group/``
folder, for the official validator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ENTITY_ORDER = ("sub", "ses", "acq", "run", "space", "atlas", "seg", "res", "label", "desc")

#: Outputs the BIDS specification cannot name yet (statistical maps and per-parcel
#: tables are BIDS extension proposals); written to ``.bidsignore``.
BIDSIGNORE_PATTERNS = (
    "*_statmap.nii.gz",
    "*_statmap.json",
    "*_parcelstats.tsv",
    "*_parcelstats.json",
    "*_relmat.tsv",
    "*_relmat.json",
    "*_scalars.json",
    "*_provenance.json",
    "group",
    "logs",
    "CITATION.md",
)

GROUP_DIR = "group"

_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def check_label(key: str, value: str) -> str:
    """Return ``value`` if it is a valid BIDS label (letters and digits only)."""
    if not _LABEL.match(str(value)):
        raise ValueError(f"invalid BIDS label for {key}-: {value!r} (letters and digits only)")
    return str(value)


def build_name(entities: dict[str, str | None], suffix: str, extension: str) -> str:
    """``key-value`` pairs in BIDS order, then ``_suffix`` and the extension."""
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}")
    parts = [
        f"{key}-{check_label(key, entities[key])}"
        for key in ENTITY_ORDER
        if entities.get(key) not in (None, "")
    ]
    return "_".join([*parts, suffix]) + extension


def format_resolution(resolution: float) -> str:
    """``res-`` label of a resolution in mm (``2.0`` -> ``"2"``)."""
    return f"{resolution:g}".replace(".", "p")


def parcellation_entities(parcellation: str) -> dict[str, str]:
    """``atlas``/``seg`` entities of a parcellation name ``<atlas>[_<desc>]``."""
    atlas, _, seg = parcellation.partition("_")
    return {"atlas": atlas, "seg": seg or None}


@dataclass(frozen=True)
class MaskOutputs:
    """Names of the outputs of one lesion mask.

    Parameters
    ----------
    subject, session, acquisition, run : str or None
        Identity entities of the input mask.
    label : str
        The mask's ``label-`` (e.g. ``lesion``, ``acuteinfarct``).
    space : str
        Space of the mask and its voxel outputs.
    resolution : float
        Resolution (mm) of the mask.
    """

    subject: str
    session: str | None
    acquisition: str | None
    run: str | None
    label: str
    space: str
    resolution: float
    res_label: str | None = None
    mask_desc: str | None = None
    grid: object | None = None  # the mask's Grid: maps on it take the mask's space and res

    @classmethod
    def for_subject(cls, subject) -> "MaskOutputs":
        """Names for a :class:`~lacuna.core.subject.SubjectData`."""
        if not subject.subject_id:
            raise ValueError("the subject has no subject_id in its metadata; set metadata['subject_id']")
        on_template = subject.on_template_grid
        return cls(
            subject=subject.subject_id,
            session=subject.session_id,
            acquisition=subject.metadata.get("acq"),
            run=subject.metadata.get("run"),
            label=subject.label,
            space=subject.declared_space,
            resolution=subject.resolution,
            res_label=format_resolution(subject.resolution) if on_template else subject.metadata.get("res"),
            mask_desc=subject.metadata.get("desc"),
            grid=subject.grid,
        )

    @property
    def folder(self) -> Path:
        """``sub-X[/ses-Y]/anat`` relative to the derivatives root."""
        folder = Path(f"sub-{self.subject}")
        if self.session:
            folder /= f"ses-{self.session}"
        return folder / "anat"

    def _identity(self) -> dict[str, str | None]:
        return {"sub": self.subject, "ses": self.session, "acq": self.acquisition, "run": self.run}

    def _desc(self, desc: str) -> str:
        """An output's ``desc`` led by the mask's own (``T1lesion`` + ``FlnmGSP1000t``)."""
        return f"{self.mask_desc}{desc[:1].upper()}{desc[1:]}" if self.mask_desc else desc

    def _path(self, entities: dict, suffix: str, extension: str) -> Path:
        return self.folder / build_name({**self._identity(), **entities}, suffix, extension)

    def mask(self) -> Path:
        """The lesion mask NIfTI."""
        entities = {"space": self.space, "res": self.res_label, "label": self.label, "desc": self.mask_desc}
        return self._path(entities, "mask", ".nii.gz")

    def voxel_map(self, desc: str, suffix: str, space: str, resolution: float, grid=None) -> Path:
        """A voxel map NIfTI (``statmap`` or ``probseg``); a map on the mask's own grid
        takes the mask's ``space-`` and ``res-``."""
        if grid is not None and self.grid is not None and grid.matches(self.grid):
            space, res = self.space, self.res_label
        else:
            res = format_resolution(resolution)
        entities = {"space": space, "res": res, "label": self.label, "desc": self._desc(desc)}
        return self._path(entities, suffix, ".nii.gz")

    def parcel_table(self, parcellation: str, desc: str) -> Path:
        """A per-parcel TSV."""
        entities = {"space": self.space, **parcellation_entities(parcellation), "label": self.label, "desc": self._desc(desc)}
        return self._path(entities, "parcelstats", ".tsv")

    def connectivity(self, parcellation: str, desc: str) -> Path:
        """A parcel x parcel matrix TSV."""
        entities = {"space": self.space, **parcellation_entities(parcellation), "label": self.label, "desc": self._desc(desc)}
        return self._path(entities, "relmat", ".tsv")

    def scalars(self) -> Path:
        """The JSON of scalar results."""
        return self._path({"label": self.label, "desc": self.mask_desc}, "scalars", ".json")

    def provenance(self) -> Path:
        """The provenance JSON (the completion marker of the mask)."""
        return self._path({"label": self.label, "desc": self.mask_desc}, "provenance", ".json")

    @property
    def key(self) -> str:
        """Identity of the mask, e.g. ``sub-01_ses-02_label-lesion``."""
        return build_name({**self._identity(), "label": self.label, "desc": self.mask_desc}, "", "").rstrip("_")


def group_table(parcellation: str, desc: str) -> Path:
    """A group-level per-parcel TSV under ``group/``."""
    return Path(GROUP_DIR) / build_name({**parcellation_entities(parcellation), "desc": desc}, "parcelstats", ".tsv")


def group_scalars(desc: str) -> Path:
    """A group-level table of one analysis' scalar results under ``group/``."""
    return Path(GROUP_DIR) / build_name({"desc": desc}, "scalars", ".tsv")


def group_overlap(space: str, res_label: str | None, desc: str, suffix: str) -> Path:
    """A group-level lesion overlap NIfTI under ``group/`` (``res_label``: the masks'
    ``res-`` label, or None for masks on a grid without one)."""
    entities = {"space": space, "res": res_label, "desc": desc}
    return Path(GROUP_DIR) / build_name(entities, suffix, ".nii.gz")


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar path of a NIfTI or TSV output."""
    name = path.name
    for ext in (".nii.gz", ".tsv", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    raise ValueError(f"no sidecar convention for {path}")


def measure_label(measure: str) -> str:
    """CamelCase alphanumeric form of a snake_case measure (``percent_damaged`` ->
    ``PercentDamaged``), used in group-level ``desc-`` labels."""
    return "".join(word[:1].upper() + word[1:] for word in re.split(r"[^A-Za-z0-9]+", measure) if word)
