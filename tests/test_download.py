"""Tests of lacuna.net.download and lacuna.core.datadir against local HTTP servers."""

from __future__ import annotations

import logging
import socket

import pytest
from fake_servers import FakeServer, md5

from lacuna.core.errors import AuthenticationError, DownloadError
from lacuna.core.atomic import atomic_write_text
from lacuna.core.datadir import get_data_dir
from lacuna.net.download import download_file, part_path
from lacuna.net.http import redact_url

SECRET = "s3cr3t-api-key-value"
CONTENT = bytes(range(256)) * 4000  # ~1 MB
FILE = "/file.bin"


@pytest.fixture
def server():
    """A local server with one file, ``FILE``; failures are queued with ``fail``."""
    with FakeServer() as srv:
        srv.add_file(FILE, CONTENT)
        yield srv


# --------------------------------------------------------------------------------------
# download_file
# --------------------------------------------------------------------------------------


def test_download_with_progress_and_md5(server, tmp_path):
    seen = []
    dest = download_file(
        server.url(FILE),
        tmp_path / "sub" / "file.bin",
        expected_md5=md5(CONTENT),
        expected_size=len(CONTENT),
        progress=lambda done, total: seen.append((done, total)),
        chunk_size=64 * 1024,
    )
    assert dest.read_bytes() == CONTENT
    assert not part_path(dest).exists()
    assert seen[-1] == (len(CONTENT), len(CONTENT))
    assert len(seen) > 2


def test_resume_sends_range_and_appends(server, tmp_path):
    dest = tmp_path / "file.bin"
    n = 12345
    part_path(dest).write_bytes(CONTENT[:n])
    download_file(server.url(FILE), dest, expected_md5=md5(CONTENT))
    assert server.requests[0].headers["Range"] == f"bytes={n}-"
    assert dest.read_bytes() == CONTENT
    assert not part_path(dest).exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "file.bin"
    part_path(dest).write_bytes(b"garbage that must be discarded")
    server.fail(FILE, "ignore-range")
    download_file(server.url(FILE), dest, expected_md5=md5(CONTENT))
    assert dest.read_bytes() == CONTENT


def test_complete_part_answered_416_is_verified(server, tmp_path):
    dest = tmp_path / "file.bin"
    part_path(dest).write_bytes(CONTENT)
    download_file(server.url(FILE), dest, expected_md5=md5(CONTENT))
    assert dest.read_bytes() == CONTENT
    assert len(server.requests) == 1


def test_connection_cut_mid_file_is_resumed(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.fail(FILE, "cut", "ok")
    download_file(server.url(FILE), dest, expected_md5=md5(CONTENT), backoff=0)
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0].headers
    assert server.requests[1].headers["Range"] == f"bytes={len(CONTENT) // 2}-"
    assert dest.read_bytes() == CONTENT


def test_transient_500_is_retried(server, tmp_path, caplog):
    server.fail(FILE, 500, 503)
    with caplog.at_level(logging.DEBUG):
        download_file(server.url(FILE), tmp_path / "f", headers={"X-Api-Key": SECRET}, backoff=0)
    assert len(server.requests) == 3
    assert all(r.headers["X-Api-Key"] == SECRET for r in server.requests)
    assert SECRET not in caplog.text


def test_retries_exhausted_raise_download_error(server, tmp_path):
    server.fail(FILE, *[500] * 10)
    with pytest.raises(DownloadError, match="after 3 attempts"):
        download_file(server.url(FILE), tmp_path / "f", retries=2, backoff=0)
    assert len(server.requests) == 3
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_raise_authentication_error(server, tmp_path, status):
    server.fail(FILE, status)
    with pytest.raises(AuthenticationError) as info:
        download_file(server.url(FILE), tmp_path / "f", headers={"Authorization": SECRET}, backoff=0)
    message = str(info.value)
    assert SECRET not in message
    assert "refused the credentials" in message and "API key" in message
    assert len(server.requests) == 1


def test_404_is_not_retried_and_names_url(server, tmp_path):
    url = server.url("/missing.nii.gz") + "?token=" + SECRET
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "f", backoff=0)
    assert not isinstance(info.value, AuthenticationError)
    assert "/missing.nii.gz" in str(info.value)
    assert SECRET not in str(info.value)
    assert len(server.requests) == 1


def test_other_client_error_is_not_retried(server, tmp_path):
    server.fail(FILE, 400)
    with pytest.raises(DownloadError, match="HTTP 400"):
        download_file(server.url(FILE), tmp_path / "f", backoff=0)
    assert len(server.requests) == 1


def test_md5_mismatch_deletes_file(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError) as info:
        download_file(server.url(FILE), dest, expected_md5="0" * 32)
    assert "0" * 32 in str(info.value) and md5(CONTENT) in str(info.value)
    assert not dest.exists() and not part_path(dest).exists()


def test_size_mismatch_deletes_file(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="expected 5"):
        download_file(server.url(FILE), dest, expected_size=5)
    assert not dest.exists() and not part_path(dest).exists()


def test_redirect_to_other_host_drops_caller_headers(server, tmp_path):
    server.add_redirect(FILE, server.url("/real.bin", host="localhost"))
    server.add_file("/real.bin", CONTENT)
    download_file(server.url(FILE), tmp_path / "f", headers={"X-Api-Key": SECRET})
    assert server.requests[0].headers["X-Api-Key"] == SECRET
    assert server.requests[1].path == "/real.bin"
    assert "X-Api-Key" not in server.requests[1].headers
    assert (tmp_path / "f").read_bytes() == CONTENT


def test_same_host_redirect_keeps_headers(server, tmp_path):
    server.add_redirect(FILE, server.url("/real.bin"))
    server.add_file("/real.bin", CONTENT)
    download_file(server.url(FILE), tmp_path / "f", headers={"X-Api-Key": SECRET})
    assert server.requests[1].headers["X-Api-Key"] == SECRET


def test_unreachable_server_raises_after_retries(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="after 2 attempts"):
        download_file(f"http://127.0.0.1:{port}/f", tmp_path / "f", retries=1, backoff=0, timeout=2)


def test_redact_url_hides_credentials_and_query():
    shown = redact_url("https://user:pw@example.org:8443/a/b.nii.gz?key=abc#frag")
    assert shown == "https://example.org:8443/a/b.nii.gz?..."


# --------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LACUNA_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert get_data_dir() == (tmp_path / "home" / ".cache" / "lacuna").resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert get_data_dir() == (tmp_path / "xdg" / "lacuna").resolve()
    monkeypatch.setenv("LACUNA_DATA_DIR", "~/data")
    assert get_data_dir() == (tmp_path / "home" / "data").resolve()
    assert get_data_dir().is_absolute()
    assert not get_data_dir().exists()


def test_data_dir_relative_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LACUNA_DATA_DIR", "rel")
    assert get_data_dir() == tmp_path.resolve() / "rel"


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "registry.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]
