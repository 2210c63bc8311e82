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

from lacuna.core.nifti_files import nifti1_in_one_piece
from lacuna.core.errors import ParcellationError
from lacuna.core.spaces import Grid
from lacuna.resources.parcellations.labels import read_labels, short_list

log = logging.getLogger(__name__)

_PROBABILITY_TOLERANCE = 1e-4


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
        img = _load_nifti(path)
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
        counts = np.bincount(data.ravel(order="K"), minlength=top + 1)  # no copy of the volume
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
