"""Resumable file downloads: resume, retries, checksum, atomic rename.

:func:`download_file` is the single way Lacuna fetches a file, from a small atlas to a
100 GB connectome. It streams into ``<dest>.part`` and renames that to ``dest`` only
once it is complete (and its MD5 matches, when one is given); it resumes an existing
``.part`` with an HTTP ``Range`` request (206: append; 200: the server ignored the
range, start again from zero; 416: the part is already complete); it retries under the
policy of :mod:`lacuna.net.http`. A plain path or ``file://`` URL (a mirror that is a
folder) is copied.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import requests

from lacuna.core.errors import DownloadError
from lacuna.net.http import (
    SMALL_FILE_POLICY,
    TRANSIENT_ERRORS,
    RetryPolicy,
    Session,
    TransientError,
    check_status,
    describe_error,
    redact_url,
    tls_error,
    with_retries,
)

log = logging.getLogger(__name__)

_HASH_BLOCK = 1 << 20
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")

ProgressCallback = Callable[[int, "int | None"], None]

#: Retry policy for small reference files (atlases, transforms).
SMALL_FILE_RETRIES = SMALL_FILE_POLICY.retries
SMALL_FILE_BACKOFF = SMALL_FILE_POLICY.backoff


def md5_file(path: str | Path) -> str:
    """Hexadecimal MD5 of a file's content."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def part_path(dest: str | Path) -> Path:
    """The partial file a download of ``dest`` is written to."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def download_file(
    url: str,
    dest: str | Path,
    *,
    headers: Mapping[str, str] | None = None,
    expected_md5: str | None = None,
    expected_size: int | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60,
    progress: ProgressCallback | None = None,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest``, resuming, retrying and verifying as needed.

    Parameters
    ----------
    url : str
        HTTP(S) address (redirects are followed), or a local file: a ``file://`` URL or
        a plain path (a mirror that is a folder), which is copied.
    dest : str or Path
        Final path. Its directory is created. An existing file is replaced.
    headers : mapping, optional
        Extra request headers (e.g. an API key). Their values are never logged, and they
        are not sent on to another host after a redirect.
    expected_md5 : str, optional
        Hexadecimal MD5 the file must have; on mismatch the file is deleted.
    expected_size : int, optional
        Size in bytes the file must have; also the progress total when the server
        does not announce one.
    retries : int
        Further attempts after the first on transient failures.
    backoff : float
        Seconds before the first retry; doubled for each later one.
    timeout : float
        Seconds to wait for the connection and for each read.
    progress : callable, optional
        Called as ``progress(bytes_done, bytes_total)`` while downloading;
        ``bytes_total`` is None when unknown.
    chunk_size : int
        Bytes read per chunk.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    AuthenticationError
        If the server refuses the credentials (HTTP 401/403).
    DownloadError
        On 404 or another client error, on a checksum or size mismatch, or when all
        attempts failed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    local = _local_source(url)
    if local is not None:
        return _copy_local(local, dest, part, expected_md5, expected_size, progress)
    shown = redact_url(url)
    policy = RetryPolicy(retries, backoff, timeout)
    with Session(set(headers or ())) as session:
        with_retries(
            lambda: _fetch(session, url, part, headers, timeout, chunk_size, progress, expected_size),
            policy,
            f"download of {shown}",
            lambda last: DownloadError(
                f"could not download {shown} after {retries + 1} attempts "
                f"(last error: {last}). Check the network connection and try "
                f"again; what was received is kept in {part} and resumed next time."
            ),
        )
    _verify(part, shown, expected_md5, expected_size)
    os.replace(part, dest)
    log.debug("downloaded %s to %s", shown, dest)
    return dest


def _local_source(url: str) -> Path | None:
    """The local file a ``file://`` URL or a plain path names; None for other schemes."""
    if url.startswith("file:"):
        return Path(url2pathname(urlsplit(url).path))
    if "://" not in url:
        return Path(url)
    return None


