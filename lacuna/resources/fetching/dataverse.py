"""Dataverse (native API): list a dataset's files and download them with an API key.

* ``GET {server}/api/datasets/:persistentId/versions/:latest/files?persistentId=<doi>``
  lists the files (``data[].dataFile.{id, filename, filesize, checksum}``);
* ``GET {server}/api/access/datafile/{id}`` downloads one, with the header
  ``X-Dataverse-key: <key>``; partial files are resumed with HTTP ``Range``
  (:func:`lacuna.net.download.download_file`).

The server is ``https://dataverse.harvard.edu`` unless ``LACUNA_DATAVERSE_URL`` (or an
argument) names another (a mirror, a test server).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from lacuna.core import settings
from lacuna.core.errors import DownloadError
from lacuna.net.http import redact_url, request_json
from lacuna.resources.fetching.remote import RemoteFile, download_remote, safe_filename

log = logging.getLogger(__name__)

AUTH_HELP = (
    "Get a Harvard Dataverse API token: log in at https://dataverse.harvard.edu, open the "
    "account menu (your name), choose 'API Token' and create one; your account also needs "
    "access to the GSP1000 files (accept the dataset's terms of use). Pass the token with "
    "--api-key (add --save-key to store it in the data cache) or set DATAVERSE_API_KEY."
)


def dataverse_server(server: str | None = None) -> str:
    """The Dataverse server: ``server``, else ``$LACUNA_DATAVERSE_URL``, else Harvard's."""
    return server.rstrip("/") if server else settings.dataverse_url()


class DataverseClient:
    """Client of one Dataverse server.

    Parameters
    ----------
    server : str, optional
        Base URL of the server (default: :func:`dataverse_server`).
    api_key : str, optional
        API token, sent as ``X-Dataverse-key``; never shown in ``repr`` or messages.
    """

    def __init__(self, server: str | None = None, api_key: str | None = None):
        self.server = dataverse_server(server)
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"DataverseClient(server={redact_url(self.server)!r})"

    def _headers(self) -> dict[str, str]:
        return {"X-Dataverse-key": self._api_key} if self._api_key else {}

    def list_files(self, persistent_id: str) -> list[RemoteFile]:
        """The files of the latest version of dataset ``persistent_id``.

        Returns
        -------
        list of RemoteFile
            With sizes and MD5 checksums where the server lists them.

        Raises
        ------
        AuthenticationError
            If the key is refused.
        DownloadError
            If the dataset is unknown or the answer is not a file list.
        """
        url = f"{self.server}/api/datasets/:persistentId/versions/:latest/files"
        answer = request_json(
            url, headers=self._headers(), params={"persistentId": persistent_id}, auth_help=AUTH_HELP
        )
        entries = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(answer, dict) or answer.get("status") != "OK" or not isinstance(entries, list):
            raise DownloadError(
                f"{redact_url(url)} did not return a file list for {persistent_id} "
                f"(status {answer.get('status') if isinstance(answer, dict) else '?'!r})"
            )
        return [self._remote_file(entry, url) for entry in entries]

    def _remote_file(self, entry: dict, list_url: str) -> RemoteFile:
        data = entry.get("dataFile") if isinstance(entry, dict) else None
        if not isinstance(data, dict) or data.get("id") is None:
            raise DownloadError(f"{redact_url(list_url)} lists an entry without dataFile.id")
        name = safe_filename(data.get("filename") or entry.get("label"), redact_url(list_url))
        checksum = data.get("checksum") or {}
        md5 = checksum.get("value") if str(checksum.get("type", "")).upper() == "MD5" else data.get("md5")
        if not md5:
            log.warning("%s: no MD5 checksum listed; it will not be verified", name)
        size = data.get("filesize")
        return RemoteFile(
            name=name,
            url=f"{self.server}/api/access/datafile/{data['id']}",
            size=int(size) if isinstance(size, (int, float)) or str(size).isdigit() else None,
            md5=md5 or None,
            file_id=str(data["id"]),
        )

    def download(
        self,
        remote: RemoteFile,
        dest: str | Path,
        *,
        verify: bool = True,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Download ``remote`` to ``dest`` (resuming a partial file).

        Parameters
        ----------
        verify : bool
            Check the listed size and MD5 (a mismatch deletes the file and raises).
        progress : callable, optional
            ``progress(bytes_done, bytes_total)``.

        Raises
        ------
        AuthenticationError
            If the key is refused (with how to get one).
        DownloadError
            On 404, a checksum mismatch, or when the retries are exhausted.
        """
        return download_remote(
            remote, dest, headers=self._headers(), auth_help=AUTH_HELP, verify=verify, progress=progress
        )
