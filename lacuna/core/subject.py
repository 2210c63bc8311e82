"""SubjectData: one binary lesion mask in a template space, with its results.

A mask may be on any voxel grid of its space (any voxel size, field of view, axis order
or direction, oblique); each analysis moves it onto its own grid by the half-coverage
rule (:mod:`lacuna.core.spaces`). What is rejected is what cannot be a brain lesion in
that space: a header without a spatial transform or with a degenerate one, and a
lesion that lies wholly outside the template's field of view.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.core.entities import parse_entities, parse_resolution, read_sidecar, mask_label
from lacuna.core.errors import SpaceError, ValidationError
from lacuna.core.nifti_files import binary_mask_image, nifti1_in_one_piece
from lacuna.core.provenance import InputFile, ProvenanceStep, resolved_path
from lacuna.core.results import Result
from lacuna.core.spaces import (
    Grid,
    canonical_space,
    frame_approximation,
    identify_standard_grid,
    space_of_standard_grid,
    template_field_of_view,
)

log = logging.getLogger(__name__)


class SubjectData:
    """A binary lesion mask in a known space, with metadata, results and provenance.

    Parameters
    ----------
    mask_img : nibabel.Nifti1Image
        3-D binary mask on any voxel grid of ``space``.
    space : str
        Template space: ``MNI152NLin6Asym``, ``MNI152NLin2009cAsym``, or one of the ICBM
        2009 family analysed as ``MNI152NLin2009cAsym`` (``MNI152NLin2009aSym``,
        ``MNI152NLin2009aAsym``, ``MNI152NLin2009bAsym``, ``MNI152NLin2009cSym``; a
        warning once per run, and the approximation is recorded in provenance).
    resolution : float, optional
        Voxel size in mm; read from the header when omitted (the header always wins).
    metadata : dict, optional
        ``subject_id``, ``session_id``, ``label``, ``source_path`` and other entities.
    anatomical_img : nibabel.Nifti1Image, optional
        Anatomical image on the same grid, kept for :func:`lacuna.io.save_nifti`.

    Raises
    ------
    ValidationError
        If the mask is not 3-D, contains NaN, is not binary, is empty, has a degenerate
        affine, or lies wholly outside the template's field of view.
    SpaceError
        If the space is not supported.

    Attributes
    ----------
    space : str
        The supported space the mask is analysed in.
    declared_space : str
        The space as declared (kept in output names).
    resolution : float
        The template grid's resolution, or the largest voxel edge (mm) of another grid.
    """

    def __init__(
        self,
        mask_img: nib.Nifti1Image,
        space: str,
        resolution: float | None = None,
        metadata: dict | None = None,
        anatomical_img: nib.Nifti1Image | None = None,
    ):
        self.metadata = dict(metadata or {})
        source = self.metadata.get("source_path") or "in-memory mask"
        self.space = canonical_space(space)
        self.declared_space = space
        data = _checked_mask_data(np.asanyarray(mask_img.dataobj), source)
        grid = Grid(data.shape, np.asarray(mask_img.affine, float))
        _check_affine(grid, source)
        header_resolution = identify_standard_grid(self.space, grid)
        if header_resolution is None:
            _check_field_of_view(data, grid, self.space, source)
            _warn_other_template_grid(grid, space, source)
            header_resolution = round(float(grid.voxel_sizes.max()), 4)
        elif resolution is not None and float(resolution) != header_resolution:
            log.warning(
                "%s: declared resolution %s mm disagrees with the image header (%s mm); "
                "using the header",
                source,
                resolution,
                header_resolution,
            )
        self.resolution = float(header_resolution)
        _warn_frame_approximation(space)
        self.mask_img = binary_mask_image(data, grid.affine)
        self.anatomical_img = anatomical_img
        self.results: dict[str, dict[str, Result]] = {}
        self.provenance: list[ProvenanceStep] = []

    @classmethod
    def from_nifti(
        cls,
        path: str | Path,
        space: str | None = None,
        resolution: float | None = None,
        metadata: dict | None = None,
        transform: str | Path | None = None,
    ) -> "SubjectData":
        """Load a lesion mask from a NIfTI file.

        Parameters
        ----------
        path : str or Path
            ``.nii`` or ``.nii.gz`` file.
        space : str, optional
            Template space; else the ``space-`` entity of the file name, else the
            ``SpatialReference``/``Space`` key of the JSON sidecar, else the space whose
            template grid the image is exactly on (when that grid belongs to one
            supported space only).
        resolution : float, optional
            Declared resolution in mm (the header wins on disagreement).
        metadata : dict, optional
            Overrides for metadata derived from the file name entities.
        transform : str or Path, optional
            An ITK/ANTs transform from ``space`` (then required) to the mask's own space;
            the mask is moved with it onto the template grid of ``space``
            (:mod:`lacuna.core.registration`), whatever space its file name declares.

        Returns
        -------
        SubjectData

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        ValidationError
            If the file is unreadable or not a valid binary 3-D mask.
        SpaceError
            If no supported space is declared and the grid is no template grid.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"lesion mask not found: {path}")
        entities = parse_entities(path.name)
        if transform is not None:
            return cls._registered(path, entities, transform, space, resolution, metadata)
        sidecar = _read_sidecar_checked(path)
        if space is None:
            space = entities.get("space") or sidecar.get("SpatialReference") or sidecar.get("Space")
        img = None
        if not space:
            img = _load_image(path)
            space = _space_from_grid(path, Grid.of(img))
        if not isinstance(space, str):
            raise SpaceError(f"{path}: the sidecar's space {space!r} is not a space name")
        try:
            canonical_space(space)
        except SpaceError as exc:
            raise SpaceError(f"{path}: {exc}") from exc
        if resolution is None:
            resolution = parse_resolution(entities.get("res")) or parse_resolution(
                sidecar.get("Resolution")
            )
        img = img or _load_image(path)
        _check_spatial_transform(img, path)
        info = _metadata_from_entities(entities, path)
        info.update(metadata or {})
        subject = cls(img, space=space, resolution=resolution, metadata=info)
        subject.provenance.append(load_step(subject, path))
        return subject

    @classmethod
    def _registered(cls, path, entities, transform, space, resolution, metadata) -> "SubjectData":
        """:meth:`from_nifti` with a user transform into ``space``."""
        from lacuna.core.registration import registered_mask

        if not space:
            raise SpaceError(f"{path}: a mask transform needs the space it maps into (--mask-space)")
        canonical_space(space)
        img = _load_image(path)
        _check_spatial_transform(img, path)
        data = _checked_mask_data(np.asanyarray(img.dataobj), str(path))
        registered, step = registered_mask(nib.Nifti1Image(data, img.affine), transform, space, resolution)
        info = _metadata_from_entities(entities, path)
        info.pop("res", None)  # the input's own res- describes its grid, not the template's
        info["source_space"] = entities.get("space")
        info.update(metadata or {})
        subject = cls(registered, space=space, metadata=info)
        subject.provenance.extend([load_step(subject, path), step])
        return subject

    @property
    def mask(self) -> np.ndarray:
        """The mask as a boolean array."""
        return np.asanyarray(self.mask_img.dataobj).astype(bool)

    @property
    def grid(self) -> Grid:
        """Voxel grid of the mask."""
        return Grid.of(self.mask_img)

    @property
    def on_template_grid(self) -> bool:
        """Whether the mask is on a TemplateFlow grid of its space (else any other grid)."""
        return identify_standard_grid(self.space, self.grid) is not None

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-mm affine of the mask."""
        return np.asarray(self.mask_img.affine, float)

    @property
    def n_voxels(self) -> int:
        """Number of lesioned voxels (counted once per mask image: a run asks for it
        several times per mask)."""
        counted = getattr(self, "_counted", None)
        if counted is None or counted[0] is not self.mask_img:
            counted = self._counted = (self.mask_img, int(np.count_nonzero(np.asanyarray(self.mask_img.dataobj))))
        return counted[1]

    def get_volume_mm3(self) -> float:
        """Lesion volume in mm^3 (voxel count times voxel volume)."""
        return self.n_voxels * self.grid.voxel_volume_mm3

    @property
    def subject_id(self) -> str | None:
        """Subject label without ``sub-``."""
        return self.metadata.get("subject_id")

    @property
    def session_id(self) -> str | None:
        """Session label without ``ses-``, if any."""
        return self.metadata.get("session_id")

    @property
    def label(self) -> str:
        """Mask label (the ``label-`` entity), ``"lesion"`` by default."""
        return self.metadata.get("label") or "lesion"

    def with_results(
        self, analysis_name: str, results: dict[str, Result], step: ProvenanceStep
    ) -> "SubjectData":
        """A copy of this subject with ``results`` added under ``analysis_name``."""
        new = copy.copy(self)
        new.metadata = dict(self.metadata)
        new.results = {name: dict(values) for name, values in self.results.items()}
        new.results.setdefault(analysis_name, {}).update(results)
        new.provenance = [*self.provenance, step]
        return new

    def __repr__(self) -> str:
        who = "_".join(
            f"{key}-{value}"
            for key, value in (
                ("sub", self.subject_id),
                ("ses", self.session_id),
                ("label", self.label),
            )
            if value
        )
        return (
            f"SubjectData({who or 'unnamed'}, space={self.declared_space}, "
            f"res={self.resolution:g}mm, voxels={self.n_voxels}, analyses={list(self.results)})"
        )


def _space_from_grid(path: Path, grid: Grid) -> str:
    """The space of a mask that declares none, when its grid is exactly a template grid
    of one supported space (logged); SpaceError otherwise."""
    found = space_of_standard_grid(grid)
    if found is None:
        raise SpaceError(
            f"{path}: no coordinate space declared, and its grid ({grid.describe()}) is not a "
            "template grid of one supported space; add a space- entity to the file name, a "
            "'SpatialReference' key to its JSON sidecar, or pass the space explicitly (--mask-space)"
        )
    space, resolution = found
    log.info("%s: no space declared; its grid is the %s %d mm template grid, so that space is used", path, space, resolution)
    return space


def load_step(subject: SubjectData, path: Path) -> ProvenanceStep:
    """The provenance step of a mask read from ``path``: its space, grid and volume."""
    notes = [f"mask grid: {subject.grid.describe()}; lesion volume {subject.get_volume_mm3():g} mm^3"]
    approximation = frame_approximation(subject.declared_space)
    if approximation:
        notes.append(approximation)
    step = ProvenanceStep(
        name="load",
        kind="input",
        parameters={
            "space": subject.space,
            "declared_space": subject.declared_space,
            "resolution": subject.resolution,
            "template_grid": subject.on_template_grid,
        },
        inputs=[InputFile.from_path("lesion_mask", path)],
        notes=notes,
    )
    return step.finish()


_warned_frames: set[str] = set()


def _warn_frame_approximation(space: str) -> None:
    """Warn once per process that a space is analysed in another one's coordinates."""
    approximation = frame_approximation(space)
    if approximation and space not in _warned_frames:
        _warned_frames.add(space)
        log.warning("%s; use --mask-transform for an exact registration", approximation)


