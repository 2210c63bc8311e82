"""The participants table and the design of each group analysis.

A mask matches a row of the participants table by ``participant_id`` and, when the
table has ``session_id`` and the mask a session, by that too. Masks without a row, and
rows with a missing value in a column an analysis needs, are left out of that analysis,
each with its reason (``{"participant_id", "reason"}``). A column that does not exist is
an error before any work starts (:meth:`InferenceOptions.check`,
:func:`load_participants`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from lacuna.bids.group_options import LESION_VOLUME, InferenceOptions
from lacuna.core.errors import BidsError, InputNotFoundError, UsageError

@dataclass(frozen=True)
class MaskIdentity:
    """Who a completed mask belongs to, and its lesion volume (mm^3) when known."""

    participant_id: str
    session_id: str | None
    name: str
    lesion_volume: float | None = None

    def exclusion(self, reason: str) -> dict:
        """The ``{"participant_id", "reason"}`` entry of a mask left out."""
        return {"participant_id": self.participant_id, "reason": f"{self.name}: {reason}"}


def load_participants(options: InferenceOptions) -> pd.DataFrame:
    """The participants table (values as text, missing as NaN), checked for the columns
    the options name.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    UsageError
        If a column named by an option does not exist.
    BidsError
        If the table has no ``participant_id`` column or repeats a participant (session).
    """
    path = options.table_path
    if not path.is_file():
        raise InputNotFoundError(f"participants table {path} not found (give one with --participants-file)")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a", "NA", ""])
    frame.columns = [str(c).strip() for c in frame.columns]
    if "participant_id" not in frame:
        raise BidsError(f"{path} has no participant_id column")
    missing = [c for c in options.table_columns if c not in frame]
    if missing:
        raise UsageError(
            f"{path} has no column {', '.join(missing)} (its columns: {', '.join(frame.columns)})"
        )
    frame["participant_id"] = frame["participant_id"].map(lambda v: _prefixed(v, "sub-"))
    keys = ["participant_id"] + (["session_id"] if "session_id" in frame else [])
    if "session_id" in frame:
        frame["session_id"] = frame["session_id"].map(lambda v: _prefixed(v, "ses-"))
    repeated = frame[frame.duplicated(keys, keep=False)]
    if not repeated.empty:
        raise BidsError(f"{path} has more than one row for {', '.join(repeated['participant_id'].unique())}")
    return frame


def _prefixed(value, prefix: str):
    if not isinstance(value, str):
        return value
    value = value.strip()
    return value if value.startswith(prefix) else prefix + value


@dataclass(frozen=True)
class Contrast:
    """The design of one analysis: the masks used, the tested variable, covariates."""

    analysis: str
    masks: list[int]
    tested: np.ndarray
    covariates: np.ndarray
    excluded: list[dict] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.masks)

    @property
    def n_cases(self) -> int:
        return int(np.count_nonzero(self.tested > 0.5))

    @property
    def n_controls(self) -> int:
        return self.n - self.n_cases

    def restricted(self, keep, reason: str, identities: list[MaskIdentity]) -> tuple["Contrast", list[dict]]:
        """The contrast on the masks for which ``keep(mask index)``; all exclusions."""
        kept = [i for i, mask in enumerate(self.masks) if keep(mask)]
        dropped = [identities[mask].exclusion(reason) for mask in self.masks if not keep(mask)]
        contrast = replace(
            self, masks=[self.masks[i] for i in kept], tested=self.tested[kept], covariates=self.covariates[kept]
        )
        return contrast, self.excluded + dropped

    def problem(self) -> str | None:
        """Why the GLM cannot be computed on this design (None when it can)."""
        if self.analysis == "Specificity" and (self.n_cases == 0 or self.n_controls == 0):
            return f"needs cases and controls (has {self.n_cases} and {self.n_controls})"
        if self.n - 2 - self.covariates.shape[1] < 1:
            return f"{self.n} masks leave no degree of freedom for {self.covariates.shape[1]} covariate column(s)"
        if np.ptp(self.tested) == 0:
            return "the tested variable is constant"
        return None


def build_contrasts(masks: list[MaskIdentity], table: pd.DataFrame | None, options: InferenceOptions) -> list[Contrast]:
    """The Specificity and Association designs the options ask for (before the masks
    without the map of a source are left out)."""
    contrasts = []
    if options.cases_column:
        contrasts.append(_contrast("Specificity", masks, table, options, _case_value(options)))
    if options.score_column:
        contrasts.append(_contrast("Association", masks, table, options, _score_value(options.score_column)))
    return contrasts


def _case_value(options: InferenceOptions):
    column = options.cases_column

    def value(row) -> tuple[float | None, str | None]:
        text = row.get(column)
        if not isinstance(text, str):
            return None, f"missing {column}"
        if text in options.cases:
            return 1.0, None
        if options.controls and text not in options.controls:
            return None, f"{column}={text} is neither a --cases nor a --controls value"
        return 0.0, None

    return value


def _score_value(column: str):
    def value(row) -> tuple[float | None, str | None]:
        text = row.get(column)
        if not isinstance(text, str):
            return None, f"missing {column}"
        number = pd.to_numeric(text, errors="coerce")
        if not np.isfinite(number):
            return None, f"{column}={text} is not a number"
        return float(number), None

    return value


def _contrast(analysis: str, masks: list[MaskIdentity], table, options: InferenceOptions, tested_value) -> Contrast:
    used, tested, covariate_rows, excluded = [], [], [], []
    for index, mask in enumerate(masks):
        row, reason = _row_of(mask, table)
        if row is None:
            excluded.append(mask.exclusion(reason))
            continue
        value, reason = tested_value(row)
        values, reason = (None, reason) if value is None else _covariate_values(mask, row, options.covariates)
        if values is None:
            excluded.append(mask.exclusion(reason))
            continue
        used.append(index)
        tested.append(value)
        covariate_rows.append(values)
    covariates = _encode(covariate_rows, options.covariates)
    return Contrast(analysis, used, np.asarray(tested, dtype=np.float64), covariates, excluded)


def _row_of(mask: MaskIdentity, table: pd.DataFrame) -> tuple[dict | None, str | None]:
    rows = table[table["participant_id"] == mask.participant_id]
    if "session_id" in table and mask.session_id:
        rows = rows[rows["session_id"] == mask.session_id]
        if rows.empty:
            return None, f"no row for {mask.participant_id} {mask.session_id} in the participants table"
    if rows.empty:
        return None, f"no row for {mask.participant_id} in the participants table"
    if len(rows) > 1:
        return None, f"{len(rows)} rows for {mask.participant_id} (sessions) and the mask has no session"
    return rows.iloc[0].to_dict(), None


def _covariate_values(mask: MaskIdentity, row: dict, covariates) -> tuple[list | None, str | None]:
    values = []
    for name in covariates:
        if name == LESION_VOLUME:
            if mask.lesion_volume is None:
                return None, "lesion volume unknown"
            values.append(mask.lesion_volume)
            continue
        text = row.get(name)
        if not isinstance(text, str):
            return None, f"missing {name}"
        values.append(text)
    return values, None


def _encode(rows: list[list], names) -> np.ndarray:
    """Covariate columns: numbers as they are; a column with any non-number is
    categorical, one indicator per level but the first (sorted)."""
    columns = []
    for position, name in enumerate(names):
        values = [row[position] for row in rows]
        numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)
        if np.isfinite(numbers).all():
            columns.append(numbers)
            continue
        levels = sorted(set(map(str, values)))
        columns.extend(np.array([str(v) == level for v in values], dtype=np.float64) for level in levels[1:])
    return np.column_stack(columns) if columns else np.zeros((len(rows), 0))
