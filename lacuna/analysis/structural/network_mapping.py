"""StructuralNetworkMapping: structural lesion network mapping (disconnection mapping).

Which streamlines of a normative whole-brain tractogram pass through the lesion, and
what that disconnects. The tractogram is indexed once per analysis grid (see
:mod:`lacuna.io.tractogram_index`); each lesion then costs a look-up of the streamlines
crossing its voxels and a count over their voxels, about a second for millions of
streamlines, instead of re-reading the whole tractogram (``tckedit`` + ``tckmap``).

Definitions (default ``mode="mrtrix"``, the semantics of MRtrix3 3.0)
--------------------------------------------------------------------
* The lesion is placed on the analysis grid: the standard grid of the tractogram's space
  at ``resolution`` mm (half-coverage rule; through the TemplateFlow transform when the
  mask is in the other MNI space). A lesion covering no grid voxel by half is an error
  for that lesion alone.
* A streamline is *disconnected* when one of its stored vertices lies in a lesion voxel
  (nearest voxel): ``tckedit -include lesion.nii``.
* ``count`` map: per voxel, the disconnected streamlines passing through it, each counted
  once per voxel, after ``tckmap``'s upsampling: ``tckmap -template grid`` of the
  ``tckedit`` output.
* ``disconnection`` map: count divided by the number of all streamlines through the voxel
  (``tckmap`` of the whole tractogram); 0 where no streamline passes.
* ``percent_disconnected``: 100 x disconnected / all streamlines of the tractogram.
* Parcel matrices: each endpoint is assigned to the parcel of the nearest labelled voxel
  centre within ``endpoint_radius`` mm, on the parcellation's own grid
  (``tck2connectome``'s default ``-assignment_radial_search 4``); ``endpoint_radius=0``
  takes the label of the endpoint's own voxel (``-assignment_end_voxels``). Streamlines
  with both ends assigned are counted between their two parcels (symmetric matrix;
  the diagonal holds streamlines with both ends in one parcel, counted once). A parcel's
  own streamlines are those with at least one end assigned to it (the other end may be
  unassigned). When the parcellation is in the other MNI space, the endpoints are
  moved into it with the TemplateFlow transform. Probabilistic (4-D) atlases have no
  endpoint labels and are skipped (noted in provenance).

``mode="traversal"`` replaces both voxel rules by exact segment traversal (the voxels
each straight segment between vertices passes through): nothing is missed between
distant vertices, but results differ from MRtrix3's.

Outputs (per lesion)
--------------------
VoxelMaps ``disconnection`` (``probseg``, [0, 1]) and ``count`` (``statmap``,
streamlines); scalars ``n_streamlines_total``, ``n_streamlines_cut``,
``percent_disconnected``, ``lesion_voxels_used``; per parcellation a ParcelData table
``snm<Connectome>`` (``streamlines_total``, ``streamlines_cut``, ``fraction_cut``; n/a for
a parcel without streamlines) and ConnectivityMatrix ``<Connectome>streamlines`` (all),
``<Connectome>streamlinescut`` (through the lesion) and ``<Connectome>fractioncut``
(cut / all; 0 where no streamline joins the two parcels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lacuna.analysis.base import BatchAnalysis, mask_on_grid, record_move, voxel_maps_to_subject
from lacuna.core.entities import alphanumeric
from lacuna.resources.connectomes import STRUCTURAL, ConnectomeError, get_registered_connectome, list_connectomes, resolve_connectome
from lacuna.resources.parcellations import Parcellation, ParcellationImage, get_parcellation
from lacuna.resources.parcellations.labels import read_labels
from lacuna.core.errors import AnalysisError
from lacuna.core.memory import default_memory_budget
from lacuna.core.provenance import InputFile, ProvenanceStep
from lacuna.core.results import ConnectivityMatrix, ParcelData, Result, ScalarMetric, VoxelMap
from lacuna.core.spaces import HALF_COVERAGE, canonical_space, standard_grid
from lacuna.core.subject import SubjectData
from lacuna.formats.streamline_voxels import mrtrix_round
from lacuna.formats.tractogram_index import MODES, TractogramIndex

log = logging.getLogger(__name__)

#: tck2connectome's default radial search distance (mm).
DEFAULT_ENDPOINT_RADIUS = 4.0
_SEARCH_BATCH = 4096


@dataclass
class _Assignment:
    """Endpoint parcels of every streamline for one parcellation."""

    image: ParcellationImage
    pairs: np.ndarray  # (n_streamlines, 2) int32 region positions, -1 unassigned
    total_matrix: np.ndarray  # (R, R) int64
    total_per_parcel: np.ndarray  # (R,) int64


class StructuralNetworkMapping(BatchAnalysis):
    """Structural lesion network mapping against a normative tractogram.

    Parameters
    ----------
    connectome : str or Path
        Registered structural connectome name (``lacuna connectomes register``), or a
        ``.tck``/``.trk`` path. Or give the path as ``tractogram_path``.
    parcellations : sequence of str or Parcellation
        Parcellations for parcel x parcel matrices and per-parcel tables (default none).
    space : str, optional
        Space of the tractogram. Needed for a path that is neither registered nor has a
        JSON sidecar (``<stem>.json``) with ``SpatialReference``; must agree with the
        registration otherwise.
    resolution : {2, 1}
        Voxel size (mm) of the analysis grid (the space's standard grid).
    mode : {"mrtrix", "traversal"}
        Voxel rules (module docs); ``"mrtrix"`` agrees with MRtrix3.
    upsample : int, optional
        Upsampling ratio of the count maps (``tckmap -upsample``); default tckmap's
        automatic one from the tractogram header's step size.
    endpoint_radius : float
        Radial search distance (mm) assigning endpoints to parcels; 0 for the endpoint's
        own voxel only.
    atlas_dir : str or Path, optional
        Folder of TemplateFlow-style atlas files searched before the catalogue.
    memory_budget_gb : float, optional
        Memory for the results held per pass; default half the available memory.
    return_in_input_space : bool
        Bring the maps back onto the lesion's own space and grid (trilinear); otherwise
        they stay on the analysis grid.
    tractogram_path : str or Path, optional
        The tractogram file, instead of ``connectome`` (the seed documentation's
        spelling).
    """

    def __init__(
        self,
        connectome: str | Path | None = None,
        parcellations: Sequence[str | Parcellation] = (),
        space: str | None = None,
        resolution: float = 2,
        mode: str = "mrtrix",
        upsample: int | None = None,
        endpoint_radius: float = DEFAULT_ENDPOINT_RADIUS,
        atlas_dir: str | Path | None = None,
        memory_budget_gb: float | None = None,
        return_in_input_space: bool = True,
        tractogram_path: str | Path | None = None,
    ):
        if (connectome is None) == (tractogram_path is None):
            raise TypeError("give the tractogram as connectome= (a name or path) or tractogram_path=, once")
        connectome = connectome if connectome is not None else tractogram_path
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if upsample is not None and int(upsample) < 1:
            raise ValueError("upsample must be at least 1")
        if endpoint_radius < 0:
            raise ValueError("endpoint_radius must be 0 or more (mm)")
        self.connectome_name, self.tractogram, self.space = _resolve_tractogram(connectome, space)
        self.resolution = float(resolution)
        self.grid = standard_grid(self.space, self.resolution)
        self.mode = mode
        self.upsample = None if upsample is None else int(upsample)
        self.endpoint_radius = float(endpoint_radius)
        if isinstance(parcellations, (str, Parcellation)):
            parcellations = [parcellations]
        self.atlas_dir = Path(atlas_dir) if atlas_dir else None
        self.parcellations = [
            p if isinstance(p, Parcellation) else get_parcellation(p, atlas_dir=self.atlas_dir) for p in parcellations
        ]
        self.memory_budget = int(memory_budget_gb * 1024**3) if memory_budget_gb else default_memory_budget()
        self.return_in_input_space = return_in_input_space
        self._index: TractogramIndex | None = None
        self._assignments: dict[str, _Assignment | str] = {}
        self._inputs: list[InputFile] | None = None
        self.last_query_seconds: list[float] = []

    @property
    def connectome_label(self) -> str:
        """Connectome name as a BIDS label (letters and digits)."""
        return alphanumeric(self.connectome_name) or "connectome"

    @property
    def index(self) -> TractogramIndex:
        """The tractogram index on the analysis grid (built on first use)."""
        if self._index is None:
            self._index = TractogramIndex.open(self.tractogram, self.grid, self.mode, self.upsample)
        return self._index

    def parameters(self) -> dict:
        return {
            "connectome": self.connectome_name,
            "connectome_space": self.space,
            "resolution": self.resolution,
            "mode": self.mode,
            "upsample": self.upsample,
            "endpoint_radius_mm": self.endpoint_radius,
            "parcellations": [p.name for p in self.parcellations],
            "return_in_input_space": self.return_in_input_space,
        }

    def input_files(self) -> list[InputFile]:
        if self._inputs is None:
            files = [InputFile.from_path(f"connectome:{self.connectome_name}", self.tractogram)]
            for parcellation in self.parcellations:
                files.append(InputFile.from_path(f"parcellation:{parcellation.name}", parcellation.image_path))
                if parcellation.labels_path:
                    files.append(InputFile.from_path(f"labels:{parcellation.name}", parcellation.labels_path))
            self._inputs = files
        return list(self._inputs)

    def lesions_per_pass(self, extra_bytes: int = 0) -> int:
        """Lesions whose results fit the memory budget together (each lesion is mapped
        on its own; this only bounds what is held until export)."""
        n_voxels = int(np.prod(self.grid.shape))
        per_lesion = 2 * 4 * n_voxels + extra_bytes
        for parcellation in self.parcellations:
            per_lesion += 3 * 8 * _n_regions(parcellation) ** 2
        return max(1, self.memory_budget // per_lesion)

    def iter_batch(self, subjects: list[SubjectData], finish=None) -> Iterator[tuple[int, object]]:
        """Yield ``(index, subject with results)`` (or ``finish`` of it) or ``(index,
        error)`` per lesion, in order; all lesions share the tractogram index (built on
        first use)."""
        index = self.index
        new_step = self.step_factory()
        for number, subject in enumerate(subjects):
            try:
                mapped = self._map(subject, index, new_step())
                yield number, mapped if finish is None else finish(mapped)
            except Exception as exc:  # reported per lesion
                yield number, exc

    # -- one lesion --------------------------------------------------------------------

    def _map(self, subject: SubjectData, index: TractogramIndex, step: ProvenanceStep) -> SubjectData:
        coverage = mask_on_grid(subject, self.grid, self.space, step)
        lesion = np.asarray(coverage) >= HALF_COVERAGE
        voxels = np.flatnonzero(lesion.ravel())
        if voxels.size == 0:
            raise AnalysisError(
                f"{_who(subject)}: the lesion covers no voxel of the {self.resolution:g} mm analysis grid "
                "by half or more (it is smaller than one voxel)"
            )
        start = time.perf_counter()
        cut = index.streamlines_through(voxels)
        count = index.count_map(cut)
        self.last_query_seconds.append(time.perf_counter() - start)
        results = self._voxel_results(index, cut, count, int(voxels.size))
        for parcellation in self.parcellations:
            assignment = self._assignment(parcellation, index, step)
            if isinstance(assignment, str):
                if assignment not in step.notes:
                    step.notes.append(assignment)
                continue
            results.update(self._parcel_results(assignment, cut))
        step.notes.append(
            f"{cut.size} of {index.n_streamlines} streamlines pass through the {voxels.size} lesion voxels "
            f"(mode {index.mode}, count maps upsampled x{index.upsample_ratio})"
        )
        if self.return_in_input_space:
            results = voxel_maps_to_subject(results, subject, step)
        return subject.with_results(self.name, results, step.finish())

    def _voxel_results(self, index: TractogramIndex, cut: np.ndarray, count: np.ndarray, n_lesion: int) -> dict[str, Result]:
        label = self.connectome_label
        total = index.total_count
        fraction = np.zeros(total.shape, dtype=np.float32)
        np.divide(count, total, out=fraction, where=total > 0)
        metadata = {
            "Connectome": self.connectome_name,
            "StreamlineRule": index.mode,
            "UpsampleRatio": index.upsample_ratio,
            "NumberOfStreamlines": index.n_streamlines,
        }
        common = {"affine": self.grid.affine, "space": self.space, "resolution": self.resolution, "metadata": metadata}
        name = self.connectome_name
        results: dict[str, Result] = {
            f"{name}_disconnection": VoxelMap(
                name="disconnection",
                data=fraction.reshape(self.grid.shape),
                description="Fraction of the streamlines through each voxel that also pass through the lesion "
                "(0 where no streamline passes)",
                suffix="probseg",
                desc=f"snm{label}disconnection",
                **common,
            ),
            f"{name}_count": VoxelMap(
                name="count",
                data=count.reshape(self.grid.shape).astype(np.float32),
                description="Streamlines through each voxel that also pass through the lesion",
                units="streamlines",
                desc=f"snm{label}count",
                **common,
            ),
        }
        n_total = index.n_streamlines
        scalars = {
            "n_streamlines_total": (n_total, "streamlines", "Streamlines in the tractogram"),
            "n_streamlines_cut": (int(cut.size), "streamlines", "Streamlines passing through the lesion"),
            "percent_disconnected": (100.0 * cut.size / n_total, "%", "Percentage of all streamlines passing through the lesion"),
            "lesion_voxels_used": (n_lesion, "voxels", f"Lesion voxels on the {self.resolution:g} mm analysis grid"),
        }
        for key, (value, units, description) in scalars.items():
            results[f"{name}_{key}"] = ScalarMetric(key, value, units, description)
        return results

    def _parcel_results(self, assignment: _Assignment, cut: np.ndarray) -> dict[str, Result]:
        image = assignment.image
        n_regions = image.n_regions
        cut_pairs = assignment.pairs[cut]
        cut_matrix = _pair_matrix(cut_pairs, n_regions)
        cut_per_parcel = _per_parcel(cut_pairs, n_regions)
        fraction = np.zeros(cut_matrix.shape, dtype=np.float64)
        np.divide(cut_matrix, assignment.total_matrix, out=fraction, where=assignment.total_matrix > 0)
        parcel_fraction = np.full(n_regions, np.nan)
        np.divide(cut_per_parcel, assignment.total_per_parcel, out=parcel_fraction, where=assignment.total_per_parcel > 0)
        label, name = self.connectome_label, self.connectome_name
        table = f"snm{label}"
        columns = {
            "streamlines_total": (
                assignment.total_per_parcel.astype(np.float64),
                "streamlines",
                "Streamlines with at least one endpoint assigned to the parcel",
            ),
            "streamlines_cut": (cut_per_parcel.astype(np.float64), "streamlines", "Of those, streamlines passing through the lesion"),
            "fraction_cut": (parcel_fraction, "", "Fraction of the parcel's streamlines passing through the lesion; n/a for a parcel without streamlines"),
        }
        results: dict[str, Result] = {}
        for measure, (values, units, description) in columns.items():
            results[f"{name}_{measure}_{image.name}"] = ParcelData(
                parcellation=image.name,
                measure=measure,
                region_ids=list(image.region_ids),
                region_names=list(image.region_names),
                values=values,
                description=f"{description} ({name} tractogram)",
                units=units,
                table=table,
            )
        matrices = {
            "streamlines": (assignment.total_matrix, "streamlines", f"Streamlines of {name} joining the row parcel"),
            "streamlinescut": (cut_matrix, "streamlines", f"Streamlines of {name} passing through the lesion joining the row parcel"),
            "fractioncut": (fraction, "", f"Fraction of the streamlines of {name} passing through the lesion (0 where none) joining the row parcel"),
        }
        for measure, (matrix, units, description) in matrices.items():
            results[f"{name}_matrix_{measure}_{image.name}"] = ConnectivityMatrix(
                parcellation=image.name,
                measure=f"{label}{measure}",
                region_names=list(image.region_names),
                matrix=matrix,
                description=description,
                units=units,
            )
        return results

    # -- endpoint assignment -----------------------------------------------------------

    def _assignment(self, parcellation: Parcellation, index: TractogramIndex, step: ProvenanceStep) -> _Assignment | str:
        """Endpoint parcels for ``parcellation`` (cached in memory and beside the index),
        or a note explaining why the parcellation is skipped."""
        if parcellation.name in self._assignments:
            cached = self._assignments[parcellation.name]
            if not isinstance(cached, str):
                self._note_move(parcellation, step)
            return cached
        image = parcellation.load()
        if image.probabilistic:
            note = (
                f"{image.name} is a probabilistic (4-D) atlas; streamline endpoints need a label image, "
                "so no parcel matrices were computed for it"
            )
            log.warning(note)
            self._assignments[parcellation.name] = note
            return note
        target_space = canonical_space(parcellation.space)
        transform = self._note_move(parcellation, step)
        name = "parcels-" + _assignment_key(parcellation, self.endpoint_radius, transform)

        def compute() -> np.ndarray:
            points = np.asarray(index.endpoints, dtype=np.float64).reshape(-1, 3)
            if target_space != self.space:
                points = _move_points(points, transform)
            labels = _region_positions(image)
            return assign_endpoints(points, labels, image.affine, self.endpoint_radius).reshape(-1, 2)

        pairs = index.cached(name, compute)
        assignment = _Assignment(image, pairs, _pair_matrix(pairs, image.n_regions), _per_parcel(pairs, image.n_regions))
        self._assignments[parcellation.name] = assignment
        return assignment

    def _note_move(self, parcellation: Parcellation, step: ProvenanceStep) -> Path | None:
        """Record (and return) the transform moving endpoints into the parcellation's space."""
        target_space = canonical_space(parcellation.space)
        if target_space == self.space:
            return None
        from lacuna.resources.templates import transform_path

        # tpl-<tractogram space>_from-<atlas space> maps tractogram points to atlas points.
        path = transform_path(target_space, self.space)
        note = f"endpoints moved from {self.space} to {target_space} for {parcellation.name} with {path.name}"
        record_move(step, [note], target_space, self.space)
        return path


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _resolve_tractogram(connectome: str | Path, space: str | None) -> tuple[str, Path, str]:
    """Name, path and space of a registered or given tractogram (space never guessed)."""
    try:
        name, path = resolve_connectome(connectome, STRUCTURAL)
    except FileNotFoundError as exc:
        raise ConnectomeError(str(exc)) from exc
    declared, source = None, ""
    registered = [c for c in list_connectomes(STRUCTURAL) if c.name == str(connectome) or c.path == path]
    if registered:
        entry = get_registered_connectome(registered[0].name)
        name, declared, source = entry.name, entry.space, f"its registration as {entry.name}"
    else:
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            try:
                declared = json.loads(sidecar.read_text(encoding="utf-8")).get("SpatialReference")
            except (OSError, ValueError) as exc:
                raise ConnectomeError(f"{sidecar}: unreadable JSON sidecar ({exc})") from exc
            source = f"its sidecar {sidecar.name}"
    if not path.is_file():
        raise ConnectomeError(f"the tractogram of {name} does not exist: {path} (is the data directory mounted?)")
    if path.suffix not in (".tck", ".trk"):
        raise ValueError(f"{path}: a structural connectome must be a .tck or .trk tractogram")
    if declared and space and canonical_space(declared) != canonical_space(space):
        raise ConnectomeError(f"{path} is declared in {declared} by {source}, not in {space}")
    chosen = space or declared
    if not chosen:
        raise ConnectomeError(
            f"the space of {path} is unknown: register it (`lacuna connectomes register NAME {path} --space "
            "SPACE`), write a sidecar JSON with \"SpatialReference\" beside it, or pass space= (Python API)"
        )
    return name, path, canonical_space(chosen)


def _who(subject: SubjectData) -> str:
    return subject.metadata.get("source_path") or repr(subject)


def _n_regions(parcellation: Parcellation) -> int:
    """Regions of ``parcellation``: its labels file's entries (the image is read, on
    the read-ahead thread, only when there is none)."""
    if parcellation.labels_path is not None:
        return len(read_labels(parcellation.labels_path)[0])
    return parcellation.load().n_regions


def _assignment_key(parcellation: Parcellation, radius: float, transform: Path | None) -> str:
    def stamp(path):
        if path is None:
            return None
        stat = Path(path).stat()
        return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]

    record = [stamp(parcellation.image_path), stamp(parcellation.labels_path), radius, stamp(transform), 1]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]


