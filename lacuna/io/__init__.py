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

__all__ = [
    "BidsError",
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
