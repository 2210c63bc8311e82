"""The parcellation registry: finding, fetching and reading parcellations by name.

A parcellation is named ``<atlas>_<desc>`` (e.g. ``Schaefer2018_100Parcels7Networks``)
or just ``<atlas>``; the two parts become the BIDS ``atlas-``/``seg-`` labels of output
files. :func:`get_parcellation` resolves a name, in order, from

1. parcellations the user registered (:func:`register_parcellation`), persisted in
   ``<data dir>/parcellations.json``;
2. an atlas folder (``atlas_dir``) of TemplateFlow-style files,
   ``tpl-<space>[_res-<NN>]_atlas-<atlas>[_desc-<desc>]_<dseg|probseg>.nii[.gz]`` with a
   labels file of the same stem ending ``.tsv`` or ``.txt``;
3. the catalogue of standard parcellations (:data:`CATALOGUE`), downloaded on first use
   into ``<data dir>/atlases/`` (from ``$LACUNA_ATLAS_URL`` when set: a base URL, a
   local folder or a ``file://`` URL).

Reading rules (:func:`read_parcellation`)
----------------------------------------
* The image header is the truth about the grid; ``res-`` in a file name is ignored.
* A 3-D image holds integer labels (float storage is accepted when every value is an
  integer); the data become ``int32``. Region ids come from the labels file; label
  values in the image that the file does not name are reported and left out, regions the
  file names but the image lacks are kept (they have no voxels).
* A 4-D image holds one probability map per region, in [0, 1] after the NIfTI scale
  factor. The data keep their stored type (``uint8`` stays ``uint8``); multiply by
  :attr:`ParcellationImage.scale` for probabilities. Region ids are volume numbers 1..N.
* Labels files (:func:`read_labels`) are one of: one name per line (ids 1..N); ``id
  name`` lines; a TSV with ``index`` and ``name`` columns (TemplateFlow ``_dseg.tsv``);
  a Connectome Workbench label table (a name line, then an ``id r g b a`` line, as
  published with the Tian atlases). Blank lines are ignored.
"""

from __future__ import annotations

import difflib
import gzip
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.core.entities import parse_entities, strip_extension
from lacuna.core.errors import DownloadError, ParcellationError, SpaceError
from lacuna.core.provenance import utc_now
from lacuna.core.spaces import EQUIVALENT_SPACES, SUPPORTED_SPACES, Grid, canonical_space
from lacuna.assets.registry import JsonRegistry, file_lock
from lacuna.core.datadir import data_search_dirs, get_data_dir
from lacuna.io.download import SMALL_FILE_BACKOFF, SMALL_FILE_RETRIES, download_file, redact_url

log = logging.getLogger(__name__)

#: Environment variable holding the base URL of an atlas mirror (flat folder of files;
#: a local folder or ``file://`` URL is copied from).
ATLAS_URL_ENV = "LACUNA_ATLAS_URL"

#: File, in the data directory, that holds the user's registered parcellations.
REGISTRY_FILENAME = "parcellations.json"

#: Sub-folder of the data directory that holds downloaded catalogue atlases.
ATLAS_CACHE_DIRNAME = "atlases"

_REGISTRY_VERSION = 1
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9]+(_[A-Za-z0-9]+)?$")
_IMAGE_SUFFIXES = ("dseg", "probseg")
_LABEL_EXTENSIONS = (".tsv", ".txt")
_ID_NAME_LINE = re.compile(r"^\s*(\d+)\s+(\S.*?)\s*$")
_WORKBENCH_KEY_LINE = re.compile(r"^\s*(\d+)(\s+\d+){3,4}\s*$")
_PROBABILITY_TOLERANCE = 1e-4
_MAX_LISTED = 10


# --------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ParcellationImage:
    """The voxel data and region table of a parcellation.

    Attributes
    ----------
    name : str
        Parcellation name.
    data : ndarray
        3-D ``int32`` labels, or 4-D maps (one volume per region) in their stored type.
        Read-only: loaded parcellations are cached and shared, so copy before changing.
    scale : float
        Factor turning 4-D ``data`` into probabilities in [0, 1] (1.0 for 3-D).
    affine : ndarray (4, 4)
        Voxel-to-mm affine from the image header.
    region_ids : list of int
        Label values (3-D) or volume numbers 1..N (4-D).
    region_names : list of str
        Region names, in the order of ``region_ids``.
    probabilistic : bool
        Whether ``data`` is 4-D probability maps.
    """

    name: str
    data: np.ndarray
    scale: float
    affine: np.ndarray
    region_ids: list[int]
    region_names: list[str]
    probabilistic: bool

    def __post_init__(self):
        self.data.flags.writeable = False

    @property
    def grid(self) -> Grid:
        """The voxel grid of the parcellation."""
        return Grid(tuple(int(n) for n in self.data.shape[:3]), np.asarray(self.affine, float))

    @property
    def n_regions(self) -> int:
        """Number of regions."""
        return len(self.region_ids)

    def probability_map(self, index: int) -> np.ndarray:
        """Probabilities (float32) of the region at position ``index`` (4-D only)."""
        if not self.probabilistic:
            raise ParcellationError(f"{self.name} is a label image, not probability maps")
        return np.asarray(self.data[..., index], dtype=np.float32) * np.float32(self.scale)