def _warn_other_template_grid(grid: Grid, space: str, source: str) -> None:
    """A mask declared in one space but exactly on another space's template grid is
    analysed as declared; the mismatch is often a mislabelled space, so say so."""
    other = space_of_standard_grid(grid)
    if other is not None and canonical_space(other[0]) != canonical_space(space):
        log.warning(
            "%s: declared %s, but its grid is the %s %d mm template grid; it is analysed as %s "
            "(moved by its affine). Check the declared space if this is unexpected",
            source, space, other[0], other[1], space,
        )


def _check_spatial_transform(img: nib.Nifti1Image, path: Path) -> None:
    """A NIfTI file whose header gives no position (sform and qform codes 0) cannot be
    placed in a template space."""
    header = img.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        raise ValidationError(
            f"{path}: the header has no spatial transform (sform_code and qform_code are both 0), "
            "so its position in template space is unknown; re-save the mask with the affine of "
            "the image it was drawn on (e.g. with nibabel or fslcpgeom)"
        )


def _check_affine(grid: Grid, source: str) -> None:
    """Reject affines that are not finite, singular, or with implausible voxel sizes."""
    affine = grid.affine
    sizes = grid.voxel_sizes if np.isfinite(affine).all() else np.array([np.nan])
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6 or not (
        (sizes > 0.05).all() and (sizes < 20).all()
    ):
        raise ValidationError(
            f"{source}: the header's voxel-to-mm affine is degenerate "
            f"(rows {' '.join('(' + ', '.join(f'{v:.4g}' for v in row) + ')' for row in affine[:3])}); expected a finite, "
            "invertible affine with voxel sizes between 0.05 and 20 mm (e.g. diag(-1, 1, 1) "
            "for the 1 mm MNI152NLin6Asym grid). Fix the header with the tool that wrote the mask"
        )