def _move_points(points: np.ndarray, transform: Path) -> np.ndarray:
    """Points (RAS mm) of the tractogram's space mapped into the atlas space."""
    from lacuna.resources.templates import load_transform

    finite = np.isfinite(points).all(axis=1)
    moved = np.full(points.shape, np.nan)
    if finite.any():
        moved[finite] = np.asarray(load_transform(transform).map(points[finite]), dtype=np.float64)
    return moved


def _region_positions(image: ParcellationImage) -> np.ndarray:
    """Label image as region positions 0..R-1 (int32), -1 for unlabelled voxels and for
    label values the region table does not name."""
    ids = np.asarray(image.region_ids, dtype=np.int64)
    top = int(max(int(image.data.max(initial=0)), int(ids.max(initial=0))))
    lookup = np.full(top + 1, -1, dtype=np.int32)
    lookup[ids] = np.arange(ids.size, dtype=np.int32)
    data = np.asarray(image.data)
    return np.where(data > 0, lookup[np.clip(data, 0, top)], -1).astype(np.int32)


def assign_endpoints(points: np.ndarray, labels: np.ndarray, affine: np.ndarray, radius: float) -> np.ndarray:
    """Region position (or -1) of each point, the rule of ``tck2connectome``.

    ``radius > 0``: the region of the labelled voxel whose centre is nearest to the point,
    if closer than ``radius`` mm (``-assignment_radial_search``; ties go to the first voxel
    in order of offset distance). ``radius == 0``: the label of the point's own voxel
    (``-assignment_end_voxels``).

    Parameters
    ----------
    points : ndarray (n, 3)
        RAS mm; NaN rows get -1.
    labels : ndarray, 3-D int
        Region positions, -1 where unlabelled.
    affine : ndarray (4, 4)
        Voxel-to-mm affine of ``labels``.
    radius : float
        Search distance in mm.
    """
    points = np.asarray(points, dtype=np.float64)
    shape = np.array(labels.shape)
    out = np.full(points.shape[0], -1, dtype=np.int32)
    finite = np.isfinite(points).all(axis=1)
    inverse = np.linalg.inv(affine)
    coords = np.zeros_like(points)
    coords[finite] = points[finite] @ inverse[:3, :3].T + inverse[:3, 3]
    centre = mrtrix_round(coords)
    inside = finite & np.all((centre >= 0) & (centre < shape), axis=1)
    own = np.full(points.shape[0], -1, dtype=np.int32)
    own[inside] = labels[tuple(centre[inside].T)]
    if radius <= 0:
        return own
    voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    own_centre_mm = centre @ affine[:3, :3].T + affine[:3, 3]
    own_close = np.linalg.norm(points - own_centre_mm, axis=1) < radius
    resolved = (own >= 0) & own_close
    out[resolved] = own[resolved]
    # Only endpoints with a labelled voxel possibly within reach need the search.
    half_diagonal = 0.5 * float(np.linalg.norm(voxel_sizes))
    reach = radius + half_diagonal
    from scipy import ndimage  # only when no cached assignment exists: a fifth of a second to import

    distance = ndimage.distance_transform_edt(labels < 0, sampling=voxel_sizes)
    todo = finite & ~resolved
    near = np.zeros(points.shape[0], dtype=bool)
    near[inside] = distance[tuple(centre[inside].T)] <= reach
    near |= todo & ~inside  # outside the grid: search anyway
    todo &= near
    offsets = _search_offsets(voxel_sizes, reach)
    for chunk in np.array_split(np.flatnonzero(todo), max(1, int(np.ceil(todo.sum() / _SEARCH_BATCH)))):
        if chunk.size == 0:
            continue
        candidates = centre[chunk, None, :] + offsets[None, :, :]  # (B, K, 3)
        ok = np.all((candidates >= 0) & (candidates < shape), axis=2)
        found = np.full(ok.shape, -1, dtype=np.int32)
        found[ok] = labels[tuple(candidates[ok].T)]
        centres_mm = candidates @ affine[:3, :3].T + affine[:3, 3]
        dist = np.linalg.norm(points[chunk, None, :] - centres_mm, axis=2)
        dist[(found < 0) | (dist >= radius)] = np.inf
        best = np.argmin(dist, axis=1)
        rows = np.arange(chunk.size)
        hit = np.isfinite(dist[rows, best])
        out[chunk[hit]] = found[rows[hit], best[hit]]
    return out