@dataclass(frozen=True)
class Parcellation:
    """A named parcellation on disk.

    Attributes
    ----------
    name : str
        ``<atlas>_<desc>`` or ``<atlas>``.
    image_path : Path
        NIfTI image (3-D labels or 4-D probabilities).
    labels_path : Path or None
        Labels file, or None (regions are then named ``region_<id>``).
    space : str
        Template space as declared (e.g. ``MNI152NLin2009aAsym``).
    citation : str
        Reference to cite when the parcellation is used.
    """

    name: str
    image_path: Path
    labels_path: Path | None
    space: str
    citation: str = ""
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "image_path", Path(self.image_path))
        if self.labels_path is not None:
            object.__setattr__(self, "labels_path", Path(self.labels_path))

    def __getstate__(self) -> dict:
        # Do not pickle loaded voxel data (parcellations travel to worker processes).
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def atlas(self) -> str:
        """The atlas part of the name (before the first ``_``)."""
        return self.name.split("_", 1)[0]

    @property
    def desc(self) -> str | None:
        """The description part of the name (after the first ``_``), or None."""
        parts = self.name.split("_", 1)
        return parts[1] if len(parts) > 1 else None

    def load(self) -> ParcellationImage:
        """Read image and labels; cached until either file changes on disk."""
        key = (_file_stamp(self.image_path), _file_stamp(self.labels_path))
        cached = self._cache.get("image")
        if cached is not None and cached[0] == key:
            return cached[1]
        image = read_parcellation(self.name, self.image_path, self.labels_path)
        self._cache["image"] = (key, image)
        return image


@dataclass(frozen=True)
class CatalogueEntry:
    """A standard parcellation Lacuna can download.

    ``image_file`` and ``labels_file`` are the names on a mirror (``$LACUNA_ATLAS_URL``)
    and in the cache; ``image_url`` and ``labels_url`` are the default public sources.
    Labels from ``labels_url`` are cached under ``image_file``'s stem plus the URL's
    extension (``.tsv`` or ``.txt``), so the reader applies the matching format.
    """

    name: str
    space: str
    image_file: str
    labels_file: str
    citation: str
    licence: str
    image_url: str
    labels_url: str

    @property
    def stem(self) -> str:
        """File name of the image without extension."""
        return strip_extension(self.image_file)


@dataclass(frozen=True)
class ParcellationInfo:
    """One line of :func:`list_parcellations`."""

    name: str
    space: str
    source: str  # "registered", "atlas-dir" or "catalogue"
    cached: bool  # available locally without a download
    citation: str = ""


# Parcellations handed out by this module, so that repeated look-ups of the same files
# share one instance and its loaded data (a BIDS App resolves the same name per subject).
_INTERNED: dict[Parcellation, Parcellation] = {}


def _intern(parcellation: Parcellation) -> Parcellation:
    return _INTERNED.setdefault(parcellation, parcellation)


def clear_parcellation_cache() -> None:
    """Forget parcellations loaded so far (frees their voxel data)."""
    _INTERNED.clear()


# --------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------

SCHAEFER_CITATION = (
    "Schaefer A, Kong R, Gordon EM, et al. Local-global parcellation of the human cerebral "
    "cortex from intrinsic functional connectivity MRI. Cereb Cortex. 2018;28(9):3095-3114."
)
TIAN_CITATION = (
    "Tian Y, Margulies DS, Breakspear M, Zalesky A. Topographic organization of the human "
    "subcortex unveiled with functional connectivity gradients. Nat Neurosci. "
    "2020;23(11):1421-1432."
)
YEH_CITATION = (
    "Yeh FC. Population-based tract-to-region connectome of the human brain and its "
    "hierarchical topology. Nat Commun. 2022;13:4933."
)

# Default public sources. The TemplateFlow addresses follow TemplateFlow's published
# layout (its S3 store). The Tian (yetianmed/subcortex) and HCP1065 (frankyeh/data-atlas)
# addresses are best knowledge and could NOT be verified from the offline machine this
# was written on; the HCP1065 one in particular is a guess at a release asset. Sites
# that need a fixed, verified source (or have no internet) should host the files, named
# as in ``image_file``/``labels_file``, in one folder and set $LACUNA_ATLAS_URL to it.
_TEMPLATEFLOW = "https://templateflow.s3.amazonaws.com"
_TIAN_REPO = "https://github.com/yetianmed/subcortex/raw/master/Group-Parcellation/3T"
_YEH_RELEASES = "https://github.com/frankyeh/data-atlas/releases/download"