def _check_field_of_view(data: np.ndarray, grid: Grid, space: str, source: str) -> None:
    """Reject a lesion with no voxel inside the template's field of view."""
    indices = np.argwhere(data)
    points = indices @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    low, high = template_field_of_view(space)
    inside = np.all((points >= low - 0.5) & (points <= high + 0.5), axis=1)
    if not inside.any():
        found = ", ".join(f"{axis} {a:g}..{b:g}" for axis, a, b in zip("xyz", points.min(axis=0), points.max(axis=0)))
        expected = ", ".join(f"{axis} {a:g}..{b:g}" for axis, a, b in zip("xyz", low, high))
        raise ValidationError(
            f"{source}: no lesion voxel lies inside the {space} field of view: the lesion spans "
            f"{found} mm, the template {expected} mm (grid {grid.describe()}). The mask is "
            "probably in scanner (native) space or its affine is wrong: normalise it to the "
            "template, or pass the registration with --mask-transform"
        )


def _load_image(path: Path) -> nib.Nifti1Image:
    """The image with its data read now, so that truncated or corrupt files fail here.
    A ``.nii.gz`` NIfTI-1 mask is decompressed in one piece
    (:func:`~lacuna.core.nifti_files.nifti1_in_one_piece`)."""
    try:
        img = nifti1_in_one_piece(path)
        in_memory = img is not None
        if not in_memory:
            img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ValidationError(
            f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc}); check that the "
            "file is a complete .nii/.nii.gz image and re-export it if not"
        ) from exc
    if in_memory:  # its data reads again from memory (a copy: cheaper than a new image)
        return img
    return nib.Nifti1Image(data, img.affine, img.header)


