"""The options of the group-level inference (``../shared/spec/group-level.md``), in one
dataclass that the command line, the run settings and the group workflow share.

Imports nothing numerical, so that ``lacuna --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lacuna.core.errors import UsageError

#: The covariate that is each mask's lesion volume (mm^3) from the participant outputs.
LESION_VOLUME = "lesion_volume"


@dataclass(frozen=True)
class InferenceOptions:
    """The group-inference options of ``lacuna BIDS_DIR OUTPUT_DIR group``.

    Attributes mirror the command-line options (``--participants-file``,
    ``--network-threshold``, ...); see ``lacuna run --help``.
    """

    bids_dir: Path
    participants_file: Path | None = None
    network_threshold: float = 7.0
    disconnection_threshold: float = 0.05
    cases_column: str | None = None
    cases: tuple[str, ...] = ()
    controls: tuple[str, ...] = ()
    score_column: str | None = None
    covariates: tuple[str, ...] = ()
    n_permutations: int = 5000
    tfce: bool = False
    random_seed: int = 0

    @classmethod
    def from_config(cls, config) -> "InferenceOptions":
        """The options of a :class:`~lacuna.workflows.config.RunConfig`."""
        names = [f for f in cls.__dataclass_fields__ if f != "bids_dir"]
        return cls(bids_dir=config.bids_dir, **{name: getattr(config, name) for name in names if hasattr(config, name)})

    @property
    def table_path(self) -> Path:
        return Path(self.participants_file) if self.participants_file else Path(self.bids_dir) / "participants.tsv"

    @property
    def table_columns(self) -> list[str]:
        """The columns of the participants table the analyses read."""
        columns = [self.cases_column, self.score_column, *self.covariates]
        return list(dict.fromkeys(c for c in columns if c and c != LESION_VOLUME))

    @property
    def needs_table(self) -> bool:
        return bool(self.cases_column or self.score_column or self.table_columns)

    def threshold(self, functional: bool) -> float:
        """T of the maps: ``--network-threshold`` (fLNM) or ``--disconnection-threshold``."""
        return float(self.network_threshold if functional else self.disconnection_threshold)

    def check(self) -> None:
        """Raise :class:`UsageError` for options that contradict each other."""
        if (self.cases or self.controls) and not self.cases_column:
            raise UsageError("--cases and --controls need --cases-column (the column they are values of)")
        if self.cases_column and not self.cases:
            raise UsageError(f"--cases-column {self.cases_column} needs --cases VALUE (the value(s) that mark a case)")
        overlap = set(self.cases) & set(self.controls)
        if overlap:
            raise UsageError(f"{', '.join(sorted(overlap))} given both as --cases and as --controls")
        if self.n_permutations < 0:
            raise UsageError("--n-permutations must be 0 or more")
        if self.network_threshold < 0 or self.disconnection_threshold < 0:
            raise UsageError("--network-threshold and --disconnection-threshold must be 0 or more")
        tested_and_covariate = {self.cases_column, self.score_column} & set(self.covariates)
        if tested_and_covariate:
            raise UsageError(f"{', '.join(sorted(tested_and_covariate))} is both tested and a --covariate")

    def to_dict(self) -> dict:
        """JSON-ready record of the options (for ``summary.json``)."""
        return {
            "participants_file": str(self.table_path) if self.needs_table else None,
            "network_threshold": self.network_threshold,
            "disconnection_threshold": self.disconnection_threshold,
            "cases_column": self.cases_column,
            "cases": list(self.cases),
            "controls": list(self.controls),
            "score_column": self.score_column,
            "covariates": list(self.covariates),
            "n_permutations": self.n_permutations,
            "tfce": self.tfce,
            "random_seed": self.random_seed,
        }
