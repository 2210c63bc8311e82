"""Input/output: load lesion masks, export results and BIDS derivatives, reference data.

The public API follows the Lacuna reference documentation (``lacuna.io``).
"""

from lacuna.core.errors import BidsError
from lacuna.io.bids import export_bids_derivatives, load_bids_dataset, save_nifti
from lacuna.assets.connectomes import get_connectome_path
from lacuna.core.datadir import get_data_dir
from lacuna.io.convert import gsp1000_to_hdf5, merge_trk_to_tck, trk_to_tck
from lacuna.io.export import (
    batch_export_to_csv,
    batch_export_to_tsv,
    export_provenance_to_json,
    export_results_to_csv,
    export_results_to_json,
    export_results_to_tsv,
)
from lacuna.io.validation import validate_bids_derivatives
from lacuna.io.downloaders.base import ConnectomeSource, FetchConfig, FetchProgress, FetchResult
from lacuna.io.fetch import (
    fetch_connectome,
    fetch_dtor985,
    fetch_gsp1000,
    fetch_hcp1065,
    get_fetch_status,
    list_fetchable_connectomes,
)

__all__ = [
    "BidsError",
    "ConnectomeSource",
    "FetchConfig",
    "FetchProgress",
    "FetchResult",
    "fetch_connectome",
    "fetch_dtor985",
    "fetch_gsp1000",
    "fetch_hcp1065",
    "get_fetch_status",
    "list_fetchable_connectomes",
    "batch_export_to_csv",
    "batch_export_to_tsv",
    "export_bids_derivatives",
    "export_provenance_to_json",
    "export_results_to_csv",
    "export_results_to_json",
    "export_results_to_tsv",
    "get_connectome_path",
    "get_data_dir",
    "gsp1000_to_hdf5",
    "merge_trk_to_tck",
    "trk_to_tck",
    "load_bids_dataset",
    "save_nifti",
    "validate_bids_derivatives",
]
