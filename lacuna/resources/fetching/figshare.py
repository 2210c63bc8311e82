"""Figshare (API v2): list an article's files and download them with a personal token.

* ``GET {api}/articles/{id}/files`` with ``Authorization: token <key>`` lists
  ``{id, name, size, download_url, computed_md5}``;
* each file is downloaded from its ``download_url`` (redirects are followed; the token
  is only sent to the API's own site and never on to another host).

The API base is ``https://api.figshare.com/v2`` unless ``LACUNA_FIGSHARE_API_URL`` (or
an argument) names another.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from lacuna.core import settings
from lacuna.core.errors import DownloadError
from lacuna.net.http import redact_url, request_json
from lacuna.resources.fetching.remote import RemoteFile, download_remote, safe_filename

_PAGE_SIZE = 100
_MAX_PAGES = 50

AUTH_HELP = (
    "Create a Figshare personal token at https://figshare.com/account/applications "
    "(log in, 'Create Personal Token'); pass it with --api-key (add --save-key to store it in "
    "the data cache) or set FIGSHARE_API_KEY."
)


def figshare_api_url(api_url: str | None = None) -> str:
    """The Figshare API base: ``api_url``, else ``$LACUNA_FIGSHARE_API_URL``, else the
    public one."""
    return api_url.rstrip("/") if api_url else settings.figshare_api_url()


def _site(url: str) -> str:
    """The site of a URL: an IP address or host as is, else its last two labels
    (``ndownloader.figshare.com`` -> ``figshare.com``)."""
    host = (urlsplit(url).hostname or "").lower()
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return ".".join(host.split(".")[-2:])


class FigshareClient:
    """Client of the Figshare API v2.

    Parameters
    ----------
    api_url : str, optional
        API base (default: :func:`figshare_api_url`).
    api_key : str, optional
        Personal token, sent as ``Authorization: token <key>``; never shown.
    """

    def __init__(self, api_url: str | None = None, api_key: str | None = None):
        self.api_url = figshare_api_url(api_url)
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"FigshareClient(api_url={redact_url(self.api_url)!r})"

    def _headers(self, url: str) -> dict[str, str]:
        """The token header, only for addresses on the API's own site."""
        if self._api_key and _site(url) == _site(self.api_url):
            return {"Authorization": f"token {self._api_key}"}
        return {}

    def list_files(self, article_id: int | str) -> list[RemoteFile]:
        """The files of article ``article_id``.

        Raises
        ------
        AuthenticationError
            If the token is refused.
        DownloadError
            If the article is unknown or the answer is not a file list.
        """
        url = f"{self.api_url}/articles/{article_id}/files"
        files = []
        for entry in self._entries(url):
            if not isinstance(entry, dict) or not entry.get("download_url") or entry.get("is_link_only"):
                continue
            size = entry.get("size")
            files.append(
                RemoteFile(
                    name=safe_filename(entry.get("name"), redact_url(url)),
                    url=str(entry["download_url"]),
                    size=int(size) if isinstance(size, (int, float)) else None,
                    md5=entry.get("computed_md5") or entry.get("supplied_md5") or None,
                    file_id=str(entry.get("id")),
                )
            )
        return files

    def _entries(self, url: str) -> list:
        """Every entry of a paginated file list (a server that ignores ``page`` returns
        the whole list on the first page, which is then not asked for again)."""
        entries: list = []
        seen: set = set()
        for page in range(1, _MAX_PAGES + 1):
            params = {"page": page, "page_size": _PAGE_SIZE}
            answer = request_json(url, headers=self._headers(url), params=params, auth_help=AUTH_HELP)
            if not isinstance(answer, list):
                raise DownloadError(f"{redact_url(url)} did not return a file list")
            ids = [str(entry.get("id")) if isinstance(entry, dict) else repr(entry) for entry in answer]
            new = [entry for entry, key in zip(answer, ids) if key not in seen]
            seen.update(ids)
            entries.extend(new)
            if len(answer) < _PAGE_SIZE or not new:
                break
        return entries

    def download(
        self,
        remote: RemoteFile,
        dest: str | Path,
        *,
        verify: bool = True,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Download ``remote`` to ``dest`` (resuming a partial file; MD5 checked when
        ``verify`` and listed).

        Raises
        ------
        AuthenticationError
            If the token is refused (with how to get one).
        DownloadError
            On 404, a checksum mismatch, or when the retries are exhausted.
        """
        return download_remote(
            remote, dest, headers=self._headers(remote.url), auth_help=AUTH_HELP, verify=verify, progress=progress
        )