def _read_sidecar_checked(path: Path) -> dict:
    try:
        return read_sidecar(path)
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{path}: its JSON sidecar cannot be read ({exc}); fix or remove it") from exc


def _checked_mask_data(data: np.ndarray, source: str) -> np.ndarray:
    """Validate a mask array and return it as uint8 0/1; messages name ``source``."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValidationError(
            f"{source}: a lesion mask must be one 3-D volume, got shape {data.shape}; "
            "split 4-D files into one mask per volume"
        )
    if np.issubdtype(data.dtype, np.floating):
        n_nan = int(np.count_nonzero(~np.isfinite(data)))
        if n_nan:
            raise ValidationError(
                f"{source}: contains {n_nan} NaN/infinite voxels; a lesion mask must hold "
                "only 0 and 1 (replace NaN with 0)"
            )
    ones = data == 1
    if np.count_nonzero(data) != np.count_nonzero(ones):  # a value other than 0 and 1
        values = np.unique(data)
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise ValidationError(
            f"{source}: the mask is not binary (values {shown}); binarise it (e.g. "
            "threshold a probabilistic mask at 0.5) so that it holds only 0 and 1"
        )
    if not ones.any():
        raise ValidationError(f"{source}: the mask is empty (no voxel is 1); check the file")
    return ones.view(np.uint8)


def _metadata_from_entities(entities: dict[str, str], path: Path) -> dict:
    info = {
        "subject_id": entities.get("sub"),
        "session_id": entities.get("ses"),
        "label": mask_label(entities),
        "source_path": str(resolved_path(path)),
    }
    for key in ("acq", "run", "res"):
        if key in entities:
            info[key] = entities[key]
    if entities.get("label") and entities.get("desc"):
        info["desc"] = entities["desc"]  # e.g. ATLAS v2.0's label-L_desc-T1lesion: both kept
    return info