def _schaefer_entry(parcels: int, networks: int) -> CatalogueEntry:
    desc = f"{parcels}Parcels{networks}Networks"
    tpl = "tpl-MNI152NLin6Asym"
    stem = f"{tpl}_res-01_atlas-Schaefer2018_desc-{desc}_dseg"
    return CatalogueEntry(
        name=f"Schaefer2018_{desc}",
        space="MNI152NLin6Asym",
        image_file=f"{stem}.nii.gz",
        labels_file=f"{stem}.txt",
        citation=SCHAEFER_CITATION,
        licence="MIT (CBIG, Yeo lab); distributed by TemplateFlow",
        image_url=f"{_TEMPLATEFLOW}/{tpl}/{stem}.nii.gz",
        labels_url=f"{_TEMPLATEFLOW}/{tpl}/{tpl}_atlas-Schaefer2018_desc-{desc}_dseg.tsv",
    )


def _tian_entry(scale: int) -> CatalogueEntry:
    stem = f"tpl-MNI152NLin6Asym_res-01_atlas-TianSubcortex_desc-3TS{scale}_dseg"
    folder = f"{_TIAN_REPO}/Subcortex-Only"
    return CatalogueEntry(
        name=f"TianSubcortex_3TS{scale}",
        space="MNI152NLin6Asym",
        image_file=f"{stem}.nii.gz",
        labels_file=f"{stem}.txt",
        citation=TIAN_CITATION,
        licence="see https://github.com/yetianmed/subcortex (not verified)",
        image_url=f"{folder}/Tian_Subcortex_S{scale}_3T_1mm.nii.gz",
        labels_url=f"{folder}/Tian_Subcortex_S{scale}_3T_label.txt",
    )


def _schaefer_tian_entry(scale: int, parcels: int, networks: int) -> CatalogueEntry:
    desc = f"{parcels}Parcels{networks}Networks"
    stem = f"tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018TianS{scale}_desc-{desc}_dseg"
    upstream = f"Schaefer2018_{parcels}Parcels_{networks}Networks_order_Tian_Subcortex_S{scale}"
    return CatalogueEntry(
        name=f"Schaefer2018TianS{scale}_{desc}",
        space="MNI152NLin6Asym",
        image_file=f"{stem}.nii.gz",
        labels_file=f"{stem}.txt",
        citation=f"{SCHAEFER_CITATION} {TIAN_CITATION}",
        licence="Schaefer: MIT; Tian: see https://github.com/yetianmed/subcortex (not verified)",
        image_url=(
            f"{_TIAN_REPO}/Cortex-Subcortex/MNIvolumetric/{upstream}_MNI152NLin6Asym_1mm.nii.gz"
        ),
        labels_url=f"{_TIAN_REPO}/Cortex-Subcortex/{upstream}_label.txt",
    )


def _hcp1065_entry() -> CatalogueEntry:
    stem = "tpl-MNI152NLin2009aAsym_res-01_atlas-HCP1065_desc-thr0p1_probseg"
    return CatalogueEntry(
        name="HCP1065_thr0p1",
        space="MNI152NLin2009aAsym",
        image_file=f"{stem}.nii.gz",
        labels_file=f"{stem}.txt",
        citation=YEH_CITATION,
        licence="CC BY-SA 4.0; derived from WU-Minn HCP data (acknowledge the HCP)",
        image_url=f"{_YEH_RELEASES}/hcp1065/{stem}.nii.gz",
        labels_url=f"{_YEH_RELEASES}/hcp1065/{stem}.txt",
    )


def _build_catalogue() -> dict[str, CatalogueEntry]:
    entries = [_schaefer_entry(p, n) for p in (100, 200, 400, 1000) for n in (7, 17)]
    entries += [_tian_entry(s) for s in (1, 2, 3)]
    entries += [_schaefer_tian_entry(s, 400, 17) for s in (1, 2, 3)]
    entries.append(_hcp1065_entry())
    return {entry.name: entry for entry in entries}