def _copy_local(
    source: Path, dest: Path, part: Path, expected_md5: str | None, expected_size: int | None, progress: ProgressCallback | None
) -> Path:
    """Copy a file of a local mirror as :func:`download_file` stores a download."""
    if not source.is_file():
        raise DownloadError(f"{source} does not exist; check the mirror folder (or file:// URL) and the file name")
    shutil.copyfile(source, part)
    if progress is not None:
        size = part.stat().st_size
        progress(size, size)
    _verify(part, str(source), expected_md5, expected_size)
    os.replace(part, dest)
    log.debug("copied %s to %s", source, dest)
    return dest


def _fetch(
    session: requests.Session,
    url: str,
    part: Path,
    headers: Mapping[str, str] | None,
    timeout: float,
    chunk_size: int,
    progress: ProgressCallback | None,
    expected_size: int | None,
) -> None:
    """One attempt: bring ``part`` up to the full file, or raise."""
    shown = redact_url(url)
    offset = part.stat().st_size if part.exists() else 0
    request_headers = {"Accept-Encoding": "identity", **dict(headers or {})}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    # The causes of network errors are not chained: their text holds the full URL.
    try:
        with session.get(url, headers=request_headers, stream=True, timeout=timeout) as resp:
            start, total = _check_response(resp, shown, offset, part)
            if start is None:
                return
            _write_body(resp, part, start, total or expected_size, chunk_size, progress)
    except requests.exceptions.SSLError as exc:
        raise tls_error(shown, exc) from None
    except TRANSIENT_ERRORS as exc:
        raise TransientError(describe_error(exc)) from None
    except requests.RequestException as exc:
        raise DownloadError(f"cannot download {shown}: {describe_error(exc)}") from None


def _check_response(
    resp: requests.Response, shown: str, offset: int, part: Path
) -> tuple[int | None, int | None]:
    """Classify a response: ``(start offset, total size)``, or ``(None, None)`` when the
    part is already complete. Raises the final or transient error otherwise."""
    status = resp.status_code
    if status == 416 and offset:
        total = _content_range_total(resp.headers.get("Content-Range", ""))
        if total is None or total == offset:
            return None, None
        part.unlink(missing_ok=True)
        raise TransientError(f"partial file of {offset} bytes does not fit a {total}-byte file")
    check_status(status, shown, ok=(200, 206))
    if status == 206:
        match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            part.unlink(missing_ok=True)
            raise TransientError("server sent an unexpected byte range; starting again")
        total = None if match.group(3) == "*" else int(match.group(3))
        return offset, total
    if offset:
        log.debug("server ignored the range request for %s; starting from zero", shown)
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _content_range_total(value: str) -> int | None:
    """Total size from a ``Content-Range`` header (``bytes */N`` or ``bytes a-b/N``)."""
    match = re.search(r"/(\d+)\s*$", value)
    return int(match.group(1)) if match else None


def _write_body(
    resp: requests.Response,
    part: Path,
    start: int,
    total: int | None,
    chunk_size: int,
    progress: ProgressCallback | None,
) -> None:
    """Append (``start > 0``) or write the body to ``part``; raise if it ends early."""
    done = start
    with open(part, "ab" if start else "wb") as handle:
        if progress:
            progress(done, total)
        for chunk in resp.raw.stream(chunk_size, decode_content=False):
            handle.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    if total is not None and done < total:
        raise TransientError(f"connection closed after {done} of {total} bytes")


def _verify(part: Path, shown: str, expected_md5: str | None, expected_size: int | None) -> None:
    """Check size and MD5 of the finished part; delete it and raise on mismatch."""
    if expected_size is not None:
        size = part.stat().st_size
        if size != expected_size:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{shown}: downloaded {size} bytes but expected {expected_size}; the file "
                "was deleted. Try again; if it persists the source has changed."
            )
    if expected_md5 is not None:
        got = md5_file(part)
        if got.lower() != expected_md5.strip().lower():
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{shown}: MD5 checksum mismatch (expected {expected_md5}, got {got}); the "
                "file was deleted. Try again; if it persists the source has changed."
            )
