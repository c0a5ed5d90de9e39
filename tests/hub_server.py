"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests: it serves folders as model repos the way the Hub
answers the requests huggingface_hub makes (repo info, the file tree, `resolve` with ETag / X-Repo-Commit / sizes,
range requests), and breaks on order: a gated repo, a file that is gone, a connection dropped mid-file.

Layout: ROOT/<org>/<name>/ is the repo `org/name`, at one commit (a hash of its files) that `main` names too.
Weights (`*.safetensors`) are LFS files: their ETag is their sha256, as on the Hub.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    repo: str
    file: str  # "" for API requests
    range: str | None
    auth: bool
    status: int
    revision: str = ""

    @property
    def downloads(self) -> bool:
        """A whole-file download (or its resumption), not a header's range request."""
        return self.method == "GET" and self.file != "" and (self.range is None or self.range.endswith("-"))


@dataclass
class _File:
    path: Path
    size: int
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else hashlib.sha1(self.path.read_bytes()).hexdigest()


@dataclass
class Faults:
    """What goes wrong, by file name (any repo)."""

    drop: set[str] = field(default_factory=set)  # downloads send half the bytes, then the connection drops
    gone_after_heads: dict[str, int] = field(default_factory=dict)  # 404 once this many HEADs were answered
    heads: dict[str, int] = field(default_factory=dict)


class HubServer:
    """Start with `HubServer(root)`; `url` is the HF_ENDPOINT; `requests` logs every request; `close()` stops it.
    `on_download(file, phase)` is called with "start" and "end" around every whole-file body sent."""

    def __init__(self, root: Path, gated: dict[str, str] | None = None) -> None:
        self.root = root
        self.gated = gated or {}  # repo id -> the token that may read it
        self.faults = Faults()
        self.requests: list[Request] = []
        self.on_download: Callable[[str, str], None] | None = None
        self._repos: dict[str, tuple[str, dict[str, _File]]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def repo(self, repo_id: str) -> tuple[str, dict[str, _File]] | None:
        """(commit, files) of a repo, read once."""
        folder = self.root / repo_id
        if ".." in repo_id.split("/") or not folder.is_dir():
            return None
        with self._lock:
            if repo_id not in self._repos:
                files = {}
                for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                    data = path.read_bytes()
                    rel = path.relative_to(folder).as_posix()
                    files[rel] = _File(path, len(data), hashlib.sha256(data).hexdigest(), rel.endswith(".safetensors"))
                commit = hashlib.sha1("".join(f"{r}:{f.sha256}" for r, f in files.items()).encode()).hexdigest()
                self._repos[repo_id] = (commit, files)
            return self._repos[repo_id]


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def _route(self) -> None:
            path = unquote(urlsplit(self.path).path)
            self._repo_id, self._file, self._revision = "", "", ""
            try:
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    self._info(m.group(1), m.group(2) or "main")
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
                    self._tree(m.group(1), m.group(2))
                elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    self._resolve(*m.groups())
                else:
                    print(f"hub_server: no route for {self.command} {self.path}")  # noqa: T201 - shown on failure
                    self._error(404, "NotFound", f"no route {path}")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _log(self, status: int) -> None:
            auth = bool(self.headers.get("Authorization"))
            request = Request(
                self.command, self._repo_id, self._file, self.headers.get("Range"), auth, status, self._revision
            )
            hub.requests.append(request)

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self._log(status)
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
            self._send(status, body, {**headers, **(extra or {})})

        def _open(self, repo_id: str, revision: str) -> tuple[str, dict[str, _File]] | None:
            """The repo, after the checks the Hub makes: it exists, the caller may read it, the revision exists."""
            self._repo_id, self._revision = repo_id, revision
            found = hub.repo(repo_id)
            if found is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            token = hub.gated.get(repo_id)
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                status = 403 if self.headers.get("Authorization") else 401
                self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
                return None
            if revision not in ("main", found[0]):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return found

        def _info(self, repo_id: str, revision: str) -> None:
            found = self._open(repo_id, revision)
            if found is not None:
                commit, files = found
                siblings = [{"rfilename": name} for name in files]
                body = {"id": repo_id, "sha": commit, "siblings": siblings, "private": False}
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _tree(self, repo_id: str, revision: str) -> None:
            found = self._open(repo_id, revision)
            if found is not None:
                entries = []
                for name, f in found[1].items():
                    oid = hashlib.sha1(name.encode()).hexdigest()
                    entry = {"type": "file", "oid": oid, "size": f.size, "path": name}
                    if f.lfs:
                        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 130}
                    entries.append(entry)
                self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, revision: str, name: str) -> None:
            found = self._open(repo_id, revision)
            if found is None:
                return
            commit, files = found
            self._file = name
            f = files.get(name)
            if self.command == "HEAD" and name in hub.faults.gone_after_heads:
                hub.faults.heads[name] = hub.faults.heads.get(name, 0) + 1
                if hub.faults.heads[name] > hub.faults.gone_after_heads[name]:
                    f = None
            if f is None:
                self._error(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": commit})
                return
            headers = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
            if f.lfs:
                headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
            start, end = 0, f.size - 1
            status = 200
            if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start, end = int(m.group(1)), min(int(m.group(2) or f.size - 1), f.size - 1)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
            body = f.path.read_bytes()[start : end + 1]
            whole = self.command == "GET" and (status == 200 or not m.group(2))
            if whole and name in hub.faults.drop:
                self._drop(status, headers, body, start)
                return
            if whole and hub.on_download:
                hub.on_download(name, "start")
            self._send(status, body, headers)
            if whole and hub.on_download:
                hub.on_download(name, "end")

        def _drop(self, status: int, headers: dict[str, str], body: bytes, start: int) -> None:
            """Send half the file (none of it when resuming), then cut the connection."""
            self._log(status)
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if start == 0:
                self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    return Handler