#: Standard parcellations, downloaded on first use.
CATALOGUE: dict[str, CatalogueEntry] = _build_catalogue()


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_labels(path: str | Path) -> tuple[list[int], list[str]]:
    """Region ids and names from a labels file (formats in the module docs).

    Raises
    ------
    ParcellationError
        If the file cannot be read, is empty, or has malformed or duplicate entries.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParcellationError(
            f"cannot read the labels file {path}: {exc}. Give a UTF-8 text file with one "
            "region name per line, 'id name' lines, or a TSV with index and name columns."
        ) from None
    lines = [(number, line.rstrip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line.strip()]
    if not lines:
        raise ParcellationError(
            f"the labels file {path} is empty; list one region name per line (in label "
            "order 1..N) or give 'id name' lines."
        )
    header = [cell.strip().lower() for cell in lines[0][1].split("\t")]
    if "index" in header and "name" in header:
        pairs = _parse_tsv(path, header, lines[1:])
    elif _is_workbench_table(lines):
        pairs = [
            (int(lines[i + 1][1].split()[0]), lines[i][1].strip())
            for i in range(0, len(lines), 2)
        ]
    elif all(_ID_NAME_LINE.match(line) for _, line in lines):
        pairs = [_id_name(line) for _, line in lines]
    else:
        pairs = [(i, line.strip()) for i, (_, line) in enumerate(lines, 1)]
    return _checked_pairs(path, pairs)


def _parse_tsv(path: Path, header: list[str], rows: list[tuple[int, str]]) -> list:
    index_col, name_col = header.index("index"), header.index("name")
    pairs = []
    for number, line in rows:
        cells = line.split("\t")
        try:
            pairs.append((int(cells[index_col].strip()), cells[name_col].strip()))
        except (IndexError, ValueError):
            raise ParcellationError(
                f"{path}, line {number}: expected an integer 'index' and a 'name' column "
                f"separated by tabs, got {line!r}. Fix the line or remove it."
            ) from None
    return pairs


def _is_workbench_table(lines: list[tuple[int, str]]) -> bool:
    """Whether lines alternate ``name`` and ``id r g b [a]`` (Workbench label table)."""
    if len(lines) % 2:
        return False
    names, keys = lines[0::2], lines[1::2]
    return all(_WORKBENCH_KEY_LINE.match(line) for _, line in keys) and not any(
        _WORKBENCH_KEY_LINE.match(line) for _, line in names
    )


def _id_name(line: str) -> tuple[int, str]:
    match = _ID_NAME_LINE.match(line)
    return int(match.group(1)), match.group(2)


def _checked_pairs(path: Path, pairs: list[tuple[int, str]]) -> tuple[list[int], list[str]]:
    """Drop the background (id 0), reject duplicates and empty tables, sort by id."""
    if any(region_id == 0 for region_id, _ in pairs):
        log.debug("%s: ignoring label 0 (background)", path)
        pairs = [(region_id, name) for region_id, name in pairs if region_id != 0]
    counts = Counter(region_id for region_id, _ in pairs)
    duplicates = sorted(region_id for region_id, n in counts.items() if n > 1)
    if duplicates:
        raise ParcellationError(
            f"the labels file {path} lists region ids {_short_list(duplicates)} more than "
            "once; give every region exactly one line."
        )
    if not pairs:
        raise ParcellationError(f"the labels file {path} names no region (only background).")
    names = [name for _, name in pairs]
    if len(set(names)) < len(names):
        log.warning("%s: some region names occur more than once", path)
    pairs.sort()
    return [region_id for region_id, _ in pairs], [name for _, name in pairs]


def read_parcellation(
    name: str, image_path: str | Path, labels_path: str | Path | None = None
) -> ParcellationImage:
    """Read a parcellation image and its labels (rules in the module docs).

    Raises
    ------
    ParcellationError
        If the image cannot be read, has the wrong dimensionality or values, or does not
        agree with its labels file.
    """
    image_path = Path(image_path)
    img = _open_image(image_path)
    if img.ndim == 3:
        return _read_labelled(name, img, image_path, labels_path)
    if img.ndim == 4:
        return _read_probabilistic(name, img, image_path, labels_path)
    raise ParcellationError(
        f"{image_path} has {img.ndim} dimensions; a parcellation must be a 3-D label image "
        "or a 4-D image with one probability map per region."
    )


def _open_image(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise ParcellationError(f"parcellation image {path} does not exist; check the path.")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise ParcellationError(
            f"cannot read parcellation image {path}: {exc}. Check that it is a NIfTI file "
            "(.nii or .nii.gz); re-download or re-create it."
        ) from None
    if not hasattr(img, "dataobj") or len(img.shape) < 3:
        raise ParcellationError(f"{path} is not a 3-D or 4-D NIfTI image.")
    return img


def _read_array(img, path: Path, unscaled: bool = False) -> np.ndarray:
    proxy = img.dataobj
    try:
        if unscaled and hasattr(proxy, "get_unscaled"):
            return np.asanyarray(proxy.get_unscaled())
        return np.asanyarray(proxy)
    except Exception as exc:
        raise ParcellationError(
            f"cannot read the voxel data of {path}: {exc}. The file is probably truncated "
            "or corrupt; re-download or re-create it."
        ) from None


def _read_labelled(name, img, image_path: Path, labels_path) -> ParcellationImage:
    raw = _read_array(img, image_path)
    data = _integer_labels(raw, image_path)
    present = _present_labels(data)
    if labels_path is None:
        ids = present
        names = [f"region_{i}" for i in ids]
    else:
        ids, names = read_labels(labels_path)
        _report_label_mismatch(image_path, labels_path, present, ids)
    return ParcellationImage(
        name=name,
        data=data,
        scale=1.0,
        affine=np.asarray(img.affine, float),
        region_ids=ids,
        region_names=names,
        probabilistic=False,
    )


def _integer_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    """3-D label data as int32, or ParcellationError when not integer-valued."""
    if raw.dtype.kind == "f":
        finite = np.isfinite(raw)
        if not finite.all():
            raise ParcellationError(
                f"{path} contains NaN or infinite values; a label image must hold integer "
                "labels (0 = background). Replace them with 0."
            )
        if not np.array_equal(raw, np.round(raw)):
            raise ParcellationError(
                f"{path} is a 3-D image with non-integer values, so it is not a label image. "
                "Round it to integer labels, or store probability maps as a 4-D image "
                "(one volume per region)."
            )
    elif raw.dtype.kind not in "iub":
        raise ParcellationError(f"{path} has unsupported data type {raw.dtype}.")
    if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.int32).max):
        raise ParcellationError(
            f"{path} has negative or too large label values; labels must be 0 (background) "
            "or positive integers."
        )
    return np.asarray(raw, dtype=np.int32)


def _present_labels(data: np.ndarray) -> list[int]:
    """Non-zero label values present in the image, ascending."""
    top = int(data.max()) if data.size else 0
    if top < (1 << 24):
        counts = np.bincount(data.ravel(), minlength=top + 1)
        values = np.flatnonzero(counts)
    else:
        values = np.unique(data)
    return [int(v) for v in values if v != 0]


def _report_label_mismatch(image_path, labels_path, present: list[int], ids: list[int]):
    missing = sorted(set(present) - set(ids))
    if missing:
        log.warning(
            "%s: label values %s occur in the image but not in %s; those voxels are ignored. "
            "Add the regions to the labels file if they matter.",
            image_path,
            _short_list(missing),
            labels_path,
        )
    absent = sorted(set(ids) - set(present))
    if absent:
        log.info(
            "%s: regions %s of %s have no voxels in the image",
            image_path,
            _short_list(absent),
            labels_path,
        )


def _read_probabilistic(name, img, image_path: Path, labels_path) -> ParcellationImage:
    proxy = img.dataobj
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    if inter != 0.0:
        # Rare: an intercept cannot be kept as a plain factor; store scaled float32.
        data, scale = np.asarray(img.get_fdata(dtype=np.float32)), 1.0
    else:
        data, scale = _read_array(img, image_path, unscaled=True), slope
    _check_probabilities(data, scale, slope, image_path)
    n_volumes = int(data.shape[3])
    if labels_path is None:
        ids = list(range(1, n_volumes + 1))
        names = [f"region_{i}" for i in ids]
    else:
        ids, names = read_labels(labels_path)
        if len(ids) != n_volumes:
            raise ParcellationError(
                f"{labels_path} names {len(ids)} regions but the 4-D image {image_path} has "
                f"{n_volumes} volumes; give exactly one name per volume, in volume order."
            )
        if ids != list(range(1, n_volumes + 1)):
            raise ParcellationError(
                f"{labels_path}: region ids of a 4-D parcellation are volume numbers 1.."
                f"{n_volumes}; renumber the labels file (or list one name per line)."
            )
    return ParcellationImage(
        name=name,
        data=data,
        scale=scale,
        affine=np.asarray(img.affine, float),
        region_ids=ids,
        region_names=names,
        probabilistic=True,
    )


def _check_probabilities(data: np.ndarray, scale: float, slope: float, path: Path) -> None:
    """Values of a 4-D parcellation must be probabilities in [0, 1] after scaling."""
    if data.size == 0 or data.shape[3] == 0:
        raise ParcellationError(f"{path} is a 4-D image without volumes.")
    low, high = data.min(), data.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ParcellationError(
            f"{path} contains NaN or infinite values; probability maps must lie in [0, 1]."
        )
    if data.dtype.kind in "iub" and high > 1 and slope == 1.0:
        raise ParcellationError(
            f"{path} stores probabilities as integers up to {high} without a NIfTI scale "
            "factor, so they cannot be read as values in [0, 1]. Set the header's scl_slope "
            f"(e.g. 1/{high} if {high} means certainty) or save the maps as floats in [0, 1]."
        )
    if low * scale < -_PROBABILITY_TOLERANCE or high * scale > 1 + _PROBABILITY_TOLERANCE:
        raise ParcellationError(
            f"{path} has values from {low * scale:g} to {high * scale:g}; probability maps "
            "must lie in [0, 1]. Rescale the maps, or give a 3-D label image instead."
        )


def _short_list(values: list) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    extra = len(values) - _MAX_LISTED
    return f"{shown} (and {extra} more)" if extra > 0 else shown


def _file_stamp(path: Path | None) -> tuple | None:
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return (str(path), None)
    return (str(path), stat.st_size, stat.st_mtime_ns)


# --------------------------------------------------------------------------------------
# Atlas folders (TemplateFlow-style names)
# --------------------------------------------------------------------------------------


def scan_atlas_dir(path: str | Path) -> dict[str, Parcellation]:
    """Parcellations in a folder of TemplateFlow-style files, by name.

    Files ``tpl-<space>[_res-<NN>]_atlas-<atlas>[_desc-<desc>]_<dseg|probseg>.nii[.gz]``
    become parcellation ``<atlas>_<desc>`` (or ``<atlas>``) in space ``<space>``; their
    labels file has the same stem (with or without the ``res-`` entity) and ends ``.tsv``
    or ``.txt``. When two files give the same name, the first in sorted order is used.

    Raises
    ------
    ParcellationError
        If ``path`` is not a directory.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ParcellationError(
            f"atlas folder {folder} does not exist or is not a directory; check the path."
        )
    found: dict[str, Parcellation] = {}
    for image in sorted(folder.iterdir()):
        parcellation = _atlas_file_parcellation(image)
        if parcellation is None:
            continue
        if parcellation.name in found:
            log.warning(
                "%s: parcellation %s is already given by %s; ignoring this file",
                image,
                parcellation.name,
                found[parcellation.name].image_path.name,
            )
            continue
        found[parcellation.name] = parcellation
    return found


