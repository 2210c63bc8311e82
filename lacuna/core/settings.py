"""Lacuna's environment variables, read in this one module.

Every function reads the environment when it is called (never at import time), so a
variable set by a test or a wrapper script takes effect at once. An argument, where a
function of Lacuna has one, wins over the variable.

=========================  ==========================================================
``LACUNA_DATA_DIR``        data cache (registry, connectomes, atlases, transforms)
``LACUNA_DATA_PATH``       read-only data folders searched after the cache
``XDG_CACHE_HOME``         parent of the default data cache
``DATAVERSE_API_KEY``      Harvard Dataverse API token (GSP1000)
``FIGSHARE_API_KEY``       Figshare personal token (dTOR985)
``LACUNA_DATAVERSE_URL``   Dataverse server
``LACUNA_FIGSHARE_API_URL``  Figshare API base
``LACUNA_HCP1065_URL``     URL of the HCP1065 tract zip
``LACUNA_ATLAS_URL``       base URL (or folder) of parcellation files
``LACUNA_TEMPLATEFLOW_URL``  base URL (or folder) of a TemplateFlow store
``TEMPLATEFLOW_HOME``      TemplateFlow's own cache, used in place
``LACUNA_NUM_THREADS``     threads of the per-block work (default: usable CPUs)
``LACUNA_CONTAINER_TYPE``  container Lacuna runs in (set by its Dockerfile and
                           Singularity.def), with ``LACUNA_CONTAINER_TAG``; else
                           Apptainer/Singularity's ``APPTAINER_CONTAINER`` /
                           ``SINGULARITY_CONTAINER``
=========================  ==========================================================
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = "LACUNA_DATA_DIR"
DATA_PATH = "LACUNA_DATA_PATH"
XDG_CACHE_HOME = "XDG_CACHE_HOME"
DATAVERSE_URL = "LACUNA_DATAVERSE_URL"
FIGSHARE_API_URL = "LACUNA_FIGSHARE_API_URL"
HCP1065_URL = "LACUNA_HCP1065_URL"
ATLAS_URL = "LACUNA_ATLAS_URL"
TEMPLATEFLOW_URL = "LACUNA_TEMPLATEFLOW_URL"
TEMPLATEFLOW_HOME = "TEMPLATEFLOW_HOME"
NUM_THREADS = "LACUNA_NUM_THREADS"
CONTAINER_TYPE = "LACUNA_CONTAINER_TYPE"
CONTAINER_TAG = "LACUNA_CONTAINER_TAG"

#: Environment variable of each service's API key.
API_KEY_VARIABLES = {"dataverse": "DATAVERSE_API_KEY", "figshare": "FIGSHARE_API_KEY"}

DEFAULT_DATAVERSE_URL = "https://dataverse.harvard.edu"
DEFAULT_FIGSHARE_API_URL = "https://api.figshare.com/v2"
#: Public release asset of the HCP1065 tract atlas (best knowledge, not verified from
#: here; GitHub redirects renamed repositories).
DEFAULT_HCP1065_URL = "https://github.com/frankyeh/data-atlas/releases/download/hcp1065/hcp1065_avg_tracts_trk.zip"
DEFAULT_TEMPLATEFLOW_URL = "https://templateflow.s3.amazonaws.com"


def _value(variable: str) -> str | None:
    """The variable's value; None when unset or empty."""
    return os.environ.get(variable) or None


def data_dir_override() -> Path | None:
    """``$LACUNA_DATA_DIR`` as a path, or None."""
    value = _value(DATA_DIR)
    return Path(value) if value else None


def xdg_cache_home() -> Path | None:
    """``$XDG_CACHE_HOME`` as a path, or None."""
    value = _value(XDG_CACHE_HOME)
    return Path(value) if value else None


def data_path() -> list[Path]:
    """The folders of ``$LACUNA_DATA_PATH`` (``os.pathsep``-separated), in order."""
    return [Path(p).expanduser() for p in os.environ.get(DATA_PATH, "").split(os.pathsep) if p.strip()]


def api_key(service: str) -> str | None:
    """The raw key of ``service`` (``"dataverse"``, ``"figshare"``) from the environment."""
    return os.environ.get(API_KEY_VARIABLES[service])


def dataverse_url() -> str:
    """The Dataverse server, without a trailing slash."""
    return (_value(DATAVERSE_URL) or DEFAULT_DATAVERSE_URL).rstrip("/")


def figshare_api_url() -> str:
    """The Figshare API base, without a trailing slash."""
    return (_value(FIGSHARE_API_URL) or DEFAULT_FIGSHARE_API_URL).rstrip("/")


def hcp1065_url() -> str:
    """The URL of the HCP1065 tract zip."""
    return (_value(HCP1065_URL) or DEFAULT_HCP1065_URL).rstrip("/")


def atlas_url() -> str | None:
    """The base of an atlas mirror without a trailing slash, or None (public sources)."""
    value = os.environ.get(ATLAS_URL, "").strip()
    return value.rstrip("/") if value else None


def templateflow_url() -> str:
    """The base of the TemplateFlow store, without a trailing slash."""
    return (_value(TEMPLATEFLOW_URL) or DEFAULT_TEMPLATEFLOW_URL).rstrip("/")


def templateflow_home() -> Path | None:
    """TemplateFlow's own cache (``$TEMPLATEFLOW_HOME``), or None."""
    value = _value(TEMPLATEFLOW_HOME)
    return Path(value).expanduser() if value else None


def num_threads() -> int | None:
    """``$LACUNA_NUM_THREADS`` as a number of threads (at least 1), or None."""
    value = _value(NUM_THREADS)
    return max(1, int(value)) if value else None


def container() -> tuple[str, str] | None:
    """(type, tag) of the container Lacuna runs in, from Lacuna's own variables, else
    Apptainer/Singularity's (type ``singularity``); None outside a container."""
    kind = _value(CONTAINER_TYPE)
    if kind:
        return kind, os.environ.get(CONTAINER_TAG, "")
    image = _value("APPTAINER_CONTAINER") or _value("SINGULARITY_CONTAINER")
    return ("singularity", image) if image else None
