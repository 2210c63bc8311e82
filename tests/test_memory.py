"""Memory advice on numpy arrays (Linux: checked against the kernel's own account)."""

from __future__ import annotations

import mmap
import platform
import subprocess
import sys

import numpy as np
import pytest

from lacuna.core import memory
from lacuna.core.memory import MADV_NOHUGEPAGE, madvise, zeros_on_small_pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice and /proc are Linux's")


def _vmas(low: int, high: int) -> list[tuple[int, int, dict[str, str]]]:
    """``(start, end, smaps fields)`` of every mapping overlapping ``[low, high)``."""
    found, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                current = (start, end, {}) if start < high and end > low else None
                if current:
                    found.append(current)
            elif current:
                current[2][head.rstrip(":")] = line.split(None, 1)[1].strip()
    return found


def _vma(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding ``address``."""
    fields, found = {}, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                if found:
                    break
                low, high = (int(part, 16) for part in head.split("-"))
                found = low <= address < high
            elif found:
                fields[head.rstrip(":")] = line.split(None, 1)[1].strip()
    assert found, "no mapping holds the address"
    return fields


@linux_only
def test_zeros_on_small_pages_are_zero_resident_and_advised_off_huge_pages():
    array = zeros_on_small_pages((3, 2_000_000), np.float64)  # 48 MB: numpy would ask for huge pages
    assert array.shape == (3, 2_000_000) and array.dtype == np.float64
    assert not array.any()
    # The array's page-aligned interior may span several mappings (the kernel splits
    # and merges them as other memory comes and goes): check each.
    low = array.ctypes.data + (-array.ctypes.data % mmap.PAGESIZE)
    high = (array.ctypes.data + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    mappings = _vmas(low, high)
    assert mappings and mappings[0][0] <= low and mappings[-1][1] >= high
    for (_, end, _), (start, _, _) in zip(mappings, mappings[1:]):
        assert end == start  # no gap
    for _, _, fields in mappings:
        flags = fields["VmFlags"].split()
        assert "nh" in flags and "hg" not in flags  # VM_NOHUGEPAGE, not VM_HUGEPAGE
        assert fields["Rss"] == fields["Size"]  # every page already faulted in


@linux_only
def test_madvise_reports_refusal():
    array = np.zeros(4 * mmap.PAGESIZE, dtype=np.uint8)
    start = -array.ctypes.data % mmap.PAGESIZE
    assert madvise(array, start, mmap.PAGESIZE, MADV_NOHUGEPAGE)
    assert not madvise(array, start + 1, mmap.PAGESIZE, MADV_NOHUGEPAGE)  # unaligned: EINVAL
    assert not madvise(array, start, mmap.PAGESIZE, None)  # advice this platform lacks


def test_release_free_heap_returns_freed_memory_to_the_system():
    """Blocks freed in the middle of malloc's heap stay in the RSS until trimmed."""
    if not memory.release_free_heap():
        pytest.skip("the C library has no malloc_trim")
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # 190 MB below the mmap threshold
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    kept = blocks[::100]  # pins the heap's top, so free() alone cannot shrink it
    del blocks
    before = _rss_anon_kb()
    memory.release_free_heap()
    after = _rss_anon_kb()
    assert before - after > 100 * 1024, (before, after)
    assert len(kept) == 30


def _rss_anon_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    pytest.skip("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_one_heap_is_set_in_a_fresh_process():
    """glibc takes the setting (a fresh process: it changes how that process allocates);
    threads started after it then allocate, and free, on the main heap."""
    code = (
        "import threading, numpy as np\n"
        "from lacuna.core.memory import release_free_heap, use_one_heap\n"
        "assert use_one_heap()\n"
        "thread = threading.Thread(target=lambda: [np.ones(450_000) for _ in range(12)])\n"
        "thread.start(); thread.join()\n"
        "assert release_free_heap()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_not_faulted_in_again_and_still_released():
    """A map-sized block freed and allocated again, lesion after lesion: with
    reuse_freed_memory the pages are faulted in once, not at every allocation; what
    is free still goes back to the system on release_free_heap."""
    code = (
        "import resource, sys, numpy as np\n"
        "from lacuna.core.memory import release_free_heap, reuse_freed_memory\n"
        "if sys.argv[1] == 'reuse': assert reuse_freed_memory()\n"
        "def rss_anon():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon:'))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(40):  # a lesion's five map volumes, then the next lesion's\n"
        "    volumes = [np.empty(902_629, dtype=np.float32) for _ in range(5)]\n"
        "    for volume in volumes: volume[:] = 1.0\n"
        "    del volumes, volume\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "held = np.empty(60_000_000 // 8); held[:] = 1.0; blocks = [np.ones(4_000_000 // 8) for _ in range(8)]\n"
        "del held, blocks\n"
        "kept = rss_anon(); assert release_free_heap(); released = kept - rss_anon()\n"
        "print(faults, released)\n"
    )
    runs = {
        mode: [int(v) for v in subprocess.run([sys.executable, "-c", code, mode], check=True, capture_output=True, text=True).stdout.split()]
        for mode in ("default", "reuse")
    }
    pages = 902_629 * 4 // 4096
    assert runs["reuse"][0] < 10 * pages  # once, not 200 times
    # By default it depends on what else sits at the top of the heap: often every time.
    assert runs["reuse"][0] <= runs["default"][0]
    assert runs["reuse"][1] > 25_000  # KiB: the freed 32 MB of small blocks went back on the trim
