"""The catalogue of fetchable connectomes (:func:`connectome_sources`).

Server overrides of the environment (``LACUNA_DATAVERSE_URL``, ``LACUNA_HCP1065_URL``;
:mod:`lacuna.core.settings`) are applied when the catalogue is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lacuna.core import settings
from lacuna.core.datadir import get_data_dir

ConnectomeType = Literal["functional", "structural"]
SourceType = Literal["dataverse", "figshare", "github"]

DATAVERSE_URL_ENV = settings.DATAVERSE_URL
FIGSHARE_API_URL_ENV = settings.FIGSHARE_API_URL
HCP1065_URL_ENV = settings.HCP1065_URL
DEFAULT_DATAVERSE_SERVER = settings.DEFAULT_DATAVERSE_URL
DEFAULT_FIGSHARE_API_URL = settings.DEFAULT_FIGSHARE_API_URL
DEFAULT_HCP1065_URL = settings.DEFAULT_HCP1065_URL

#: Name each source is registered under by default.
DEFAULT_REGISTER_NAMES = {"gsp1000": "GSP1000", "dtor985": "dTOR985", "hcp1065": "HCP1065"}
SOURCE_NAMES = tuple(DEFAULT_REGISTER_NAMES)


@dataclass
class ConnectomeSource:
    """Configuration for a fetchable connectome source.

    Attributes
    ----------
    name : str
        Unique identifier (e.g. ``'gsp1000'``, ``'dtor985'``).
    display_name : str
        Human-readable name (e.g. ``'GSP1000 Functional Connectome'``).
    description : str
        User-facing description of the connectome.
    type : {"functional", "structural"}
        Connectome type; picks the processing pipeline.
    source_type : {"dataverse", "figshare", "github"}
        Download source, which decides the authentication and handling.
    space : str
        Coordinate space of the published data.
    n_subjects : int
        Number of subjects in the connectome.
    estimated_size_gb : float
        Estimated download size in GB, for user information.
    citation : str
        Citation text for this connectome dataset.
    default_batches : int
        Default number of HDF5 batch files (functional only).
    requires_mask : bool
        Whether a brain mask is needed for processing.
    mask_url : str, optional
        URL to download a brain mask from, if required.
    persistent_id : str, optional
        DOI of a Dataverse dataset (e.g. ``'doi:10.7910/DVN/ILXIKS'``).
    dataverse_server : str
        Dataverse server URL.
    article_id : int, optional
        Figshare article ID for API-based downloads.
    download_url : str, optional
        Direct download URL (deprecated for Figshare, use ``article_id``; the HCP1065
        release asset).
    """

    name: str
    display_name: str
    description: str
    type: ConnectomeType
    source_type: SourceType
    space: str = "MNI152NLin6Asym"
    n_subjects: int = 0
    estimated_size_gb: float = 0.0
    citation: str = ""
    default_batches: int = 10
    requires_mask: bool = False
    mask_url: str | None = None
    persistent_id: str | None = None
    dataverse_server: str = settings.DEFAULT_DATAVERSE_URL
    article_id: int | None = None
    download_url: str | None = None


def connectome_sources() -> dict[str, ConnectomeSource]:
    """The fetchable connectomes by name, with environment overrides applied.

    ``LACUNA_DATAVERSE_URL`` replaces ``dataverse_server`` of GSP1000 and
    ``LACUNA_HCP1065_URL`` the ``download_url`` of HCP1065 (the Figshare API base,
    ``LACUNA_FIGSHARE_API_URL``, has no field and is read by the Figshare client).
    """
    return {
        "gsp1000": ConnectomeSource(
            name="gsp1000",
            display_name="GSP1000 Functional Connectome",
            description=(
                "Resting-state fMRI of 1000 healthy young adults of the Brain Genomics "
                "Superstruct Project (GSP), preprocessed for lesion network mapping; converted "
                "to HDF5 batch files on the FSL MNI152 2 mm grid. Needs a Harvard Dataverse API "
                "token with access to the dataset."
            ),
            type="functional",
            source_type="dataverse",
            space="MNI152NLin6Asym",
            n_subjects=1000,
            estimated_size_gb=200.0,
            citation=(
                "Yeo BTT et al. (2011) J Neurophysiol 106:1125-1165; Holmes AJ et al. (2015) "
                "Brain Genomics Superstruct Project initial data release. Sci Data 2:150031; "
                "Cohen A et al. (2020) GSP1000 preprocessed connectome, Harvard Dataverse, "
                "doi:10.7910/DVN/ILXIKS"
            ),
            default_batches=10,
            requires_mask=True,
            persistent_id="doi:10.7910/DVN/ILXIKS",
            dataverse_server=settings.dataverse_url(),
        ),
        "dtor985": ConnectomeSource(
            name="dtor985",
            display_name="dTOR985 Structural Connectome",
            description=(
                "Normative whole-brain tractogram of 985 healthy subjects (diffusion MRI, "
                "Toronto/HCP), as one TrackVis file converted to MRtrix3 .tck. Published in "
                "MNI152NLin2009bAsym; Lacuna registers it as MNI152NLin2009cAsym, treating the "
                "2009b and 2009c releases of the ICBM 2009 nonlinear asymmetric template as "
                "aligned."
            ),
            type="structural",
            source_type="figshare",
            space="MNI152NLin2009bAsym",
            n_subjects=985,
            estimated_size_gb=11.0,
            citation=(
                "Elias GJB et al. (2024) A large normative connectome for exploring the "
                "tractographic correlates of focal brain interventions. Sci Data 11:353, "
                "doi:10.1038/s41597-024-03197-0 (figshare article 25209947; space "
                "MNI152NLin2009bAsym, used as MNI152NLin2009cAsym)"
            ),
            article_id=25209947,
        ),
        "hcp1065": ConnectomeSource(
            name="hcp1065",
            display_name="HCP1065 Structural Connectome",
            description=(
                "Population-averaged tractography atlas of 1065 Human Connectome Project "
                "subjects: the per-tract TrackVis files (cranial nerves excluded) merged into "
                "one MRtrix3 .tck. Space MNI152NLin2009aAsym, used as MNI152NLin2009cAsym. "
                "License CC BY-SA 4.0."
            ),
            type="structural",
            source_type="github",
            space="MNI152NLin2009aAsym",
            n_subjects=1065,
            estimated_size_gb=1.5,
            citation=(
                "Yeh FC (2022) Population-based tract-to-region connectome of the human brain "
                "and its hierarchical topology. Nat Commun 13:4933, "
                "doi:10.1038/s41467-022-32595-4; Yeh FC et al. (2018) NeuroImage 178:57-68"
            ),
            download_url=settings.hcp1065_url(),
        ),
    }


def get_source(name: str) -> ConnectomeSource:
    """The catalogue entry ``name`` (case-insensitive).

    Raises
    ------
    ValueError
        If no fetchable connectome has that name (the message lists them).
    """
    sources = connectome_sources()
    key = str(name).lower()
    if key not in sources:
        raise ValueError(f"unknown connectome {name!r}; fetchable connectomes: {', '.join(sources)}")
    return sources[key]


def default_output_dir(name: str) -> Path:
    """``<data dir>/connectomes/<name>``: where ``lacuna fetch`` puts a connectome."""
    return get_data_dir() / "connectomes" / str(name).lower()
