"""The HTTP client: one session type, one retry policy, one status classification.

Retry policy (every request Lacuna makes):

* retried, with exponential backoff (``backoff * 2**attempt`` seconds): connection
  errors, time-outs, truncated or undecodable bodies, HTTP 408, 429 and 5xx;
* final at once: HTTP 401/403 (:class:`~lacuna.core.errors.AuthenticationError`), 404
  and other 4xx, and TLS failures (a certificate problem does not pass by retrying).

Header values (API keys) never enter a message, log record or exception; URLs are shown
without user info or query string (:func:`redact_url`), and the caller's headers are
dropped when a redirect leads to another host (:class:`Session`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from lacuna.core.errors import AuthenticationError, DownloadError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Defaults of :func:`fetch_policy`, read when it is called (tests shorten them).
RETRIES = 4
RETRY_BACKOFF_SECONDS = 1.0
TIMEOUT_SECONDS = 60.0

#: Statuses below 500 that are worth another attempt.
RETRY_STATUS = frozenset({408, 429})

#: Network failures worth another attempt (not programming or file-system errors).
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
)

DEFAULT_AUTH_HELP = (
    "Check the API key: supply a valid key for this server (or one at all, if the file "
    "needs it) and make sure it grants access to this file."
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is retried.

    Attributes
    ----------
    retries : int
        Further attempts after the first.
    backoff : float
        Seconds before the first retry; doubled for each later one.
    timeout : float
        Seconds to wait for the connection and for each read.
    """

    retries: int = RETRIES
    backoff: float = RETRY_BACKOFF_SECONDS
    timeout: float = TIMEOUT_SECONDS

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return self.backoff * 2**attempt


def fetch_policy() -> RetryPolicy:
    """The policy of large downloads and API calls (module defaults, read now)."""
    return RetryPolicy(RETRIES, RETRY_BACKOFF_SECONDS, TIMEOUT_SECONDS)


#: Small reference files (atlases, transforms): a failing source is reported within
#: seconds instead of after minutes of backoff.
SMALL_FILE_POLICY = RetryPolicy(retries=2, backoff=0.25)


class TransientError(Exception):
    """A failure of one attempt that a later attempt may not meet."""


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt (408, 429, 5xx)."""
    return status >= 500 or status in RETRY_STATUS


def check_status(status: int, shown: str, *, ok: tuple[int, ...] = (200,), auth_help: str = "") -> None:
    """Raise for a status outside ``ok``: the final error, or :class:`TransientError`.

    Raises
    ------
    AuthenticationError
        On 401/403 (with ``auth_help``, or how to check the key).
    DownloadError
        On 404 and other statuses that are not retried.
    TransientError
        On 408, 429 and 5xx.
    """
    if status in ok:
        return
    if status in (401, 403):
        raise AuthenticationError(
            f"the server refused the credentials for {shown} (HTTP {status}). {auth_help or DEFAULT_AUTH_HELP}"
        )
    if status == 404:
        raise DownloadError(f"{shown} was not found on the server (HTTP 404); check the URL.")
    if is_retryable_status(status):
        raise TransientError(f"HTTP {status}")
    raise DownloadError(f"the server answered HTTP {status} for {shown}; check the URL and the access rights.")


def with_retries(attempt: Callable[[], T], policy: RetryPolicy, what: str, give_up: Callable[[str], Exception]) -> T:
    """Run ``attempt`` until it does not raise :class:`TransientError`, at most
    ``policy.retries + 1`` times; then raise ``give_up(last error)``.

    ``what`` names the request in the warning logged before each retry
    (``"download of <url>"``).
    """
    for number in range(policy.retries + 1):
        try:
            return attempt()
        except TransientError as exc:
            if number == policy.retries:
                raise give_up(str(exc)) from exc
            delay = policy.delay(number)
            log.warning("%s failed (%s); retrying in %g s", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class Session(requests.Session):
    """A session that drops the caller's headers when a redirect changes host."""

    def __init__(self, private_headers=()):
        super().__init__()
        self._private = {name.lower() for name in private_headers}

    def rebuild_auth(self, prepared_request, response):
        """Strip credentials on a redirect to another host (requests hook)."""
        super().rebuild_auth(prepared_request, response)
        if self.should_strip_auth(response.request.url, prepared_request.url):
            for name in list(prepared_request.headers):
                if name.lower() in self._private:
                    del prepared_request.headers[name]


def redact_url(url: str) -> str:
    """``url`` without user info, query string or fragment (which may carry secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    query = "..." if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


_QUERY = re.compile(r"\?[^\s'\")]*")


def describe_error(exc: BaseException) -> str:
    """Short description of a network error, without query strings (tokens)."""
    name = type(exc).__name__
    reason = _QUERY.sub("?...", str(exc).split("\n", 1)[0])
    return f"{name}: {reason[:300]}" if reason else name


def tls_error(shown: str, exc: BaseException) -> DownloadError:
    """The final error of a failed TLS handshake."""
    return DownloadError(
        f"secure connection to {shown} failed ({describe_error(exc)}). Check the system "
        "clock and CA certificates (REQUESTS_CA_BUNDLE for a custom bundle)."
    )


def request_json(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    params=None,
    auth_help: str = "",
    policy: RetryPolicy | None = None,
) -> Any:
    """GET a JSON document under the retry policy (module docs).

    Parameters
    ----------
    url : str
        Address of the API call.
    headers : mapping, optional
        Request headers (API keys); their values never appear in messages.
    params : mapping, optional
        Query parameters.
    auth_help : str
        Sentence appended to authentication errors: how to get a valid key.
    policy : RetryPolicy, optional
        Default :func:`fetch_policy`.

    Raises
    ------
    AuthenticationError
        On HTTP 401/403.
    DownloadError
        On 404 or another client error, an invalid JSON body, or after the retries.
    """
    policy = policy or fetch_policy()
    shown = redact_url(url)

    def attempt() -> Any:
        # The causes of network errors are not chained: their text holds the full URL.
        with Session(set(headers or ())) as session:
            try:
                response = session.get(url, headers=dict(headers or {}), params=params, timeout=policy.timeout)
            except requests.exceptions.SSLError as exc:
                raise tls_error(shown, exc) from None
            except TRANSIENT_ERRORS as exc:
                raise TransientError(type(exc).__name__) from None
            except requests.RequestException as exc:
                raise DownloadError(f"cannot reach {shown}: {type(exc).__name__}") from None
        check_status(response.status_code, shown, auth_help=auth_help)
        try:
            return response.json()
        except ValueError as exc:
            raise DownloadError(f"{shown} did not answer with JSON; is it the right server?") from exc

    return with_retries(
        attempt,
        policy,
        f"request to {shown}",
        lambda last: DownloadError(
            f"could not reach {shown} after {policy.retries + 1} attempts (last error: {last}). Check the "
            "network connection and try again."
        ),
    )


def content_length(url: str, policy: RetryPolicy | None = None) -> int | None:
    """``Content-Length`` of ``url`` after redirects (a ``HEAD`` request), or None; errors
    are not fatal and not retried."""
    policy = policy or fetch_policy()
    try:
        with Session() as session:
            response = session.head(url, allow_redirects=True, timeout=policy.timeout)
    except requests.RequestException as exc:
        log.debug("HEAD %s failed (%s)", redact_url(url), type(exc).__name__)
        return None
    length = response.headers.get("Content-Length", "")
    if response.status_code == 200 and length.isdigit() and int(length) > 0:
        return int(length)
    return None
