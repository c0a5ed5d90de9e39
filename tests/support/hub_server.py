"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests: it serves folders as model repos the way the Hub
answers the requests huggingface_hub makes (repo info, the file tree, `resolve` with ETag / X-Repo-Commit / sizes,
range requests), takes uploads the way huggingface_hub's own client makes them, by classic LFS
(HF_HUB_DISABLE_XET=1: the LFS batch API, a PUT per object) and by Xet (hf_xet installed: a write token whose CAS is
the repo's own folder, as hf_xet's local:// store; a commit's file is rebuilt from it with hf_xet and checked), with
create_repo, preupload, create_commit, create_branch and pull requests, and breaks on order: a gated repo, a file
that is gone, a connection dropped mid-file, an upload refused, a commit that fails, a slow link.

Layout: ROOT/<org>/<name>/ is the repo `org/name`, at one commit (a hash of its files) that `main` names too.
Weights (`*.safetensors`) are LFS files: their ETag is their sha256, as on the Hub.

Uploaded repos live in memory; the bytes they hold live in a store folder (`store`, a temporary folder unless
given), one file per sha256. A commit is atomic: nothing of it shows (info, tree, resolve) before its request
succeeds; then its revision names a new commit holding the whole file set. Every commit is kept:
`commits(repo_id, revision)` walks a revision's history, oldest first.

Auth: `tokens` maps a token to (user, role "read" | "write"); `orgs` maps an organization to its members. Writing
to a repo needs a write token whose user is the repo's namespace or a member of that organization: no token or an
unknown one -> 401, a read token or another namespace -> 403 (errors with X-Error-Code / X-Error-Message, which
huggingface_hub turns into HfHubHTTPError and its subclasses).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024  # bytes: a file above it is uploaded as LFS whatever its name, as on the Hub
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")  # repocard's


@dataclass
class Request:
    method: str
    repo: str
    file: str  # "" for API requests; the sha256 for an LFS upload (PUT)
    range: str | None
    auth: bool
    status: int
    revision: str = ""
    kind: str = ""  # info, tree, resolve, refs, commits, whoami, create, validate-yaml, preupload, batch, upload,
    # verify, commit, branch

    @property
    def downloads(self) -> bool:
        """A whole-file download (or its resumption), not a header's range request."""
        return self.method == "GET" and self.file != "" and (self.range is None or self.range.endswith("-"))


class Generated(Protocol):
    """A file whose bytes are made as they are sent, never stored whole (a terabyte repo on a small disk)."""

    size: int
    sha256: str  # what the tree lists: the bytes' own where the maker can afford to hash them all, else made up

    def chunks(self, start: int, length: int) -> Iterator[memoryview | bytes]: ...


@dataclass
class _File:
    path: Path  # where its bytes are: the repo folder's file, or the store's object
    size: int
    sha256: str
    lfs: bool
    oid: str  # its git blob id: of the bytes, or of the LFS pointer for an LFS file (as the Hub's tree lists it)
    generated: Generated | None = None  # bytes made as they are sent (`HubServer.add_generated`), not at `path`

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    id: str
    summary: str
    description: str
    parent: str | None
    files: dict[str, _File]  # path in the repo -> file: the whole tree at this commit
    author: str = ""
    date: str = ""


@dataclass
class _Repo:
    id: str
    private: bool
    commits: dict[str, Commit]
    refs: dict[str, str]  # "main", other branches, "refs/pr/N" -> commit id
    lfs: dict[str, Path] = field(default_factory=dict)  # sha256 -> bytes: the LFS objects this repo holds
    prs: int = 0
    xet: Path | None = None  # this repo's Xet store (hf_xet's local:// CAS): what was uploaded by Xet, uncommitted


@dataclass
class Faults:
    """What goes wrong, by file name (any repo), and for uploads."""

    drop: set[str] = field(default_factory=set)  # downloads send half the bytes, then the connection drops
    gone_after_heads: dict[str, int] = field(default_factory=dict)  # 404 once this many HEADs were answered
    heads: dict[str, int] = field(default_factory=dict)
    # LFS PUTs: once this many were let in (counted in `uploads`, whatever their outcome), each further one gets 403
    refuse_upload_after: int | None = None
    uploads: int = 0  # LFS PUTs let in
    refused: int = 0  # LFS PUTs refused by refuse_upload_after
    drop_uploads: int = 0  # this many LFS PUTs are cut off halfway (the connection closed, nothing stored)
    stored: int = 0  # LFS objects stored
    delete_repo_after: int | None = None  # once this many LFS objects are stored, the repo is deleted
    fail_commit: bool = False  # every commit request gets a 500 and changes nothing
    misreport: dict[str, str] = field(default_factory=dict)  # file -> "size" | "sha256": the tree lists it wrong
    lagging_commits: int = 0  # this many commits are answered as the Hub does while its storage lags an upload
    lose_commit_answer: bool = False  # a commit lands, then its connection closes with no answer (a proxy's reset)
    before_commit: Callable[[], None] | None = None  # called as a commit comes in: a concurrent push, say
    lose_in_commit: str | None = None  # a commit answers success but leaves this file out (a Hub bug, say)
    # Requests the stand-in takes and never answers (a proxy that black-holes, a stalled load balancer), by the name
    # of the handler that would answer them: "whoami", "info", "tree", "preupload", "commit", "resolve", ...
    silent: set[str] = field(default_factory=set)
    # A link this fast (bytes per second), each direction shared by all connections: download bodies (resolve) and
    # upload bodies (LFS PUTs) are paced as they stream. None: as fast as it goes.
    throttle_bytes_per_s: float | None = None


class _Link:
    """One direction of a paced link: each chunk waits for its turn, whichever connection sends it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free = 0.0

    def pace(self, n: int, rate: float | None) -> None:
        if not rate:
            return
        with self._lock:
            start = max(time.monotonic(), self._free)
            self._free = start + n / rate
            until = self._free
        time.sleep(max(0.0, until - time.monotonic()))


def _chunk(rate: float | None) -> int:
    """Bytes written or read at once: small enough on a slow link that pacing is smooth."""
    return _CHUNK if not rate else int(min(_CHUNK, max(1024, rate / 50)))


def git_oid(data: bytes) -> str:
    """The git blob id of these bytes (what the Hub calls a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _lfs_file(path: Path, sha256: str, size: int) -> _File:
    return _File(path, size, sha256, True, git_oid(_pointer(sha256, size)))


def _file_chunks(path: Path, start: int, length: int, size: int) -> Iterator[bytes]:
    """A file's bytes [start, start + length), `size` at a time."""
    with open(path, "rb") as file:
        file.seek(start)
        while length > 0:
            data = file.read(min(size, length))
            if not data:
                raise ConnectionResetError(f"{path} is shorter than it was")
            yield data
            length -= len(data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _must_be_lfs(path: str, size: int) -> bool:
    """What the preupload endpoint answers: weights and big files go by LFS (an empty file never does)."""
    return size > 0 and (path.endswith(".safetensors") or size > LFS_THRESHOLD)


def _xet_hex(raw: bytes) -> str:
    """A Xet hash as hf_xet prints it: four little-endian u64s, each in hex."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def xet_files(store: Path) -> dict[str, tuple[str, int]]:
    """sha256 -> (Xet file hash, size) of every file the shards in a local:// Xet store record (hf_xet 1.x's shard
    format: a 48-byte header, then per file a 48-byte record (hash, flags, segment count), its segments (48 bytes
    each, the u32 at 36 their unpacked size), verification entries (flag bit 31) and a metadata entry holding the
    sha256 (bit 30), up to a record of all-0xff)."""
    found = {}
    for path in sorted((store / "xet" / "xorbs" / "shards").glob("*.mdb")):
        data = path.read_bytes()
        if not data.startswith(b"HFRepoMetaData"):
            continue
        at = 48
        while at + 48 <= len(data) and data[at : at + 32] != b"\xff" * 32:
            file_hash = _xet_hex(data[at : at + 32])
            flags, n = struct.unpack_from("<II", data, at + 32)
            at += 48
            size = sum(struct.unpack_from("<I", data, at + 48 * i + 36)[0] for i in range(n))
            at += 48 * n
            if flags & (1 << 31):
                at += 48 * n
            if flags & (1 << 30):
                found[_xet_hex(data[at : at + 32])] = (file_hash, size)
                at += 48
    return found


def disk_bytes(*folders: Path) -> int:
    """Bytes of the regular files under these folders (links count nothing: they point at blobs), for tests and the
    bench that watch a run's disk. The run goes on while this looks: what vanishes meanwhile counts nothing."""
    total = 0
    for folder in folders:
        try:
            paths = list(folder.rglob("*"))
        except OSError:
            continue
        for path in paths:
            try:
                if not path.is_symlink():
                    total += path.stat().st_size if path.is_file() else 0
            except OSError:
                continue
    return total


class HTTPError(Exception):
    """An answer with an error, raised inside a handler."""

    def __init__(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra or {}


class HubServer:
    """Start with `HubServer(root)`; `url` is the HF_ENDPOINT; `requests` logs every request; `close()` stops it.
    `on_download(file, phase)` is called with "start" and "end" around every whole-file body sent.

    `tokens`: token -> (user, "read" | "write"), for uploads and whoami; `orgs`: organization -> its members;
    `gated`: repo id -> the one token that may read it; `store`: where uploaded bytes go (a temporary folder, removed
    by close(), unless given)."""

    def __init__(
        self,
        root: Path,
        gated: dict[str, str] | None = None,
        tokens: dict[str, tuple[str, str]] | None = None,
        orgs: dict[str, set[str]] | None = None,
        store: Path | None = None,
    ) -> None:
        self.root = root
        self.gated = gated or {}  # repo id -> the token that may read it
        self.tokens = tokens or {}
        self.orgs = orgs or {}
        self.faults = Faults()
        self.requests: list[Request] = []
        self.on_download: Callable[[str, str], None] | None = None
        self._own_store = store is None
        # False: an LFS upload's bytes are hashed and checked (size, sha256) as they come, then dropped; the store
        # keeps a sparse file of that size in their place (a terabyte output on a small disk).
        self.keep_uploads = True
        self.store = Path(tempfile.mkdtemp(prefix="hub-store-")) if store is None else store
        (self.store / "objects").mkdir(parents=True, exist_ok=True)
        (self.store / "tmp").mkdir(parents=True, exist_ok=True)
        self._repos: dict[str, _Repo] = {}
        self._uploads: dict[str, tuple[str, str, int]] = {}  # an upload URL's secret -> (repo, sha256, size)
        self._serial = 0
        self._lock = threading.RLock()
        self._down, self._up = _Link(), _Link()
        self._closing = threading.Event()  # set by close(): requests held unanswered (faults.silent) end
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        if self._own_store:
            shutil.rmtree(self.store, ignore_errors=True)

    # What tests read.

    def repo(self, repo_id: str) -> tuple[str, dict[str, _File]] | None:
        """(commit, files) of a repo's `main`."""
        found = self._get(repo_id)
        if found is None:
            return None
        with self._lock:
            commit = found.commits[found.refs["main"]]
            return commit.id, dict(commit.files)

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """A revision's history, oldest first (a new repo's first commit is empty); [] for an unknown repo or
        revision."""
        found = self._get(repo_id)
        if found is None:
            return []
        with self._lock:
            commit = self._commit(found, revision)
            history = []
            while commit is not None:
                history.append(commit)
                commit = found.commits.get(commit.parent) if commit.parent else None
            return history[::-1]

    def refs(self, repo_id: str) -> dict[str, str]:
        """Branches and pull requests ("refs/pr/N") -> their commit id; {} for an unknown repo."""
        found = self._get(repo_id)
        with self._lock:
            return dict(found.refs) if found else {}

    def lfs_objects(self, repo_id: str) -> dict[str, int]:
        """The LFS objects a repo holds (uploaded, or in its folder): sha256 -> size."""
        found = self._get(repo_id)
        with self._lock:
            return {sha: path.stat().st_size for sha, path in found.lfs.items()} if found else {}

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """A file's bytes at a revision (KeyError if it is not there)."""
        found = self._get(repo_id)
        with self._lock:
            commit = self._commit(found, revision) if found else None
            if commit is None:
                raise KeyError(f"{repo_id}@{revision}")
            return commit.files[path].path.read_bytes()

    def xet_uploads(self, repo_id: str) -> dict[str, tuple[str, int]]:
        """What was uploaded to a repo by Xet and not committed yet: sha256 -> (Xet file hash, size), read from the
        shards hf_xet wrote to the repo's store (their file records)."""
        found = self._get(repo_id)
        return xet_files(found.xet) if found is not None and found.xet is not None else {}

    def xet_bytes(self) -> int:
        """Bytes of chunk data (xorbs) every Xet store holds: what clients sent by Xet, deduplicated."""
        return sum(p.stat().st_size for p in (self.store / "xet").glob("*/xet/xorbs/xorbs/*") if p.is_file())

    def _from_xet(self, repo: _Repo, sha256: str) -> Path | None:
        """The object of this sha256, rebuilt from the repo's Xet store with hf_xet and checked (sha256, size), then
        kept as the repo's LFS object; None when the store has no file of that sha256."""
        entry = xet_files(repo.xet).get(sha256) if repo.xet is not None else None
        if entry is None:
            return None
        import hf_xet

        xet_hash, size = entry
        tmp = self.store / "tmp" / secrets.token_hex(8)
        with hf_xet.XetSession().new_file_download_group(endpoint=f"local://{repo.xet}") as group:
            group.start_download_file(hf_xet.XetFileInfo(xet_hash, size), str(tmp))
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        if tmp.stat().st_size != size or digest.hexdigest() != sha256:
            tmp.unlink()
            raise HTTPError(400, "", f"BadDigest: the Xet store's file for {sha256} rebuilds as {digest.hexdigest()}")
        path = self.store / "objects" / sha256
        os.replace(tmp, path)
        repo.lfs[sha256] = path
        return path

    def forget_uncommitted(self) -> int:
        """Drop every object no commit of its repo names (the Hub does not keep uploads nobody committed forever),
        Xet stores included; returns how many went."""
        dropped = 0
        with self._lock:
            for repo in self._repos.values():
                if repo.xet is not None:
                    dropped += len(xet_files(repo.xet))
                    shutil.rmtree(repo.xet)
                    repo.xet = None
                named = {f.sha256 for c in repo.commits.values() for f in c.files.values() if f.lfs}
                for sha in [sha for sha in repo.lfs if sha not in named]:
                    del repo.lfs[sha]
                    dropped += 1
        return dropped

    def is_private(self, repo_id: str) -> bool:
        found = self._get(repo_id)
        return bool(found and found.private)

    def create(self, repo_id: str, files: dict[str, bytes], summary: str = "made by hand") -> None:
        """A commit of these files on `main`, made here (as someone else would, with another tool); the repo is
        created if missing."""
        with self._lock:
            repo = self._get(repo_id)
            if repo is None:
                first = Commit(self._new_commit_id(repo_id), "initial commit", "", None, {}, date=_now())
                repo = self._repos[repo_id] = _Repo(repo_id, False, {first.id: first}, {"main": first.id})
            base = repo.commits[repo.refs["main"]]
            tree = dict(base.files)
            for name, data in files.items():
                stored, sha = self._put(data)
                if _must_be_lfs(name, len(data)):
                    repo.lfs[sha] = stored
                    tree[name] = _lfs_file(stored, sha, len(data))
                else:
                    tree[name] = _File(stored, len(data), sha, False, git_oid(data))
            commit = Commit(self._new_commit_id(base.id, summary), summary, "", base.id, tree, date=_now())
            repo.commits[commit.id] = commit
            repo.refs["main"] = commit.id

    # Inside.

    def _get(self, repo_id: str) -> _Repo | None:
        """The repo: uploaded, or a folder under root (read once, at one commit)."""
        with self._lock:
            if repo_id in self._repos:
                return self._repos[repo_id]
            folder = self.root / repo_id
            if ".." in repo_id.split("/") or not folder.is_dir():
                return None
            files = {}
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                data = path.read_bytes()
                rel = path.relative_to(folder).as_posix()
                sha = hashlib.sha256(data).hexdigest()
                lfs = rel.endswith(".safetensors")
                files[rel] = (
                    _lfs_file(path, sha, len(data)) if lfs else _File(path, len(data), sha, False, git_oid(data))
                )
            commit = hashlib.sha1("".join(f"{r}:{f.sha256}" for r, f in files.items()).encode()).hexdigest()
            lfs_objects = {f.sha256: f.path for f in files.values() if f.lfs}
            first = Commit(commit, "initial commit", "", None, files, date=_now())
            self._repos[repo_id] = _Repo(repo_id, False, {commit: first}, {"main": commit}, lfs_objects)
            return self._repos[repo_id]

    def add_generated(self, repo_id: str, files: dict[str, Generated | bytes]) -> None:
        """A repo whose LFS files (`Generated`) are made as they are downloaded; small files (`bytes`) as given."""
        stored: dict[str, _File] = {}
        for name, item in files.items():
            if isinstance(item, bytes):
                path, sha = self._put(item)
                stored[name] = _File(path, len(item), sha, False, git_oid(item))
            else:
                stored[name] = _File(self.store / "generated", item.size, item.sha256, True, "", item)
                stored[name].oid = git_oid(_pointer(item.sha256, item.size))
        commit = hashlib.sha1("".join(f"{n}:{f.sha256}" for n, f in stored.items()).encode()).hexdigest()
        with self._lock:
            first = Commit(commit, "initial commit", "", None, stored, date=_now())
            self._repos[repo_id] = _Repo(repo_id, False, {commit: first}, {"main": commit})

    def _commit(self, repo: _Repo, revision: str) -> Commit | None:
        """The commit a revision names: a branch, a pull request's ref, or a commit id of the repo."""
        commit_id = repo.refs.get(revision, revision)
        return repo.commits.get(commit_id)

    def _new_commit_id(self, *parts: str) -> str:
        with self._lock:
            self._serial += 1
            return hashlib.sha1("\0".join([*parts, str(self._serial)]).encode()).hexdigest()

    def _put(self, data: bytes) -> tuple[Path, str]:
        """The bytes, in the store: (their path, their sha256)."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.store / "objects" / sha
        if not path.exists():
            tmp = self.store / "tmp" / secrets.token_hex(8)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return path, sha

    def _user(self, authorization: str | None) -> tuple[str, str]:
        """(user, role) of a request's token; HTTPError 401 without one, or with one this hub does not know."""
        if not authorization:
            raise HTTPError(401, "", "Authorization header is missing: a token is needed")
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HTTPError(401, "", "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _member(self, user: str, namespace: str) -> bool:
        return user == namespace or user in self.orgs.get(namespace, set())

    def _writer(self, authorization: str | None, namespace: str) -> str:
        """The user who may write under this namespace, or HTTPError 401 / 403."""
        user, role = self._user(authorization)
        if role != "write":
            raise HTTPError(403, "", "This token has read access only: a write token is needed")
        if not self._member(user, namespace):
            raise HTTPError(403, "", f"You don't have the rights to write to {namespace}: {user} is not a member")
        return user


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def do_POST(self) -> None:
            self._route()

        def do_PUT(self) -> None:
            self._route()

        def _route(self) -> None:
            split = urlsplit(self.path)
            path, self._query = split.path, parse_qs(split.query)
            self._repo_id, self._file, self._revision, self._kind = "", "", "", ""
            self._drained = self.command in ("GET", "HEAD")
            repo = r"([^/]+/[^/]+)"
            routes: list[tuple[str, str, Callable[..., None]]] = [
                ("GET", r"/api/whoami-v2", self._whoami),
                ("GET", r"/api/agent-harnesses", self._harnesses),
                ("POST", r"/api/repos/create", self._create),
                ("POST", r"/api/validate-yaml", self._validate_yaml),
                ("GET", rf"/api/models/{repo}(?:/revision/([^/]+))?", self._info),
                ("GET", rf"/api/models/{repo}/tree/([^/]+)(?:/(.*))?", self._tree),
                ("GET", rf"/api/models/{repo}/refs", self._refs),
                ("GET", rf"/api/models/{repo}/commits/([^/]+)", self._commits),
                ("POST", rf"/api/models/{repo}/preupload/([^/]+)", self._preupload),
                ("GET", rf"/api/models/{repo}/xet-write-token/([^/]+)", self._xet_token),
                ("POST", rf"/api/models/{repo}/commit/([^/]+)", self._commit),
                ("POST", rf"/api/models/{repo}/branch/([^/]+)", self._branch),
                ("POST", rf"/{repo}\.git/info/lfs/objects/batch", self._batch),
                ("POST", rf"/{repo}\.git/info/lfs/objects/verify", self._verify),
                ("PUT", r"/lfs-upload/([0-9a-f]+)", self._upload),
                ("GET", rf"/{repo}/resolve/([^/]+)/(.+)", self._resolve),
            ]
            try:
                try:
                    for method, pattern, handle in routes:
                        if method == self.command or (method, self.command) == ("GET", "HEAD"):
                            if m := re.fullmatch(pattern, path):
                                if handle.__name__.lstrip("_") in hub.faults.silent:
                                    self._hold(handle.__name__.lstrip("_"))
                                    return
                                handle(*(unquote(g) if g is not None else None for g in m.groups()))
                                return
                    print(f"hub_server: no route for {self.command} {self.path}")  # noqa: T201 - shown on failure
                    raise HTTPError(404, "NotFound", f"no route {self.command} {path}")
                except HTTPError as e:
                    self._drain()
                    self._error(e.status, e.code, e.message, e.extra)
                except (BrokenPipeError, ConnectionResetError):
                    raise
                except Exception as e:  # a bug here: shown on failure, answered as the Hub's 500
                    traceback.print_exc()
                    self._drain()
                    self._error(500, "", f"hub_server: {type(e).__name__}: {e}")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _hold(self, kind: str) -> None:
            """Take the request and answer nothing until the stand-in closes (logged with status 0)."""
            self._kind = kind
            self._log(0)
            hub._closing.wait(600)
            self.close_connection = True

        # Bodies.

        def _chunks(self, rate: float | None = None) -> Iterator[bytes]:
            """The request's body as it arrives (Content-Length or chunked), paced as an upload when `rate`."""
            self._drained = True
            size = _chunk(rate)
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                while True:
                    n = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if n == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return
                    yield from self._exactly(n, size, rate)
                    self.rfile.readline()
            else:
                yield from self._exactly(int(self.headers.get("Content-Length") or 0), size, rate)

        def _exactly(self, n: int, size: int, rate: float | None) -> Iterator[bytes]:
            while n > 0:
                data = self.rfile.read(min(n, size))
                if not data:
                    raise ConnectionResetError("request body cut short")
                n -= len(data)
                hub._up.pace(len(data), rate)
                yield data

        def _drain(self) -> None:
            if not self._drained:
                for _ in self._chunks():
                    pass

        def _json(self) -> Any:
            data = b"".join(self._chunks())
            try:
                return json.loads(data or b"{}")
            except ValueError as e:
                raise HTTPError(400, "", f"Invalid JSON body: {e}") from e

        # Answers.

        def _log(self, status: int) -> None:
            auth = bool(self.headers.get("Authorization"))
            request = Request(
                self.command,
                self._repo_id,
                self._file,
                self.headers.get("Range"),
                auth,
                status,
                self._revision,
                self._kind,
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

        def _send_json(self, value: Any, status: int = 200, content_type: str = "application/json") -> None:
            self._send(status, json.dumps(value).encode(), {"Content-Type": content_type})

        def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, body, {**headers, **(extra or {})})

        # Reading.

        def _repo(self, repo_id: str, kind: str) -> _Repo:
            """The repo, after the Hub's checks for reading it: it exists, the caller may read it."""
            self._repo_id, self._kind = repo_id, kind
            found = hub._get(repo_id)
            if found is None:
                raise HTTPError(404, "RepoNotFound", "Repository not found")
            token = hub.gated.get(repo_id)
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                status = 403 if self.headers.get("Authorization") else 401
                raise HTTPError(status, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
            if found.private:
                authorization = self.headers.get("Authorization")
                user = hub.tokens.get((authorization or "").removeprefix("Bearer ").strip(), ("", ""))[0]
                if not hub._member(user, repo_id.split("/")[0]):
                    raise HTTPError(401 if not authorization else 404, "RepoNotFound", "Repository not found")
            return found

        def _open(self, repo_id: str, revision: str, kind: str) -> tuple[_Repo, Commit]:
            """The repo and the commit a revision names, or HTTPError as the Hub answers."""
            repo = self._repo(repo_id, kind)
            self._revision = revision
            with hub._lock:
                commit = hub._commit(repo, revision)
            if commit is None:
                raise HTTPError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo, commit

        def _info(self, repo_id: str, revision: str | None) -> None:
            repo, commit = self._open(repo_id, revision or "main", "info")
            siblings = [{"rfilename": name} for name in commit.files]
            body = {"id": repo_id, "modelId": repo_id, "sha": commit.id, "siblings": siblings, "private": repo.private}
            self._send_json(body)

        def _tree(self, repo_id: str, revision: str, folder: str | None) -> None:
            """Files and folders under `folder`: its children, or all below it with recursive=true."""
            _, commit = self._open(repo_id, revision, "tree")
            prefix = (folder or "").strip("/")
            recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
            under = {n: f for n, f in commit.files.items() if not prefix or n.startswith(prefix + "/")}
            if prefix and not under:
                raise HTTPError(404, "EntryNotFound", f"{prefix} does not exist", {"X-Repo-Commit": commit.id})
            depth = prefix.count("/") + 1 if prefix else 0
            folders = {"/".join(n.split("/")[:k]) for n in under for k in range(depth + 1, n.count("/") + 1)}
            entries: list[dict[str, Any]] = []
            for name in sorted(folders):
                if recursive or name.count("/") == depth:
                    oid = hashlib.sha1(f"{commit.id}:{name}".encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": name})
            for name, f in under.items():
                if recursive or name.count("/") == depth:
                    wrong = hub.faults.misreport.get(name)
                    size = f.size + 1 if wrong == "size" else f.size
                    sha = hashlib.sha256(f.sha256.encode()).hexdigest() if wrong == "sha256" else f.sha256
                    entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": size, "path": name}
                    if f.lfs:
                        entry["lfs"] = {"oid": sha, "size": size, "pointerSize": len(_pointer(sha, size))}
                    entries.append(entry)
            self._send_json(entries)

        def _refs(self, repo_id: str) -> None:
            repo = self._repo(repo_id, "refs")
            with hub._lock:
                refs = dict(repo.refs)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in refs.items()]
            prs = [{"name": n, "ref": n, "targetCommit": c} for n, c in refs.items() if n.startswith("refs/pr/")]
            branches = [b for b in branches if not b["name"].startswith("refs/")]
            self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

        def _commits(self, repo_id: str, revision: str) -> None:
            self._open(repo_id, revision, "commits")
            history = hub.commits(repo_id, revision)[::-1]
            body = [
                {
                    "id": c.id,
                    "title": c.summary,
                    "message": c.description,
                    "authors": [{"user": c.author}] if c.author else [],
                    "date": c.date,
                }
                for c in history
            ]
            self._send_json(body)

        def _resolve(self, repo_id: str, revision: str, name: str) -> None:
            _, found = self._open(repo_id, revision, "resolve")
            commit, files = found.id, found.files
            self._file = name
            f = files.get(name)
            if self.command == "HEAD" and name in hub.faults.gone_after_heads:
                hub.faults.heads[name] = hub.faults.heads.get(name, 0) + 1
                if hub.faults.heads[name] > hub.faults.gone_after_heads[name]:
                    f = None
            if f is None:
                raise HTTPError(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": commit})
            headers = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
            if f.lfs:
                headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
            start, end = 0, f.size - 1
            status = 200
            if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start, end = int(m.group(1)), min(int(m.group(2) or f.size - 1), f.size - 1)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
            whole = self.command == "GET" and (m is None or not m.group(2))
            if whole and name in hub.faults.drop:
                self._drop(status, headers, f.path.read_bytes()[start : end + 1], start)
                return
            if whole and hub.on_download:
                hub.on_download(name, "start")
            if f.generated is not None:
                self._send_generated(status, f.generated, start, max(0, end + 1 - start), headers)
            else:
                self._send_file(status, f.path, start, max(0, end + 1 - start), headers)
            if whole and hub.on_download:
                hub.on_download(name, "end")

        def _send_file(self, status: int, path: Path, start: int, length: int, headers: dict[str, str]) -> None:
            """A file's bytes [start, start + length), streamed, paced by the throttle."""
            self._send_chunks(
                status, _file_chunks(path, start, length, _chunk(hub.faults.throttle_bytes_per_s)), length, headers
            )

        def _send_generated(
            self, status: int, generated: Generated, start: int, length: int, headers: dict[str, str]
        ) -> None:
            """A generated file's bytes [start, start + length), made as they are sent, paced by the throttle."""
            self._send_chunks(status, generated.chunks(start, length), length, headers)

        def _send_chunks(
            self, status: int, chunks: Iterator[memoryview | bytes], length: int, headers: dict[str, str]
        ) -> None:
            self._log(status)
            self.send_response(status)
            for key, value in {"Content-Length": str(length), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            rate = hub.faults.throttle_bytes_per_s
            for data in chunks:
                hub._down.pace(len(data), rate)
                self.wfile.write(data)

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

        # Writing.

        def _whoami(self) -> None:
            self._kind = "whoami"
            user, role = hub._user(self.headers.get("Authorization"))
            orgs = [{"type": "org", "name": org, "roleInOrg": "write"} for org, ms in hub.orgs.items() if user in ms]
            auth = {"type": "access_token", "accessToken": {"displayName": f"{user}-{role}", "role": role}}
            body = {"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user}
            self._send_json(body | {"fullname": user, "email": None, "orgs": orgs, "auth": auth})

        def _harnesses(self) -> None:
            """The registry of AI agent harnesses the client looks itself up in: none here."""
            self._kind = "harnesses"
            self._send_json({"standardEnvVars": [], "harnesses": {}})

        def _create(self) -> None:
            self._kind = "create"
            payload = self._json()
            name, namespace = payload.get("name") or "", payload.get("organization")
            authorization = self.headers.get("Authorization")
            namespace = namespace or hub._user(authorization)[0]
            user = hub._writer(authorization, namespace)
            repo_id = f"{namespace}/{name}"
            self._repo_id = repo_id
            if payload.get("type") not in (None, "model"):
                raise HTTPError(400, "", "hub_server: only model repos")
            if not _NAME.fullmatch(name) or name.endswith((".git", ".")):
                raise HTTPError(400, "", f"Invalid repo name: {name!r}")
            private = payload.get("private") is True or payload.get("visibility") == "private"
            with hub._lock:
                if hub._get(repo_id) is not None:  # the Hub's answer names the repo, which the client reads
                    message = "You already created this model repo"
                    self._send_json({"error": message, "url": f"{hub.url}/{repo_id}"}, 409)
                    return
                first = Commit(hub._new_commit_id(repo_id), "initial commit", "", None, {}, user, _now())
                hub._repos[repo_id] = _Repo(repo_id, private, {first.id: first}, {"main": first.id})
            self._send_json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _validate_yaml(self) -> None:
            import yaml  # a dependency of huggingface_hub

            self._kind = "validate-yaml"
            content = self._json().get("content") or ""
            block = _YAML_BLOCK.match(content)
            meta: Any = None
            if block:
                try:
                    meta = yaml.safe_load(block.group(2))
                except yaml.YAMLError as e:
                    message = f"Invalid YAML in README.md: {e}"
                    self._send_json({"error": message, "errors": [{"message": message}]}, 400)
                    return
                if meta is not None and not isinstance(meta, dict):
                    message = "YAML metadata of README.md must be a mapping"
                    self._send_json({"error": message, "errors": [{"message": message}]}, 400)
                    return
            warnings = [] if meta else [{"message": "empty or missing yaml metadata in repo card"}]
            self._send_json({"warnings": warnings} if warnings else {})

        def _writable(self, repo_id: str, kind: str) -> tuple[_Repo, str]:
            """The repo and its writer, after the Hub's checks: it exists, the caller may write to it."""
            self._repo_id, self._kind = repo_id, kind
            repo = hub._get(repo_id)
            if repo is None:
                raise HTTPError(404, "RepoNotFound", "Repository not found")
            return repo, hub._writer(self.headers.get("Authorization"), repo_id.split("/")[0])

        def _preupload(self, repo_id: str, revision: str) -> None:
            repo, _ = self._writable(repo_id, "preupload")
            self._revision = revision
            payload = self._json()
            with hub._lock:
                commit = hub._commit(repo, revision)
            if commit is None:
                raise HTTPError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            answer = []
            for item in payload.get("files", []):
                path, size = item["path"], int(item["size"])
                mode = "lfs" if _must_be_lfs(path, size) else "regular"
                f = commit.files.get(path)
                oid = None if f is None else f.sha256 if f.lfs else f.oid
                answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            self._send_json({"files": answer, "commitOid": commit.id})

        def _xet_token(self, repo_id: str, revision: str) -> None:
            """What hf_xet asks before each upload: where the CAS is (this repo's folder, as hf_xet's local://
            store) and a token for it; counted as an upload by faults.refuse_upload_after."""
            repo, _ = self._writable(repo_id, "xet-token")
            self._revision = revision
            with hub._lock:
                refuse = hub.faults.refuse_upload_after
                if refuse is not None and hub.faults.uploads >= refuse:
                    hub.faults.refused += 1
                    raise HTTPError(403, "", "AccessDenied: upload refused (faults.refuse_upload_after)")
                hub.faults.uploads += 1
                if repo.xet is None:
                    repo.xet = hub.store / "xet" / secrets.token_hex(8)  # a repo made again starts empty
                    repo.xet.mkdir(parents=True)
            cas, exp = f"local://{repo.xet}", str(int(time.time()) + 3600)
            headers = {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": "xet-token", "X-Xet-Token-Expiration": exp}
            self._send(200, json.dumps({"casUrl": cas, "accessToken": "xet-token", "exp": int(exp)}).encode(),
                       {"Content-Type": "application/json", **headers})  # fmt: skip

        def _batch(self, repo_id: str) -> None:
            repo, _ = self._writable(repo_id, "batch")
            payload = self._json()
            if payload.get("operation") != "upload":
                raise HTTPError(400, "", "hub_server: LFS batch takes uploads only")
            objects = []
            for item in payload.get("objects", []):
                oid, size = str(item.get("oid")), int(item.get("size", -1))
                if not _SHA256.fullmatch(oid) or size < 0:
                    objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid object"}})
                    continue
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                with hub._lock:
                    stored = oid in repo.lfs
                    if not stored:
                        secret = secrets.token_hex(16)
                        hub._uploads[secret] = (repo_id, oid, size)
                if not stored:
                    upload = {"href": f"{hub.url}/lfs-upload/{secret}"}
                    verify = {"href": f"{hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}}
                    entry["actions"] = {"upload": upload, "verify": verify}
                objects.append(entry)
            self._send_json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

        def _upload(self, secret: str) -> None:
            """A PUT to the URL the batch answer gave (no token, as to S3): stored once its size and sha256 match."""
            self._kind = "upload"
            with hub._lock:
                if secret not in hub._uploads:
                    raise HTTPError(403, "", "SignatureDoesNotMatch: no such upload URL")
                repo_id, oid, size = hub._uploads[secret]
                self._repo_id, self._file = repo_id, oid
                refuse = hub.faults.refuse_upload_after
                if refuse is not None and hub.faults.uploads >= refuse:
                    hub.faults.refused += 1
                    raise HTTPError(403, "", "AccessDenied: upload refused (faults.refuse_upload_after)")
                hub.faults.uploads += 1
                drop = hub.faults.drop_uploads > 0
                hub.faults.drop_uploads -= drop
            tmp = hub.store / "tmp" / secrets.token_hex(8)
            digest, got = hashlib.sha256(), 0
            try:
                with open(tmp, "wb") as out:
                    for data in self._chunks(hub.faults.throttle_bytes_per_s):
                        digest.update(data)
                        got += len(data)
                        if hub.keep_uploads:
                            out.write(data)
                        if drop and got >= size // 2:
                            self._log(0)  # no answer: the connection is cut
                            self.close_connection = True
                            self.connection.shutdown(2)
                            return
                    if not hub.keep_uploads:
                        out.truncate(got)  # sparse: the size is kept, the bytes are not
                if got != size or digest.hexdigest() != oid:
                    raise HTTPError(400, "", f"BadDigest: got {got} bytes, sha256 {digest.hexdigest()}")
                path = hub.store / "objects" / oid
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            with hub._lock:
                repo = hub._get(repo_id)
                if repo is None:
                    raise HTTPError(404, "", f"{repo_id}: no such repo any more")
                repo.lfs[oid] = path
                hub._uploads.pop(secret, None)
                hub.faults.stored += 1
                if hub.faults.stored == hub.faults.delete_repo_after:
                    del hub._repos[repo_id]  # deleted by its owner, say, while the run goes on
            self._send(200, b"", {"ETag": f'"{hashlib.md5(oid.encode()).hexdigest()}"'})

        def _verify(self, repo_id: str) -> None:
            repo, _ = self._writable(repo_id, "verify")
            payload = self._json()
            oid, size = payload.get("oid"), payload.get("size")
            with hub._lock:
                path = repo.lfs.get(str(oid))
            if path is None or path.stat().st_size != size:
                raise HTTPError(404, "", f"LFS object {oid} ({size} bytes) not found")
            self._send_json({})

        def _commit(self, repo_id: str, revision: str) -> None:
            """An NDJSON commit: a header, then files (base64), LFS files (uploaded before), deletions."""
            repo, user = self._writable(repo_id, "commit")
            self._revision = revision
            lines = [json.loads(line) for line in b"".join(self._chunks()).splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                raise HTTPError(400, "", "The commit's first line must be its header")
            header = lines[0]["value"]
            create_pr = self._query.get("create_pr", ["0"])[0] in ("1", "true")
            # Bytes first (to the store: nothing shows until the ref moves), then the tree, then the ref.
            additions: dict[str, _File] = {}
            deletions: list[tuple[str, bool]] = []
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = str(value.get("path", "")).lstrip("/")
                if not path or ".." in path.split("/"):
                    raise HTTPError(400, "", f"Invalid path: {path!r}")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    if _must_be_lfs(path, len(data)):
                        raise HTTPError(400, "", f"{path} must be uploaded as an LFS file, not in the commit")
                    stored, sha = hub._put(data)
                    additions[path] = _File(stored, len(data), sha, False, git_oid(data))
                elif key == "lfsFile":
                    oid = str(value.get("oid"))
                    with hub._lock:
                        stored_lfs = repo.lfs.get(oid) or hub._from_xet(repo, oid)
                    if stored_lfs is None:
                        raise HTTPError(400, "", f"{path}: LFS object {oid} was never uploaded to {repo_id}")
                    size = stored_lfs.stat().st_size
                    if value.get("size") is not None and int(value["size"]) != size:
                        raise HTTPError(400, "", f"{path}: LFS object {oid} has {size} bytes, not {value['size']}")
                    additions[path] = _lfs_file(stored_lfs, oid, size)
                elif key in ("deletedFile", "deletedFolder"):
                    deletions.append((path.rstrip("/"), key == "deletedFolder"))
                    additions.pop(path, None)
                else:
                    raise HTTPError(400, "", f"hub_server: unknown commit line {key!r}")
            if hub.faults.fail_commit:
                raise HTTPError(500, "", "Internal Error (faults.fail_commit)")
            if hub.faults.lagging_commits > 0:
                hub.faults.lagging_commits -= 1
                raise HTTPError(
                    400, "", "Your push was rejected because an LFS pointer pointed to a file that does not exist"
                )
            if hub.faults.before_commit is not None:
                hub.faults.before_commit()
            with hub._lock:
                # A commit goes to a branch or a pull request's ref; a pull request is opened against a branch.
                base = hub._commit(repo, revision)
                if base is None or revision not in repo.refs or (create_pr and revision.startswith("refs/pr/")):
                    raise HTTPError(404, "RevisionNotFound", f"Invalid rev id: {revision} (not a branch)")
                parent = header.get("parentCommit")
                if parent and create_pr:
                    base = next((c for i, c in repo.commits.items() if i.startswith(parent)), None)
                    if base is None:
                        raise HTTPError(404, "RevisionNotFound", f"Invalid parent commit: {parent}")
                elif parent and not base.id.startswith(parent):
                    raise HTTPError(412, "", "A commit has happened since. Please refresh and try again.")
                files = dict(base.files)
                for path, is_folder in deletions:
                    gone = [n for n in files if n.startswith(path + "/")] if is_folder else [path] * (path in files)
                    if not gone:
                        raise HTTPError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                    for name in gone:
                        del files[name]
                files.update(additions)
                files.pop(hub.faults.lose_in_commit or "", None)
                summary, description = str(header.get("summary", "")), str(header.get("description", ""))
                tree = "\n".join(f"{n}:{f.sha256}" for n, f in sorted(files.items()))
                commit_id = hub._new_commit_id(base.id, summary, description, tree)
                commit = Commit(commit_id, summary, description, base.id, files, user, _now())
                repo.commits[commit.id] = commit
                pr_url = None
                if create_pr:
                    repo.prs += 1
                    repo.refs[f"refs/pr/{repo.prs}"] = commit.id
                    pr_url = f"{hub.url}/{repo_id}/discussions/{repo.prs}"
                else:
                    repo.refs[revision] = commit.id
            if hub.faults.lose_commit_answer:
                self._log(0)
                self.close_connection = True
                return
            body = {"success": True, "commitOid": commit.id, "commitUrl": f"{hub.url}/{repo_id}/commit/{commit.id}"}
            self._send_json(body | {"hookOutput": "", "pullRequestUrl": pr_url})

        def _branch(self, repo_id: str, branch: str) -> None:
            repo, _ = self._writable(repo_id, "branch")
            self._revision = branch
            start = self._json().get("startingPoint") or "main"
            if branch.startswith("refs/") or _COMMIT_ID.fullmatch(branch) or not re.fullmatch(r"[\w.\-/]+", branch):
                raise HTTPError(400, "", f"Invalid reference for a branch: {branch}")
            with hub._lock:
                if branch in repo.refs:
                    raise HTTPError(409, "", f"Reference already exists: refs/heads/{branch}")
                commit = hub._commit(repo, start)
                if commit is None:
                    raise HTTPError(404, "RevisionNotFound", f"Invalid rev id: {start}")
                repo.refs[branch] = commit.id
            self._send_json({})

    return Handler
