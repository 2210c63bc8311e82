"""Input/output: load lesion masks, export results and BIDS derivatives, reference data.

The public API follows the Lacuna reference documentation (``lacuna.io``).
"""

from lacuna._lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BidsError": "lacuna.core.errors",
        "export_bids_derivatives": "lacuna.io.bids",
        "load_bids_dataset": "lacuna.io.bids",
        "save_nifti": "lacuna.io.bids",
        "get_connectome_path": "lacuna.assets.connectomes",
        "get_data_dir": "lacuna.core.datadir",
        "gsp1000_to_hdf5": "lacuna.io.convert",
        "merge_trk_to_tck": "lacuna.io.convert",
        "trk_to_tck": "lacuna.io.convert",
        "batch_export_to_csv": "lacuna.io.export",
        "batch_export_to_tsv": "lacuna.io.export",
        "export_provenance_to_json": "lacuna.io.export",
        "export_results_to_csv": "lacuna.io.export",
        "export_results_to_json": "lacuna.io.export",
        "export_results_to_tsv": "lacuna.io.export",
        "validate_bids_derivatives": "lacuna.io.validation",
        "ConnectomeSource": "lacuna.io.downloaders.base",
        "FetchConfig": "lacuna.io.downloaders.base",
        "FetchProgress": "lacuna.io.downloaders.base",
        "FetchResult": "lacuna.io.downloaders.base",
        "fetch_connectome": "lacuna.io.fetch",
        "fetch_dtor985": "lacuna.io.fetch",
        "fetch_gsp1000": "lacuna.io.fetch",
        "fetch_hcp1065": "lacuna.io.fetch",
        "get_fetch_status": "lacuna.io.fetch",
        "list_fetchable_connectomes": "lacuna.io.fetch",
    },
)
