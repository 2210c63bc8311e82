"""One place for the settings of a BIDS App run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lacuna.bids.group_options import InferenceOptions

#: The defaults of the group-inference options, from their one definition.
_INFERENCE = InferenceOptions(bids_dir=Path("."))

#: Analyses the BIDS App can run, by their command-line name. Functional mapping also
#: runs whenever a functional connectome is given.
ANALYSES = ("RegionalDamage", "FunctionalNetworkMapping")
DEFAULT_ANALYSES = ("RegionalDamage",)
DEFAULT_ATLASES = ("Schaefer2018_100Parcels7Networks",)
MASK_SUFFIXES = ("_mask.nii.gz", "_mask.nii")


@dataclass
class RunConfig:
    """Settings of one ``lacuna BIDS_DIR OUTPUT_DIR LEVEL`` invocation.

    Attributes mirror the command-line options; see ``lacuna --help``.
    """

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    mask_labels: tuple[str, ...] = ()
    bids_filter_file: Path | None = None
    derivatives: tuple[Path, ...] = ()
    mask_space: str | None = None
    mask_transform: Path | None = None
    analyses: tuple[str, ...] = DEFAULT_ANALYSES
    atlases: tuple[str, ...] = DEFAULT_ATLASES
    atlas_dir: Path | None = None
    work_dir: Path | None = None
    nprocs: int = 1
    nthreads: int | None = None
    omp_nthreads: int | None = None
    skip_bids_validation: bool = False
    overwrite: bool = False
    functional_connectomes: tuple[str, ...] = ()
    tractograms: tuple[str, ...] = ()
    flnm_method: str = "boes"
    mem_gb: float | None = None
    output_space: str = "input"
    # group inference (lacuna.workflows.group_inference; ../shared/spec/group-level.md)
    participants_file: Path | None = None
    network_threshold: float = _INFERENCE.network_threshold
    disconnection_threshold: float = _INFERENCE.disconnection_threshold
    cases_column: str | None = None
    cases: tuple[str, ...] = ()
    controls: tuple[str, ...] = ()
    score_column: str | None = None
    covariates: tuple[str, ...] = ()
    n_permutations: int = _INFERENCE.n_permutations
    tfce: bool = _INFERENCE.tfce
    random_seed: int = _INFERENCE.random_seed

    def __post_init__(self):
        self.bids_dir = Path(self.bids_dir).resolve()
        self.output_dir = Path(self.output_dir).resolve()
        self.participants_file = Path(self.participants_file).resolve() if self.participants_file else None
        self.atlas_dir = Path(self.atlas_dir).resolve() if self.atlas_dir else None
        self.mask_transform = Path(self.mask_transform).resolve() if self.mask_transform else None
        self.work_dir = Path(self.work_dir).resolve() if self.work_dir else None
        self.bids_filter_file = Path(self.bids_filter_file).resolve() if self.bids_filter_file else None
        self.derivatives = tuple(dict.fromkeys(Path(p).resolve() for p in self.derivatives))
        self.participant_labels = tuple(label.removeprefix("sub-") for label in self.participant_labels)
        self.session_labels = tuple(label.removeprefix("ses-") for label in self.session_labels)
        self.mask_labels = tuple(label.removeprefix("label-") for label in self.mask_labels)

    def to_dict(self) -> dict:
        """JSON-ready settings (paths as strings)."""
        return {
            key: (
                str(value)
                if isinstance(value, Path)
                else [str(v) if isinstance(v, Path) else v for v in value]
                if isinstance(value, tuple)
                else value
            )
            for key, value in asdict(self).items()
        }
