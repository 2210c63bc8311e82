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
        "export_bids_derivatives": "lacuna.bids.derivatives",
        "load_bids_dataset": "lacuna.bids.inputs",
        "save_nifti": "lacuna.bids.derivatives",
        "get_connectome_path": "lacuna.resources.connectomes",
        "get_data_dir": "lacuna.core.datadir",
        "gsp1000_to_hdf5": "lacuna.formats.gsp1000",
        "merge_trk_to_tck": "lacuna.formats.tractograms",
        "trk_to_tck": "lacuna.formats.tractograms",
        "batch_export_to_csv": "lacuna.bids.tables",
        "batch_export_to_tsv": "lacuna.bids.tables",
        "export_provenance_to_json": "lacuna.bids.tables",
        "export_results_to_csv": "lacuna.bids.tables",
        "export_results_to_json": "lacuna.bids.tables",
        "export_results_to_tsv": "lacuna.bids.tables",
        "validate_bids_derivatives": "lacuna.bids.validation",
        "ConnectomeSource": "lacuna.resources.fetching.sources",
        "FetchConfig": "lacuna.resources.fetching.records",
        "FetchProgress": "lacuna.resources.fetching.records",
        "FetchResult": "lacuna.resources.fetching.records",
        "fetch_connectome": "lacuna.resources.fetching.dispatch",
        "fetch_dtor985": "lacuna.resources.fetching.tractograms",
        "fetch_gsp1000": "lacuna.resources.fetching.gsp1000",
        "fetch_hcp1065": "lacuna.resources.fetching.tractograms",
        "get_fetch_status": "lacuna.resources.fetching.status",
        "list_fetchable_connectomes": "lacuna.resources.fetching.status",
    },
)