def _atlas_file_parcellation(image: Path) -> Parcellation | None:
    """The parcellation a TemplateFlow-style file name describes, or None."""
    if not image.name.startswith("tpl-") or not image.name.endswith((".nii", ".nii.gz")):
        return None
    entities = parse_entities(image.name)
    if entities.get("suffix") not in _IMAGE_SUFFIXES or "atlas" not in entities:
        return None
    name = entities["atlas"] + (f"_{entities['desc']}" if "desc" in entities else "")
    if not _NAME_PATTERN.match(name):
        log.warning("%s: atlas/desc labels must be alphanumeric; ignoring this file", image)
        return None
    return _intern(
        Parcellation(
            name=name,
            image_path=image.resolve(),
            labels_path=_find_labels(image),
            space=entities["tpl"],
        )
    )


def _find_labels(image: Path) -> Path | None:
    stem = strip_extension(image.name)
    stems = [stem, re.sub(r"_res-[A-Za-z0-9]+", "", stem)]
    for candidate_stem in dict.fromkeys(stems):
        for ext in _LABEL_EXTENSIONS:
            candidate = image.with_name(candidate_stem + ext)
            if candidate.is_file():
                return candidate.resolve()
    return None


# --------------------------------------------------------------------------------------
# Catalogue downloads
# --------------------------------------------------------------------------------------


