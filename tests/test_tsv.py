"""The pandas-free TSV writer gives the bytes pandas' to_csv gives."""

import math

import numpy as np
import pandas as pd
import pytest

from lacuna.core.tsv import matrix_columns, tsv_bytes, write_columns_tsv


def test_same_bytes_as_pandas(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.standard_normal(40) * 10.0 ** rng.integers(-12, 12, 40)
    values[[3, 7]] = np.nan
    values[5] = 1.0
    values[6] = 0.0
    columns = {
        "index": list(range(1, 41)),
        "name": [f"7Networks_LH_Vis_{i}" for i in range(38)] + ['with "quote"', "with\ttab"],
        "mean": [float(v) for v in values],
        "max": list(values.astype(np.float64)),
    }
    ours, theirs = tmp_path / "ours.tsv", tmp_path / "pandas.tsv"
    write_columns_tsv(ours, columns)
    pd.DataFrame(columns).to_csv(theirs, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    assert ours.read_bytes() == theirs.read_bytes()
    back = pd.read_csv(ours, sep="\t", na_values="n/a", keep_default_na=False)
    assert math.isnan(back["mean"][3]) and back["mean"][5] == 1.0
    assert np.array_equal(back["max"].to_numpy(), values, equal_nan=True)


def test_columns_of_different_lengths(tmp_path):
    with pytest.raises(ValueError, match="different lengths"):
        write_columns_tsv(tmp_path / "x.tsv", {"a": [1, 2], "b": [1]})


def test_matrix_same_bytes_as_pandas(tmp_path):
    """Connectivity matrices (ints and floats, NaN, tiny and huge values) as pandas
    writes them from a labelled DataFrame."""
    rng = np.random.default_rng(4)
    names = [f"7Networks_LH_Vis_{i}" for i in range(5)] + ["with space"]
    floats = rng.standard_normal((6, 6)) * 10.0 ** rng.integers(-9, 9, (6, 6))
    floats[2, 3] = np.nan
    counts = rng.integers(0, 10**6, (6, 6))
    for matrix in (floats, counts):
        ours = tsv_bytes(matrix_columns(names, matrix))
        frame = pd.DataFrame(matrix, index=names, columns=names).reset_index(names="name")
        assert ours == frame.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n").encode()


def test_matrix_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        matrix_columns(["a", "a"], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="2 matrix rows for 3"):
        matrix_columns(["a", "b", "c"], np.zeros((2, 2)))
