"""Arrays kept between runs in the data cache (lacuna.core.derived_arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from lacuna.core import derived_arrays
from lacuna.core.derived_arrays import digest, mapped_arrays


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LACUNA_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_mapped_arrays_come_back_equal_read_only_and_mapped(data_dir):
    labels = np.asfortranarray(np.arange(60, dtype=np.int32).reshape(3, 4, 5))
    calls = []

    def derive():
        calls.append(1)
        return {"labels": labels, "empty": np.zeros(0, dtype=np.int64)}

    key = digest("test", labels)
    first = mapped_arrays("kind", key, derive)
    again = mapped_arrays("kind", key, derive)
    assert len(calls) == 1
    np.testing.assert_array_equal(again["labels"], labels)
    assert again["labels"].flags.f_contiguous and again["labels"].dtype == np.int32
    assert again["empty"].shape == (0,)
    assert isinstance(again["labels"].base, np.memmap)
    with pytest.raises(ValueError):
        again["labels"][0, 0, 0] = 1
    assert first["labels"] is labels
    assert [p.name for p in (data_dir / "derived" / "kind").iterdir()] == [key]  # no staging folder left


def test_mapped_arrays_stored_first_by_another_process_are_kept(data_dir, monkeypatch):
    key = digest("race")
    theirs = {"values": np.array([1, 2, 3])}
    original = derived_arrays._store_folder

    def store_after_them(folder, arrays):
        original(folder, theirs)  # the other process renames its folder first
        original(folder, arrays)

    monkeypatch.setattr(derived_arrays, "_store_folder", store_after_them)
    ours = mapped_arrays("kind", key, lambda: {"values": np.array([1, 2, 3])})
    np.testing.assert_array_equal(ours["values"], [1, 2, 3])
    monkeypatch.setattr(derived_arrays, "_store_folder", original)
    np.testing.assert_array_equal(mapped_arrays("kind", key, lambda: pytest.fail("derived again"))["values"], [1, 2, 3])
    assert len(list((data_dir / "derived" / "kind").iterdir())) == 1


def test_mapped_arrays_without_a_writable_cache_are_derived_each_time(data_dir):
    data_dir.mkdir()
    (data_dir / "derived").write_text("a file where the folder should be")
    arrays = mapped_arrays("kind", digest("x"), lambda: {"values": np.ones(3)})
    np.testing.assert_array_equal(arrays["values"], np.ones(3))