def atlas_cache_dir() -> Path:
    """Folder downloaded catalogue atlases are kept in."""
    return get_data_dir() / ATLAS_CACHE_DIRNAME


def _cached_catalogue(entry: CatalogueEntry) -> Parcellation | None:
    """A catalogue parcellation already in the data directory or on ``LACUNA_DATA_PATH``."""
    for data_dir in data_search_dirs():
        folder = data_dir / ATLAS_CACHE_DIRNAME
        image = folder / entry.image_file
        if not image.is_file():
            continue
        for ext in _LABEL_EXTENSIONS:
            labels = folder / (entry.stem + ext)
            if labels.is_file():
                return _intern(Parcellation(entry.name, image, labels, entry.space, entry.citation))
    return None


def fetch_parcellation(entry: CatalogueEntry) -> Parcellation:
    """The catalogue parcellation ``entry``, downloaded into the cache if needed.

    Files come from ``$LACUNA_ATLAS_URL/<file name>`` when that variable is set, else from
    the entry's public URLs. The image must read as a valid parcellation with its labels
    before it is accepted; a failed download leaves nothing in the cache.

    Raises
    ------
    ParcellationError
        If the download fails or the files are not a valid parcellation.
    """
    cached = _cached_catalogue(entry)
    if cached is not None:
        return cached
    folder = atlas_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(get_data_dir() / ".atlas-download.lock"):
        cached = _cached_catalogue(entry)  # another process may have fetched it meanwhile
        if cached is not None:
            return cached
        image_url, labels_url, labels_file = _sources(entry)
        image_tmp = folder / f".tmp-{entry.image_file}"
        labels_tmp = folder / f".tmp-{labels_file}"
        try:
            log.info("downloading %s from %s", entry.name, redact_url(image_url))
            _download(entry, image_url, image_tmp)
            _ensure_gzip(image_tmp)
            _download(entry, labels_url, labels_tmp)
            _validate_download(entry, image_tmp, labels_tmp, image_url)
            os.replace(labels_tmp, folder / labels_file)
            os.replace(image_tmp, folder / entry.image_file)
        finally:
            for leftover in (image_tmp, labels_tmp):
                leftover.unlink(missing_ok=True)
                leftover.with_name(leftover.name + ".part").unlink(missing_ok=True)
    return _intern(
        Parcellation(
            entry.name, folder / entry.image_file, folder / labels_file, entry.space, entry.citation
        )
    )


def _sources(entry: CatalogueEntry) -> tuple[str, str, str]:
    """(image URL, labels URL, labels file name in the cache)."""
    base = os.environ.get(ATLAS_URL_ENV, "").strip()
    if base:
        base = base.rstrip("/")
        return f"{base}/{entry.image_file}", f"{base}/{entry.labels_file}", entry.labels_file
    ext = ".tsv" if entry.labels_url.split("?", 1)[0].endswith(".tsv") else ".txt"
    return entry.image_url, entry.labels_url, entry.stem + ext


