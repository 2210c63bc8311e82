"""Parcellations: finding, fetching and reading them by name.

A parcellation is named ``<atlas>_<desc>`` (e.g. ``Schaefer2018_100Parcels7Networks``)
or just ``<atlas>``; the two parts become the BIDS ``atlas-``/``seg-`` labels of output
files. :func:`get_parcellation` resolves a name, in order, from

1. parcellations the user registered (:func:`register_parcellation`), persisted in
   ``<data dir>/parcellations.json`` (:mod:`.registrations`);
2. an atlas folder (``atlas_dir``) of TemplateFlow-style files,
   ``tpl-<space>[_res-<NN>]_atlas-<atlas>[_desc-<desc>]_<dseg|probseg>.nii[.gz]`` with a
   labels file of the same stem ending ``.tsv`` or ``.txt`` (:mod:`.folders`);
3. the catalogue of standard parcellations (:data:`CATALOGUE`, :mod:`.catalogue`),
   downloaded on first use into ``<data dir>/atlases/`` (:mod:`.downloads`).

Images and labels are read by :mod:`.images` and :mod:`.labels`.
"""

from lacuna.resources.parcellations.catalogue import (
    CATALOGUE,
    SCHAEFER_CITATION,
    TIAN_CITATION,
    YEH_CITATION,
    CatalogueEntry,
)
from lacuna.resources.parcellations.downloads import atlas_cache_dir, fetch_parcellation
from lacuna.resources.parcellations.folders import scan_atlas_dir
from lacuna.resources.parcellations.images import ParcellationImage, read_parcellation
from lacuna.resources.parcellations.labels import read_labels
from lacuna.resources.parcellations.lookup import get_parcellation, list_parcellations
from lacuna.resources.parcellations.parcellation import (
    Parcellation,
    ParcellationInfo,
    clear_parcellation_cache,
    validate_name,
)
from lacuna.resources.parcellations.registrations import (
    register_parcellation,
    registered_parcellations,
    registry_path,
    unregister_parcellation,
)

__all__ = [
    "CATALOGUE",
    "SCHAEFER_CITATION",
    "TIAN_CITATION",
    "YEH_CITATION",
    "CatalogueEntry",
    "Parcellation",
    "ParcellationImage",
    "ParcellationInfo",
    "atlas_cache_dir",
    "clear_parcellation_cache",
    "fetch_parcellation",
    "get_parcellation",
    "list_parcellations",
    "read_labels",
    "read_parcellation",
    "register_parcellation",
    "registered_parcellations",
    "registry_path",
    "scan_atlas_dir",
    "unregister_parcellation",
    "validate_name",
]
