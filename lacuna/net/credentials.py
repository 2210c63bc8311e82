"""API keys for the download sources: argument, environment variable, or config file.

Keys are looked up in that order (:func:`resolve_api_key`). The config file is
``<data dir>/credentials.json`` (``{"api_keys": {"dataverse": "...", "figshare":
"..."}}``), created with mode 0600 and replaced atomically by :func:`save_api_key`
(``lacuna fetch ... --api-key KEY --save-key``). A key is never logged, never put in an
exception message, a marker file, provenance or the connectome registry.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from lacuna.core import settings
from lacuna.core.datadir import get_data_dir
from lacuna.core.errors import AuthenticationError

log = logging.getLogger(__name__)

CREDENTIALS_FILE = "credentials.json"

#: Environment variable of each service's key.
ENV_VARS = settings.API_KEY_VARIABLES

#: The key service of each fetchable connectome (those without one need no key).
SERVICE_OF_SOURCE = {"gsp1000": "dataverse", "dtor985": "figshare"}


def credentials_path() -> Path:
    """The API-key config file: ``<data dir>/credentials.json``."""
    return get_data_dir() / CREDENTIALS_FILE


def _check_service(service: str) -> str:
    if service not in ENV_VARS:
        raise ValueError(f"unknown key service {service!r}; known: {', '.join(ENV_VARS)}")
    return service


def _clean(key: str | None, origin: str) -> str | None:
    """The key without surrounding whitespace; None if empty. Refuses control characters
    and inner whitespace, which would otherwise surface in an HTTP library's error message."""
    if key is None:
        return None
    key = str(key).strip()
    if not key:
        return None
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise AuthenticationError(
            f"the API key from {origin} contains whitespace or control characters; copy the "
            "key again (a token is one word)"
        )
    return key


def _read_file() -> dict:
    path = credentials_path()
    if not path.is_file():
        return {}
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o); run `chmod 600 %s`", path, mode, path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        keys = content.get("api_keys", {})
        if not isinstance(keys, dict):
            raise TypeError("'api_keys' is not an object")
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring the unreadable credentials file %s (%s)", path, type(exc).__name__)
        return {}
    return keys


def load_api_key(service: str) -> str | None:
    """The key of ``service`` stored in the credentials file, or None.

    Parameters
    ----------
    service : {"dataverse", "figshare"}
    """
    return _clean(_read_file().get(_check_service(service)), str(credentials_path()))


def resolve_api_key(service: str, explicit: str | None = None) -> str | None:
    """The key of ``service``: ``explicit``, else its environment variable
    (``DATAVERSE_API_KEY`` / ``FIGSHARE_API_KEY``), else the credentials file.

    Returns
    -------
    str or None
        None when no key is configured.

    Raises
    ------
    AuthenticationError
        If the key found contains whitespace or control characters.
    """
    variable = ENV_VARS[_check_service(service)]
    return (
        _clean(explicit, "the argument")
        or _clean(settings.api_key(service), f"${variable}")
        or load_api_key(service)
    )


def save_api_key(service: str, key: str) -> Path:
    """Store ``key`` for ``service`` in the credentials file (mode 0600, atomic).

    Returns
    -------
    Path
        The credentials file.
    """
    _check_service(service)
    key = _clean(key, "the argument")
    if key is None:
        raise ValueError("no API key to save")
    keys = _read_file()
    keys[service] = key
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{CREDENTIALS_FILE}.tmp-{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump({"api_keys": keys}, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    log.info("saved the %s API key to %s", service, path)
    return path
