"""Catalogue parcellations downloaded on first use into ``<data dir>/atlases/``.

Files come from ``$LACUNA_ATLAS_URL/<file name>`` when that variable is set (a base URL,
a local folder or a ``file://`` URL), else from each entry's public URLs.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path

from lacuna.core import settings
from lacuna.core.datadir import data_search_dirs, get_data_dir
from lacuna.core.errors import DownloadError, ParcellationError
from lacuna.core.locks import file_lock
from lacuna.resources.parcellations.catalogue import CatalogueEntry
from lacuna.resources.parcellations.folders import LABEL_EXTENSIONS
from lacuna.resources.parcellations.images import read_parcellation
from lacuna.resources.parcellations.parcellation import Parcellation, intern

log = logging.getLogger(__name__)

#: Environment variable holding the base URL of an atlas mirror (flat folder of files;
#: a local folder or ``file://`` URL is copied from).
ATLAS_URL_ENV = settings.ATLAS_URL

#: Sub-folder of the data directory that holds downloaded catalogue atlases.
ATLAS_CACHE_DIRNAME = "atlases"


def atlas_cache_dir() -> Path:
    """Folder downloaded catalogue atlases are kept in."""
    return get_data_dir() / ATLAS_CACHE_DIRNAME


def cached_catalogue(entry: CatalogueEntry) -> Parcellation | None:
    """A catalogue parcellation already in the data directory or on ``LACUNA_DATA_PATH``."""
    for data_dir in data_search_dirs():
        folder = data_dir / ATLAS_CACHE_DIRNAME
        image = folder / entry.image_file
        if not image.is_file():
            continue
        for ext in LABEL_EXTENSIONS:
            labels = folder / (entry.stem + ext)
            if labels.is_file():
                return intern(Parcellation(entry.name, image, labels, entry.space, entry.citation))
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
    cached = cached_catalogue(entry)
    if cached is not None:
        return cached
    # The HTTP stack (requests, 60 ms to import) loads only when something is downloaded.
    from lacuna.net.http import redact_url

    folder = atlas_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(get_data_dir() / ".atlas-download.lock"):
        cached = cached_catalogue(entry)  # another process may have fetched it meanwhile
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
    return intern(
        Parcellation(
            entry.name, folder / entry.image_file, folder / labels_file, entry.space, entry.citation
        )
    )


def _sources(entry: CatalogueEntry) -> tuple[str, str, str]:
    """(image URL, labels URL, labels file name in the cache)."""
    base = settings.atlas_url()
    if base:
        return f"{base}/{entry.image_file}", f"{base}/{entry.labels_file}", entry.labels_file
    ext = ".tsv" if entry.labels_url.split("?", 1)[0].endswith(".tsv") else ".txt"
    return entry.image_url, entry.labels_url, entry.stem + ext


def _download(entry: CatalogueEntry, url: str, dest: Path) -> None:
    from lacuna.net.download import SMALL_FILE_BACKOFF, SMALL_FILE_RETRIES, download_file

    try:
        download_file(url, dest, retries=SMALL_FILE_RETRIES, backoff=SMALL_FILE_BACKOFF)
    except DownloadError as exc:
        raise ParcellationError(
            f"could not download parcellation {entry.name}: {exc} To use a mirror, set "
            f"{ATLAS_URL_ENV} to a base URL holding {entry.image_file} and "
            f"{entry.labels_file}; or register local files with register_parcellation()."
        ) from exc


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
    from lacuna.net.http import redact_url

    try:
        read_parcellation(entry.name, image, labels)
    except ParcellationError as exc:
        raise ParcellationError(
            f"the file downloaded for parcellation {entry.name} from {redact_url(url)} is not "
            f"a valid parcellation ({exc}); it was deleted. The source may be damaged or "
            f"have moved: try again later, or set {ATLAS_URL_ENV} to a mirror."
        ) from exc
