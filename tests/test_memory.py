"""Memory advice on numpy arrays (Linux: checked against the kernel's own account)."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from lacuna.core.memory import MADV_NOHUGEPAGE, madvise, zeros_on_small_pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice and /proc are Linux's")


def _vma_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address``, from /proc/self/smaps."""
    flags, inside = None, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    assert flags is not None, "no mapping holds the address"
    return flags


@linux_only
def test_zeros_on_small_pages_are_zero_resident_and_advised_off_huge_pages():
    array = zeros_on_small_pages((3, 2_000_000), np.float64)  # 48 MB: numpy would ask for huge pages
    assert array.shape == (3, 2_000_000) and array.dtype == np.float64
    assert not array.any()
    middle = array.ctypes.data + array.nbytes // 2
    assert "nh" in _vma_flags(middle)  # VM_NOHUGEPAGE
    assert "hg" not in _vma_flags(middle)


@linux_only
def test_madvise_reports_refusal():
    array = np.zeros(4 * mmap.PAGESIZE, dtype=np.uint8)
    start = -array.ctypes.data % mmap.PAGESIZE
    assert madvise(array, start, mmap.PAGESIZE, MADV_NOHUGEPAGE)
    assert not madvise(array, start + 1, mmap.PAGESIZE, MADV_NOHUGEPAGE)  # unaligned: EINVAL
    assert not madvise(array, start, mmap.PAGESIZE, None)  # advice this platform lacks
