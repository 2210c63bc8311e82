"""Temporaries of writers that are gone are removed; a live writer's are kept. An
exited but unreaped process (a killed run's orphaned worker, in a container whose first
process does not reap it) counts as gone."""

from __future__ import annotations

import os
import socket
import hashlib
import sys
import time
from pathlib import Path

import pytest

from lacuna.core.atomic import TEMP_MARKER, is_stale_temporary, owner_tag, remove_stale_temporaries


def _temporary_of(folder: Path, pid: int) -> Path:
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    path = folder / f".sub-01_mask{TEMP_MARKER}{host}{pid}-123.nii.gz"
    path.write_bytes(b"partial")
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc and fork")
def test_an_unreaped_writer_counts_as_gone(tmp_path):
    pid = os.fork()
    if pid == 0:  # the child exits at once; the parent does not wait for it yet
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(pid, 0)  # a zombie still answers to signal 0
        stale = _temporary_of(tmp_path, pid)
        live = _temporary_of(tmp_path, os.getpid())
        assert live.name.split(TEMP_MARKER)[1].startswith(owner_tag())
        assert is_stale_temporary(stale) and not is_stale_temporary(live)
        assert remove_stale_temporaries(tmp_path) == 1
        assert not stale.exists() and live.exists()
    finally:
        os.waitpid(pid, 0)