def _download(entry: CatalogueEntry, url: str, dest: Path) -> None:
    try:
        download_file(url, dest, retries=SMALL_FILE_RETRIES, backoff=SMALL_FILE_BACKOFF)
    except DownloadError as exc:
        raise ParcellationError(
            f"could not download parcellation {entry.name}: {exc} To use a mirror, set "
            f"{ATLAS_URL_ENV} to a base URL holding {entry.image_file} and "
            f"{entry.labels_file}; or register local files with register_parcellation()."
        ) from None


def _ensure_gzip(path: Path) -> None:
    """Compress a downloaded plain ``.nii`` that is to be stored as ``.nii.gz``."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic == b"\x1f\x8b":
        return
    packed = path.with_name(path.name + ".gz-tmp")
    with open(path, "rb") as source, gzip.open(packed, "wb") as target:
        shutil.copyfileobj(source, target)
    os.replace(packed, path)


def _validate_download(entry: CatalogueEntry, image: Path, labels: Path, url: str) -> None:
    try:
        read_parcellation(entry.name, image, labels)
    except ParcellationError as exc:
        raise ParcellationError(
            f"the file downloaded for parcellation {entry.name} from {redact_url(url)} is not "
            f"a valid parcellation ({exc}); it was deleted. The source may be damaged or "
            f"have moved: try again later, or set {ATLAS_URL_ENV} to a mirror."
        ) from None


# --------------------------------------------------------------------------------------
# User registry
# --------------------------------------------------------------------------------------


_REGISTRY = JsonRegistry(REGISTRY_FILENAME, "parcellations", ParcellationError, version=_REGISTRY_VERSION)


def registry_path() -> Path:
    """The JSON file holding registered parcellations."""
    return _REGISTRY.path


def registered_parcellations() -> dict[str, Parcellation]:
    """Parcellations registered by the user, by name (read from disk on every call)."""
    path = registry_path()
    entries = _REGISTRY.read()
    return {name: _from_entry(path, name, entry) for name, entry in sorted(entries.items())}


def _from_entry(path: Path, name: str, entry: dict) -> Parcellation:
    try:
        labels = entry.get("labels_path")
        return _intern(
            Parcellation(
                name=name,
                image_path=JsonRegistry.resolve_path(entry["image_path"]),
                labels_path=JsonRegistry.resolve_path(labels) if labels else None,
                space=entry["space"],
                citation=entry.get("citation", ""),
            )
        )
    except (AttributeError, KeyError, TypeError):
        raise ParcellationError(
            f"the parcellation registry {path} has a malformed entry {name!r}; remove it "
            f"with unregister_parcellation({name!r}) or repair the JSON, then register again."
        ) from None


def validate_name(name: str) -> str:
    """Check a parcellation name: ``<atlas>`` or ``<atlas>_<desc>``, alphanumeric parts.

    Raises
    ------
    ValueError
        If the name cannot become BIDS ``atlas-``/``seg-`` labels.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid parcellation name {name!r}: use letters and digits, optionally one '_' "
            "separating atlas and description (e.g. 'MyAtlas' or 'MyAtlas_200Regions'), "
            "because the parts become BIDS atlas-/seg- labels."
        )
    return name


def register_parcellation(
    name: str,
    image_path: str | Path,
    labels_path: str | Path | None = None,
    space: str | None = None,
    citation: str = "",
    overwrite: bool = False,
) -> Parcellation:
    """Register a parcellation from local files under ``name``, persistently.

    Parameters
    ----------
    name : str
        ``<atlas>`` or ``<atlas>_<desc>``; letters and digits only in each part.
    image_path : str or Path
        3-D label image or 4-D probability image.
    labels_path : str or Path, optional
        Labels file; regions are named ``region_<id>`` without one.
    space : str, optional
        Template space of the image (a supported space or an equivalent one). Taken from
        a ``tpl-``/``space-`` entity of the image file name when omitted.
    citation : str
        Reference to cite.
    overwrite : bool
        Replace an existing registration, or shadow a catalogue parcellation, of the
        same name.

    Returns
    -------
    Parcellation
        The registered parcellation (with absolute paths).

    Raises
    ------
    ValueError
        If the name is invalid or the space is missing.
    SpaceError
        If the space is not supported.
    ParcellationError
        If the files are not a valid parcellation, or the name is taken.
    """
    validate_name(name)
    image_path = Path(image_path).expanduser().resolve()
    labels_path = Path(labels_path).expanduser().resolve() if labels_path else None
    space = space or _space_from_file_name(image_path)
    canonical_space(space)
    if labels_path is not None and not labels_path.is_file():
        raise ParcellationError(f"labels file {labels_path} does not exist; check the path.")
    parcellation = Parcellation(name, image_path, labels_path, space, citation)
    parcellation.load()  # validates image and labels
    with _REGISTRY.editing() as entries:
        if not overwrite:
            _refuse_shadowing(name, entries)
        entries[name] = {
            "image_path": JsonRegistry.store_path(image_path),
            "labels_path": JsonRegistry.store_path(labels_path) if labels_path else None,
            "space": space,
            "citation": citation,
            "registered": utc_now(),
        }
    log.info("registered parcellation %s (%s)", name, image_path)
    return parcellation