def _search_offsets(voxel_sizes: np.ndarray, reach: float) -> np.ndarray:
    """Voxel offsets closer than ``reach`` mm, by increasing distance (MRtrix3's order:
    z outermost, x innermost, for equal distances)."""
    n = int(np.ceil(reach / voxel_sizes.min()))
    z, y, x = np.meshgrid(*(np.arange(-n, n + 1),) * 3, indexing="ij")
    offsets = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    dist = np.linalg.norm(offsets * voxel_sizes, axis=1)
    keep = dist < reach
    order = np.argsort(dist[keep], kind="stable")
    return offsets[keep][order]


def _pair_matrix(pairs: np.ndarray, n_regions: int) -> np.ndarray:
    """Symmetric (R, R) streamline counts of assigned endpoint pairs (int64)."""
    pairs = np.asarray(pairs)
    valid = (pairs >= 0).all(axis=1)
    low = np.minimum(pairs[valid, 0], pairs[valid, 1]).astype(np.int64)
    high = np.maximum(pairs[valid, 0], pairs[valid, 1]).astype(np.int64)
    upper = np.bincount(low * n_regions + high, minlength=n_regions * n_regions).reshape(n_regions, n_regions)
    return upper + upper.T - np.diag(np.diag(upper))


def _per_parcel(pairs: np.ndarray, n_regions: int) -> np.ndarray:
    """Streamlines with at least one endpoint in each parcel (int64)."""
    pairs = np.asarray(pairs)
    first, second = pairs[:, 0], pairs[:, 1]
    counts = np.bincount(first[first >= 0], minlength=n_regions) + np.bincount(second[second >= 0], minlength=n_regions)
    both = (first >= 0) & (first == second)
    return (counts - np.bincount(first[both], minlength=n_regions)).astype(np.int64)
