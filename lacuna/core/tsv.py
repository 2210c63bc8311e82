"""BIDS TSV tables written without pandas.

The per-mask parcel tables are small (one row per region) and many (several per mask);
writing them with the ``csv`` module avoids importing pandas (a quarter of a second) and
its per-table overhead. The bytes equal those of ``DataFrame.to_csv(sep="\\t",
index=False, na_rep="n/a", lineterminator="\\n")`` (tested): fields quoted only where
needed, floats in their shortest round-trip form, missing values ``n/a``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
    return str(value)


def _numeric(values: Sequence) -> bool:
    """Whether ``values`` is a numpy array of numbers (whose cells never need quotes)."""
    return getattr(getattr(values, "dtype", None), "kind", "") in ("i", "u", "f")


def _cells(values: Sequence) -> list[str]:
    if _numeric(values):  # Python scalars in one call
        cells = list(map(str, values.tolist()))
        return ["n/a" if cell == "nan" else cell for cell in cells] if values.dtype.kind == "f" else cells
    return [_cell(value) for value in values]


def tsv_bytes(columns: dict[str, Sequence]) -> bytes:
    """``columns`` (name -> values, all of one length) as the bytes of a BIDS TSV file."""
    names = list(columns)
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns of different lengths: {sorted(lengths)}")
    cells = [_cells(columns[name]) for name in names]
    textual = [names] + [column for name, column in zip(names, cells) if not _numeric(columns[name])]
    if len(names) > 1 and not any(_needs_quotes(column) for column in textual):
        lines = ["\t".join(names), *("\t".join(row) for row in zip(*cells))]
        return ("\n".join(lines) + "\n").encode("utf-8")
    text = io.StringIO(newline="")
    writer = csv.writer(text, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(names)
    writer.writerows(zip(*cells))
    return text.getvalue().encode("utf-8")


def _needs_quotes(cells: list[str]) -> bool:
    """Whether the csv module would quote one of ``cells`` (QUOTE_MINIMAL); an empty
    cell is quoted when it is a row's only field, hence the caller's ``len(names) > 1``."""
    joined = "".join(cells)
    return any(mark in joined for mark in _QUOTED_MARKS)


_QUOTED_MARKS = ("\t", "\n", "\r", '"')


def matrix_columns(region_names: Sequence[str], matrix) -> dict[str, Sequence]:
    """A square region x region matrix as TSV columns: ``name`` (the row's region), then
    one column per region, in order (``DataFrame(matrix, index=names,
    columns=names).reset_index(names="name")``)."""
    names = list(region_names)
    if "name" in names or len(set(names)) != len(names):
        raise ValueError("matrix region names must be unique and must not be 'name'")
    rows = matrix.shape[0] if hasattr(matrix, "shape") else len(matrix)
    if rows != len(names):
        raise ValueError(f"{rows} matrix rows for {len(names)} regions")
    return {"name": names, **{region: matrix[:, position] for position, region in enumerate(names)}}


def write_columns_tsv(path: str | Path, columns: dict[str, Sequence]) -> None:
    """Write ``columns`` (name -> values, all of one length) as a BIDS TSV file."""
    Path(path).write_bytes(tsv_bytes(columns))