def _space_from_file_name(image_path: Path) -> str:
    entities = parse_entities(image_path.name)
    space = entities.get("tpl") or entities.get("space")
    if not space:
        options = ", ".join((*SUPPORTED_SPACES, *EQUIVALENT_SPACES))
        raise ValueError(
            f"the space of {image_path} is unknown: pass space= (one of {options}) or name "
            "the file with a tpl-<space> entity."
        )
    return space


def _refuse_shadowing(name: str, entries: dict[str, dict]) -> None:
    if name in entries:
        raise ParcellationError(
            f"a parcellation named {name} is already registered "
            f"({entries[name].get('image_path')}); pass overwrite=True to replace it, or "
            "choose another name."
        )
    if name in CATALOGUE:
        raise ParcellationError(
            f"{name} is a standard parcellation of the catalogue; registering your own "
            "files under that name would replace it everywhere. Choose another name, or "
            "pass overwrite=True if that is what you want."
        )


def unregister_parcellation(name: str) -> None:
    """Remove a registered parcellation (its files are left alone).

    Raises
    ------
    ParcellationError
        If no parcellation of that name is registered.
    """
    with _REGISTRY.editing() as entries:
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise ParcellationError(
                f"no parcellation named {name!r} is registered (registered: {known})."
            )
        del entries[name]
    log.info("unregistered parcellation %s", name)


# --------------------------------------------------------------------------------------
# Resolution by name
# --------------------------------------------------------------------------------------


def get_parcellation(name: str, atlas_dir: str | Path | None = None) -> Parcellation:
    """The parcellation called ``name``: registered, in ``atlas_dir``, or catalogue.

    Catalogue parcellations are downloaded on first use (see :func:`fetch_parcellation`).

    Raises
    ------
    ParcellationError
        If no source has the name (the message lists the available ones), its files are
        missing, or the download fails.
    SpaceError
        If an atlas-folder file declares an unsupported space.
    """
    registered = registered_parcellations()
    if name in registered:
        return _checked_registered(registered[name])
    in_dir = scan_atlas_dir(atlas_dir) if atlas_dir is not None else {}
    if name in in_dir:
        return _checked_space(in_dir[name])
    if name in CATALOGUE:
        return fetch_parcellation(CATALOGUE[name])
    available = sorted(set(registered) | set(in_dir) | set(CATALOGUE))
    close = difflib.get_close_matches(name, available, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ParcellationError(
        f"unknown parcellation {name!r}.{hint} Available: {', '.join(available)}. To use "
        "your own, register it with lacuna.assets.register_parcellation(name, image, "
        "labels, space=...) or put TemplateFlow-style files "
        "(tpl-<space>_atlas-<atlas>_desc-<desc>_dseg.nii.gz plus a .tsv/.txt labels file) "
        "in an atlas folder."
    )


def _checked_registered(parcellation: Parcellation) -> Parcellation:
    for path in (parcellation.image_path, parcellation.labels_path):
        if path is not None and not path.is_file():
            raise ParcellationError(
                f"registered parcellation {parcellation.name} points to {path}, which no "
                "longer exists. Restore the file, register it again with overwrite=True, "
                f"or remove it with unregister_parcellation({parcellation.name!r})."
            )
    return parcellation


def _checked_space(parcellation: Parcellation) -> Parcellation:
    try:
        canonical_space(parcellation.space)
    except SpaceError as exc:
        raise SpaceError(
            f"{parcellation.image_path}: {exc}. Use a file in a supported space, or correct "
            "its tpl-<space> entity if it is wrong."
        ) from None
    return parcellation


def list_parcellations(atlas_dir: str | Path | None = None) -> list[ParcellationInfo]:
    """Every parcellation :func:`get_parcellation` can resolve, one per name.

    Registered ones come first, then those of ``atlas_dir``, then the catalogue; a name
    given by an earlier source hides the later ones, as in :func:`get_parcellation`.
    """
    infos: dict[str, ParcellationInfo] = {}
    for parcellation in registered_parcellations().values():
        infos[parcellation.name] = ParcellationInfo(
            parcellation.name, parcellation.space, "registered", True, parcellation.citation
        )
    if atlas_dir is not None:
        for parcellation in scan_atlas_dir(atlas_dir).values():
            infos.setdefault(
                parcellation.name,
                ParcellationInfo(parcellation.name, parcellation.space, "atlas-dir", True),
            )
    for entry in CATALOGUE.values():
        cached = _cached_catalogue(entry) is not None
        infos.setdefault(
            entry.name,
            ParcellationInfo(entry.name, entry.space, "catalogue", cached, entry.citation),
        )
    return list(infos.values())
