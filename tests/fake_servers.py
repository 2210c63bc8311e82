"""Local HTTP servers for the tests (127.0.0.1, port 0): :class:`FolderServer` serves a
folder; :class:`FakeServer` speaks just enough of the Dataverse, Figshare and GitHub
release APIs to drive :mod:`lacuna.resources.fetching` end to end.

:class:`FakeServer` serves registered routes: files (with HTTP ``Range``), JSON
documents, redirects; each can require a header (an API key). Per-path fault queues
script failures: an HTTP status code, ``"cut"`` (announce the whole body, send half,
close the connection) or ``"ignore-range"``. Every request is recorded (method, path, query, headers, bytes
sent).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


@dataclass
class Route:
    kind: str  # "file", "json" or "redirect"
    payload: object  # bytes, JSON-able object or callable(query) -> (status, obj), or a URL
    auth: tuple[str, str] | None = None  # (header, expected value)
    auth_status: int = 401


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    sent: int = 0
    status: int = 0
    range_start: int | None = None
    extra: dict = field(default_factory=dict)


class _LocalServer:
    """An HTTP server on 127.0.0.1 that serves on a background thread while used as a
    context manager."""

    def _serve(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeServer(_LocalServer):
    """A scripted local HTTP server (use as a context manager)."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.faults: dict[str, list] = defaultdict(list)
        self.requests: list[Recorded] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self, "GET")

            def do_HEAD(self):
                server.handle(self, "HEAD")

        self._serve(Handler)

    # -- set-up -----------------------------------------------------------------------

    def url(self, path: str = "", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add_file(self, path: str, content: bytes, auth=None, auth_status=401) -> None:
        self.routes[path] = Route("file", content, auth, auth_status)

    def add_json(self, path: str, payload, auth=None, auth_status=401) -> None:
        self.routes[path] = Route("json", payload, auth, auth_status)

    def add_redirect(self, path: str, location: str) -> None:
        self.routes[path] = Route("redirect", location)

    def fail(self, path: str, *actions) -> None:
        """Queue failures for the next requests of ``path``: status codes, ``"cut"``, or
        ``"ignore-range"`` (answer 200 with the whole file despite a Range header)."""
        self.faults[path].extend(actions)

    # -- inspection -------------------------------------------------------------------

    def hits(self, path: str, method: str = "GET") -> list[Recorded]:
        return [r for r in self.requests if r.path == path and r.method == method]

    def reset_log(self) -> None:
        self.requests.clear()

    # -- serving ----------------------------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        record = Recorded(method, parts.path, parse_qs(parts.query), dict(handler.headers))
        self.requests.append(record)
        route = self.routes.get(parts.path)
        if route is None:
            return self._empty(handler, record, 404)
        if route.auth is not None and handler.headers.get(route.auth[0]) != route.auth[1]:
            return self._json(handler, record, route.auth_status, {"status": "ERROR", "message": "Bad api key"})
        action = self.faults[parts.path].pop(0) if self.faults[parts.path] and method == "GET" else "ok"
        if isinstance(action, int):
            return self._empty(handler, record, action)
        if route.kind == "redirect":
            handler.send_response(302)
            handler.send_header("Location", route.payload)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            record.status = 302
            return None
        if route.kind == "json":
            payload = route.payload
            status, body = payload(record.query) if callable(payload) else (200, payload)
            return self._json(handler, record, status, body)
        return self._file(handler, record, route.payload, action, method)

    def _empty(self, handler, record, status: int) -> None:
        record.status = status
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _json(self, handler, record, status: int, body) -> None:
        data = json.dumps(body).encode()
        record.status = status
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        record.sent = len(data)

    def _file(self, handler, record, content: bytes, action: str, method: str) -> None:
        start = 0
        range_header = handler.headers.get("Range")
        if range_header and action != "ignore-range":
            start = int(range_header.split("=")[1].split("-")[0])
            record.range_start = start
            if start >= len(content):
                record.status = 416
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(content)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            record.status = 206
        else:
            handler.send_response(200)
            record.status = 200
        body = content[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "application/octet-stream")
        if action == "cut":
            handler.send_header("Connection", "close")
        handler.end_headers()
        if method == "HEAD":
            return
        if action == "cut":
            half = body[: len(body) // 2]
            handler.wfile.write(half)
            handler.wfile.flush()
            record.sent = len(half)
            handler.close_connection = True
            return
        handler.wfile.write(body)
        record.sent = len(body)

class FolderServer(_LocalServer):
    """Serve a folder on 127.0.0.1 (use as a context manager); ``url`` is its base URL
    and ``paths`` the paths requested."""

    def __init__(self, folder: Path):
        self.paths: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.paths.append(self.path)
                super().do_GET()

        self._serve(functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.port}"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------------------
# Dataverse
# --------------------------------------------------------------------------------------

LIST_PATH = "/api/datasets/:persistentId/versions/:latest/files"


def datafile_path(file_id: int) -> str:
    return f"/api/access/datafile/{file_id}"


def serve_dataverse(server: FakeServer, key: str, persistent_id: str, files: list[dict]) -> None:
    """A Dataverse dataset: ``files`` are dicts ``{id, name, content}`` with optional
    ``md5`` (listed checksum, default the true one), ``listed_only`` (listed but not
    served: 404) and ``access_status`` (status of a refused download, default 401)."""
    auth = ("X-Dataverse-key", key)

    def listing(query):
        if query.get("persistentId") != [persistent_id]:
            return 404, {"status": "ERROR", "message": "dataset not found"}
        data = [
            {
                "label": f["name"],
                "restricted": True,
                "dataFile": {
                    "id": f["id"],
                    "filename": f["name"],
                    "filesize": len(f["content"]),
                    "checksum": {"type": "MD5", "value": f.get("md5", md5(f["content"]))},
                },
            }
            for f in files
        ]
        return 200, {"status": "OK", "data": data}

    server.add_json(LIST_PATH, listing, auth=auth)
    for f in files:
        if not f.get("listed_only"):
            server.add_file(datafile_path(f["id"]), f["content"], auth=auth, auth_status=f.get("access_status", 401))


# --------------------------------------------------------------------------------------
# Figshare
# --------------------------------------------------------------------------------------


def serve_figshare(server: FakeServer, key: str, article_id: int, files: list[dict], download_host: str = "127.0.0.1") -> None:
    """A Figshare article: ``files`` are dicts ``{id, name, content}``; downloads are
    served at ``/ndownloader/files/<id>`` on ``download_host`` (another host name
    than the API's to check that the token is not sent there)."""
    listing = [
        {
            "id": f["id"],
            "name": f["name"],
            "size": len(f["content"]),
            "is_link_only": False,
            "download_url": server.url(f"/ndownloader/files/{f['id']}", host=download_host),
            "supplied_md5": "",
            "computed_md5": f.get("md5", md5(f["content"])),
        }
        for f in files
    ]
    server.add_json(f"/v2/articles/{article_id}/files", listing, auth=("Authorization", f"token {key}"), auth_status=403)
    for f in files:
        server.add_file(f"/ndownloader/files/{f['id']}", f["content"])


# --------------------------------------------------------------------------------------
# GitHub release
# --------------------------------------------------------------------------------------

RELEASE_PATH = "/frankyeh/data-atlas/releases/download/hcp1065/hcp1065_avg_tracts_trk.zip"
ASSET_PATH = "/release-assets/123456/hcp1065_avg_tracts_trk.zip"


def serve_github_release(server: FakeServer, content: bytes) -> str:
    """A release asset behind a redirect, as GitHub serves them; returns its URL."""
    server.add_redirect(RELEASE_PATH, server.url(ASSET_PATH))
    server.add_file(ASSET_PATH, content)
    return server.url(RELEASE_PATH)
