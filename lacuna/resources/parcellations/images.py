"""Reading a parcellation image with its labels (:func:`read_parcellation`).

* The image header is the truth about the grid; ``res-`` in a file name is ignored.
* A 3-D image holds integer labels (float storage is accepted when every value is an
  integer); the data become ``int32``. Region ids come from the labels file; label
  values in the image that the file does not name are reported and left out, regions the
  file names but the image lacks are kept (they have no voxels).
* A 4-D image holds one probability map per region, in [0, 1] after the NIfTI scale
  factor. The data keep their stored type (``uint8`` stays ``uint8``); multiply by
  :attr:`ParcellationImage.scale` for probabilities. Region ids are volume numbers 1..N.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.core.derived_arrays import digest, mapped_arrays
from lacuna.core.nifti_files import nifti1_in_one_piece
from lacuna.core.errors import ParcellationError
from lacuna.core.spaces import Grid
from lacuna.resources.parcellations.labels import read_labels, short_list

log = logging.getLogger(__name__)

_PROBABILITY_TOLERANCE = 1e-4

#: Version of the label arrays kept in the data cache (raise it when their meaning changes).
_LABELS_FORMAT = 1


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
    voxel_counts : ndarray or None
        Voxels of each region, in the order of ``region_ids`` (3-D images read from a
        file; None when not counted).
    data_key : str or None
        Digest of what ``data`` was read from (the file's bytes), which identifies the
        data in caches without hashing it; None when not known.
    """

    name: str
    data: np.ndarray
    scale: float
    affine: np.ndarray
    region_ids: list[int]
    region_names: list[str]
    probabilistic: bool
    voxel_counts: np.ndarray | None = None
    data_key: str | None = None

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
    img = _open_image(image_path, nib.load)  # the header: a label image's data may be cached
    if img.ndim == 3:
        return _read_labelled(name, img, image_path, labels_path)
    if img.ndim == 4:
        return _read_probabilistic(name, _open_image(image_path, _load_nifti), image_path, labels_path)
    raise ParcellationError(
        f"{image_path} has {img.ndim} dimensions; a parcellation must be a 3-D label image "
        "or a 4-D image with one probability map per region."
    )


def _open_image(path: Path, load) -> nib.Nifti1Image:
    if not path.is_file():
        raise ParcellationError(f"parcellation image {path} does not exist; check the path.")
    try:
        img = load(path)
    except ParcellationError:
        raise
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise ParcellationError(
            f"cannot read parcellation image {path}: {exc}. Check that it is a NIfTI file "
            "(.nii or .nii.gz); re-download or re-create it."
        ) from exc
    if not hasattr(img, "dataobj") or len(img.shape) < 3:
        raise ParcellationError(f"{path} is not a 3-D or 4-D NIfTI image.")
    return img


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """``nib.load(path)``, but a ``.nii.gz`` NIfTI-1 atlas is decompressed in one piece
    (:func:`~lacuna.core.nifti_files.nifti1_in_one_piece`, on the way to the first
    mask)."""
    try:
        img = nifti1_in_one_piece(path)
    except Exception as exc:  # zlib and ISA-L raise their own error types
        raise _unreadable_data(path, exc) from exc
    return img if img is not None else nib.load(path)


def _read_array(img, path: Path, unscaled: bool = False) -> np.ndarray:
    proxy = img.dataobj
    try:
        if unscaled and hasattr(proxy, "get_unscaled"):
            return np.asanyarray(proxy.get_unscaled())
        return np.asanyarray(proxy)
    except Exception as exc:
        raise _unreadable_data(path, exc) from exc


def _unreadable_data(path: Path, exc: Exception) -> ParcellationError:
    return ParcellationError(
        f"cannot read the voxel data of {path}: {exc}. The file is probably truncated "
        "or corrupt; re-download or re-create it."
    )


def _read_labelled(name, img, image_path: Path, labels_path) -> ParcellationImage:
    key, voxels = _label_voxels(image_path)
    present = [int(v) for v in voxels["present"]]
    if labels_path is None:
        ids = present
        names = [f"region_{i}" for i in ids]
    else:
        ids, names = read_labels(labels_path)
        _report_label_mismatch(image_path, labels_path, present, ids)
    counts = dict(zip(present, voxels["counts"].tolist()))
    return ParcellationImage(
        name=name,
        data=voxels["labels"],
        scale=1.0,
        affine=np.asarray(img.affine, float),
        region_ids=ids,
        region_names=names,
        probabilistic=False,
        voxel_counts=np.array([counts.get(i, 0) for i in ids], dtype=np.float64),
        data_key=key,
    )


def _label_voxels(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The digest of a 3-D label image's file, and its ``labels`` (int32), the non-zero
    labels ``present`` and their voxel ``counts``, kept in the data cache by the file's
    bytes (:func:`~lacuna.core.derived_arrays.mapped_arrays`): decoding and checking a
    1 mm atlas takes about 0.15 s, reading it back 1 ms."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise _unreadable_data(path, exc) from exc
    key = digest(_LABELS_FORMAT, content)
    return key, mapped_arrays("atlas-labels", key, lambda: _derive_label_voxels(path))


def _derive_label_voxels(path: Path) -> dict[str, np.ndarray]:
    data = _integer_labels(_read_array(_open_image(path, _load_nifti), path), path)
    present, counts = _label_counts(data)
    return {"labels": data, "present": present, "counts": counts}


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


def _label_counts(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero label values present in the image, ascending, and their voxel counts."""
    top = int(data.max()) if data.size else 0
    if top < (1 << 24):
        counts = np.bincount(data.ravel(order="K"), minlength=top + 1)  # no copy of the volume
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(data, return_counts=True)
    nonzero = values != 0
    return values[nonzero].astype(np.int64), counts[nonzero].astype(np.int64)


def _report_label_mismatch(image_path, labels_path, present: list[int], ids: list[int]):
    missing = sorted(set(present) - set(ids))
    if missing:
        log.warning(
            "%s: label values %s occur in the image but not in %s; those voxels are ignored. "
            "Add the regions to the labels file if they matter.",
            image_path,
            short_list(missing),
            labels_path,
        )
    absent = sorted(set(ids) - set(present))
    if absent:
        log.info(
            "%s: regions %s of %s have no voxels in the image",
            image_path,
            short_list(absent),
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
