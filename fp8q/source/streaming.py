"""A Hub repo converted as it downloads: plan from the shards' headers, then fetch a shard, convert it, drop it.

Imports: errors, source (base, checkpoint, network), huggingface_hub. Used when SRC is a repo id whose weights are not
all in the local cache and the repo has an index (a one-shard repo is simply downloaded). Planning reads each missing
shard's header with two small range requests, so every check runs before any weight is downloaded. The run then
downloads shard k+1 while shard k converts, with huggingface_hub's own client (same HF_ENDPOINT, HF_TOKEN, revision),
into a staging folder of the run's own inside `OUT.partial/`, and deletes each shard once it is written: the disk holds
the output, at most two source shards and the side files. The shared Hugging Face cache is left alone: another process
(a second fp8q, `snapshot_download`) may be reading or writing the very same files there, so fp8q never deletes anything
in it. With `--keep-download` the shards are downloaded into the cache instead, as huggingface_hub itself would, and
kept. Shards that were in the cache before the run are read where they are.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, RepoFile, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.utils import HfHubHTTPError, build_hf_headers, get_session, hf_raise_for_status

from fp8q.errors import CheckpointError
from fp8q.source.base import Fetch, HubRepo, ShardFiles
from fp8q.source.checkpoint import (
    Checkpoint,
    Shard,
    header_length,
    index_shards,
    parse_shard,
    read_checkpoint,
    read_shard,
)
from fp8q.source.network import HUB_ERRORS, NETWORK_ERRORS, disk_full, explain, no_answer

# The first request asks for this much: the length prefix and, for nearly every shard, the whole header.
HEADER_PROBE = 1 << 17
# Downloaded shards on disk at once: the one being converted and the next one.
WINDOW = 2
# Header requests in flight at once while planning (a DeepSeek-V3-sized repo has 163 shards).
HEADER_THREADS = 8


@dataclass(frozen=True)
class HubStream:
    """A repo at one commit, as a Source: its side files (and any shards cached before the run) in `path`, a
    snapshot folder of the Hugging Face cache, and the headers of the shards still on the Hub (`remote`).
    `revision`: the one SRC was given with (None: the main branch)."""

    repo_id: str
    commit: str
    path: Path
    remote: dict[str, Shard]
    cache_dir: str | Path | None = None
    revision: str | None = None

    @property
    def where(self) -> str:
        """The repo in the words of an error."""
        return f"Hub repo {self.repo_id}"

    @property
    def given(self) -> str:
        return self.repo_id

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    @property
    def origin(self) -> str | None:
        return self.label

    @property
    def repo(self) -> HubRepo | None:
        return HubRepo(self.repo_id, self.revision)

    def read(self) -> Checkpoint:
        return read_checkpoint(self.path, self.remote)

    def most_on_disk(self, skip: set[str]) -> list[int]:
        """The sizes of the most a run that skips the shards `skip` holds downloaded at once: its `WINDOW` largest."""
        sizes = sorted((s.size for name, s in self.remote.items() if name not in skip), reverse=True)
        return sizes[:WINDOW]

    def shard_files(
        self, order: list[str], keep: bool, on_bytes: Callable[[str, int], None], staging: Path
    ) -> ShardFiles:
        return ShardDownloads(self, order, keep, on_bytes, staging)

    def on_demand(self) -> Fetch | None:
        return ShardsOnDemand(self, Path(tempfile.mkdtemp(prefix="fp8q-verify-")))

    def listing(self) -> dict[str, str | None] | None:
        """Every file of the repo at the stream's commit (one tree listing): its LFS sha256, or None for a regular
        file (whose bytes are in `path` when a side file, else fetched with `side_file`).

        Raises:
            CheckpointError: the listing cannot be had, in one line.
        """
        try:
            entries = HfApi().list_repo_tree(self.repo_id, revision=self.commit, recursive=True)
            return {e.path: (e.lfs.sha256 if e.lfs else None) for e in entries if isinstance(e, RepoFile)}
        except HUB_ERRORS as e:
            raise CheckpointError(f"{self.where}: cannot list its files: {explain(e)}") from None

    def side_file(self, name: str) -> Path:
        """A regular (small) file of the repo at the stream's commit, from the cache or downloaded into it.

        Raises:
            CheckpointError: it cannot be had, in one line.
        """
        if (self.path / name).is_file():
            return self.path / name
        try:
            return Path(hf_hub_download(self.repo_id, name, revision=self.commit, cache_dir=self.cache_dir))
        except HUB_ERRORS as e:
            raise CheckpointError(f"{self.where}: {name}: {explain(e)}") from None


def open_stream(repo_id: str, folder: Path, cache_dir: str | Path | None, revision: str | None) -> HubStream | None:
    """Read the headers of the shards `folder`'s index lists that are not in it; None without an index.

    Raises:
        CheckpointError: an index that is not one (or names shards outside the repo), a header that cannot be
            fetched or is not a safetensors header; naming the file.
    """
    names = index_shards(folder)
    if names is None:
        return None
    missing = [name for name in names if not (folder / name).is_file()]
    commit = folder.name

    def header(name: str) -> Shard:
        try:
            return remote_shard(repo_id, commit, folder, name)
        except CheckpointError:
            raise
        except HUB_ERRORS as e:
            raise CheckpointError(f"Hub repo {repo_id}: {name}: {explain(e)}") from None

    with ThreadPoolExecutor(HEADER_THREADS, thread_name_prefix="fp8q-header") as pool:
        shards = list(pool.map(header, missing))
    return HubStream(repo_id, commit, folder, {s.name: s for s in shards}, cache_dir, revision)


def remote_shard(repo_id: str, commit: str, folder: Path, name: str) -> Shard:
    """One shard's header, read with range requests and validated as `read_shard` validates a file's."""
    url = hf_hub_url(repo_id, name, revision=commit)
    meta = get_hf_file_metadata(url)  # size and sha256 (ETag) as hf_hub_download will see them
    path = folder / name  # where it will be once downloaded: the name errors give
    size = meta.size or 0
    head = _get_range(url, 0, min(HEADER_PROBE, size))
    header_len = header_length(path, head[:8], size)
    raw = head[8 : 8 + header_len]
    if len(raw) < header_len:
        raw += _get_range(url, 8 + len(raw), 8 + header_len)
    return parse_shard(path, name, size, raw, etag=meta.etag or "")


def _get_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file on the Hub. Streamed and cut off at `end`: a server that ignores the
    range must not send a whole shard. Redirects to the Hub's storage are followed (without the token, which
    httpx drops on a redirect to another host)."""
    if end <= start:
        return b""
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
        if response.status_code >= 400:
            response.read()  # the error's body, which hf_raise_for_status reads
        hf_raise_for_status(response)
        skip = start if response.status_code == 200 else 0  # the range was ignored: the body starts at byte 0
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= skip + end - start:
                break
    return bytes(data[skip : skip + end - start])


def download_shard(
    stream: HubStream, name: str, tqdm_class: type[Any] | None, staging: Path | None, cache_dir: str | Path | None
) -> Path:
    """Download shard `name` with huggingface_hub's client, into `staging` (or the cache when None), and check its
    header is the one read before the run.

    Raises:
        CheckpointError: the header differs (the repo changed at the same commit). The client's own errors pass.
    """
    path = Path(
        hf_hub_download(
            stream.repo_id,
            name,
            revision=stream.commit,
            tqdm_class=tqdm_class,
            cache_dir=cache_dir,
            local_dir=staging,
        )
    )
    expected = stream.remote[name]
    local = read_shard(path.parent, name)
    if (local.size, local.header_sha256) != (expected.size, expected.header_sha256):
        raise CheckpointError(
            f"{path}: downloaded, but its header differs from the one read before the run; "
            "the repo changed on the Hub at the same commit (or a proxy altered it): run again"
        )
    return path


class ShardsOnDemand:
    """A streamed repo's shards for a reader that goes its own way (`fp8q verify`), at most `WINDOW` on disk, in
    `staging` (a folder of the caller's own). A shard is downloaded when it is first read, and the next one in the
    order the reader said it would go in (`expect`) is fetched meanwhile, in place of one before it in that order;
    a shard read out of order is downloaded then, in place of the one read least recently. A shard's reader
    descriptor is closed (`close`) before its file is deleted: an open file keeps its space. `close()` stops a
    download in progress and deletes the staging folder."""

    def __init__(self, stream: HubStream, staging: Path) -> None:
        self.stream = stream
        self.staging = staging
        self.order: list[str] = []
        self.bytes_downloaded = 0
        self._local: dict[str, Path] = {}  # downloaded, least recently read first
        self._coming: dict[str, Future[Path]] = {}  # the one shard being fetched ahead
        self._stop = threading.Event()
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="fp8q-prefetch")

    def expect(self, order: list[str]) -> None:
        self.order = [name for name in dict.fromkeys(order) if name in self.stream.remote]

    def path(self, name: str, close: Callable[[str], None]) -> Path:
        """Where shard `name` is, once on disk.

        Raises:
            CheckpointError: the download failed, naming the shard.
        """
        if name not in self.stream.remote:
            return self.stream.path / name  # in the cache before the run
        if name in self._coming:
            self._arrived(name, self._coming.pop(name).result())
        elif name in self._local:
            self._local[name] = self._local.pop(name)  # read most recently now
        else:
            self._make_room(close, lambda other: True)
            self._arrived(name, self._download(name))
        self._fetch_after(name, close)
        return self._local[name]

    def _fetch_after(self, name: str, close: Callable[[str], None]) -> None:
        """Start fetching the shard after `name` in `order`, if there is one still to fetch and room can be made by
        deleting a shard that comes before `name` in `order` (read, and not to be read again in order)."""
        if name not in self.order or self._coming:
            return
        at = self.order.index(name)
        after = next((n for n in self.order[at + 1 :] if n not in self._local), None)
        if after is None:
            return
        before = set(self.order[:at])
        if not self._make_room(close, lambda other: other in before):
            return
        self._coming[after] = self._fetcher.submit(self._download, after)

    def _make_room(self, close: Callable[[str], None], may_go: Callable[[str], bool]) -> bool:
        """Delete shards, least recently read first, among those `may_go` allows, until one more fits."""
        while len(self._local) + len(self._coming) >= WINDOW:
            gone = next((other for other in self._local if may_go(other)), None)
            if gone is None:
                return False
            close(gone)
            self._local.pop(gone).unlink(missing_ok=True)
        return True

    def _arrived(self, name: str, path: Path) -> None:
        self._local[name] = path
        self.bytes_downloaded += path.stat().st_size

    def _download(self, name: str) -> Path:
        try:
            return download_shard(self.stream, name, _progress(name, lambda *_: None, self._stop), self.staging, None)
        except CheckpointError:
            raise
        except HUB_ERRORS as e:
            raise _failure(self.stream, name, e) from None

    def close(self) -> None:
        self._stop.set()  # a download in progress gives up at its next chunk
        self._fetcher.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.staging, ignore_errors=True)


def _failure(stream: HubStream, name: str, error: Exception) -> CheckpointError:
    """A shard's failed download in one line: a full disk, a Hub that stopped answering, a connection that broke
    off, or what the Hub answered."""
    said = disk_full(error) or no_answer(error)
    if said is not None:
        why = said
    elif isinstance(error, NETWORK_ERRORS) and not isinstance(error, HfHubHTTPError):
        first = (str(error).strip().splitlines() or ["no details"])[0]
        why = f"the download broke off ({type(error).__name__}: {first}); check the network, or HF_ENDPOINT"
    else:
        why = explain(error)
    return CheckpointError(f"{stream.where}: downloading {name}: {why}")


class _Cancelled(Exception):
    """Raised from the download's progress hook to stop a download the run no longer needs."""


class ShardDownloads:
    """Downloads the shards a run reads, in its order, at most `WINDOW` of them on disk at a time.

    The reader calls `ready(shard)` before it opens a shard (waiting for its download; it returns where the shard
    is), the writer `done(name)` once the shard is written (deleting the download), and the run `close()` at its
    end, which stops any download in progress and deletes the staging folder with whatever it still holds.
    Shards cached before the run pass through untouched.

    Args:
        staging: a folder this run alone writes (in its locked OUT.partial/), created here, where shards are
            downloaded unless `keep`; `keep` downloads into the Hugging Face cache and deletes nothing.
    """

    def __init__(
        self,
        stream: HubStream,
        order: list[str],
        keep: bool,
        on_bytes: Callable[[str, int], None],
        staging: Path,
    ) -> None:
        self.stream = stream
        self.order = [name for name in order if name in stream.remote]
        self.keep = keep
        self.staging = staging
        self._on_bytes = on_bytes
        self._slots = threading.Semaphore(WINDOW)
        self._stop = threading.Event()
        self._arrived = {name: threading.Event() for name in self.order}
        self._failed: dict[str, CheckpointError] = {}
        self._paths: dict[str, Path] = {}  # name -> where its download is
        self._lock = threading.Lock()
        self.waits: list[tuple[float, float]] = []  # the reader's, for shards not downloaded yet (perf_counter)
        self._thread = threading.Thread(target=self._download_all, name="fp8q-download", daemon=True)
        self._thread.start()

    @property
    def total_bytes(self) -> int:
        return sum(self.stream.remote[name].size for name in self.order)

    def ready(self, shard: Shard, stop: threading.Event) -> Path:
        """Where `shard` is, once it is on disk.

        Raises:
            CheckpointError: its download failed, naming the shard.
            Stopped: the run was stopped while waiting.
        """
        from fp8q.errors import Stopped

        arrived = self._arrived.get(shard.name)
        if arrived is None:
            return shard.path  # in the cache before the run
        since = time.perf_counter()
        while not arrived.wait(0.1):
            if stop.is_set():
                raise Stopped
        self.waits.append((since, time.perf_counter()))
        if shard.name in self._failed:
            raise self._failed[shard.name]
        return self._paths[shard.name]

    def done(self, name: str) -> None:
        """Shard `name` is written: delete its download (unless kept) and let the next one start."""
        if name not in self._arrived:
            return
        with self._lock:
            path = self._paths.get(name)
        if not self.keep and path is not None:
            path.unlink(missing_ok=True)
        self._slots.release()

    def close(self) -> None:
        """Stop downloading and delete the staging folder, with whatever it still holds (unless kept)."""
        self._stop.set()
        self._slots.release()  # wake the downloader if it waits for a slot
        self._thread.join()
        if not self.keep:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _download_all(self) -> None:
        for name in self.order:
            self._slots.acquire()
            if self._stop.is_set():
                return
            try:
                self._download(name)
            except _Cancelled:
                return
            except Exception as e:  # noqa: BLE001 - whatever stops a download is the reader's to raise, in one line
                self._failed[name] = e if isinstance(e, CheckpointError) else _failure(self.stream, name, e)
                self._arrived[name].set()
                return
            self._arrived[name].set()

    def _download(self, name: str) -> None:
        cache_dir = self.stream.cache_dir if self.keep else None
        path = download_shard(self.stream, name, self._progress(name), None if self.keep else self.staging, cache_dir)
        with self._lock:
            self._paths[name] = path

    def _progress(self, name: str) -> type[Any]:
        return _progress(name, self._on_bytes, self._stop)


def _progress(name: str, on_bytes: Callable[[str, int], None], stop: threading.Event) -> type[Any]:
    """A stand-in for huggingface_hub's tqdm bar: counts the bytes, and stops the download once `stop` is set."""

    class Bytes:
        def __init__(self, **kwargs: Any) -> None:
            if kwargs.get("initial"):
                on_bytes(name, kwargs["initial"])

        def __enter__(self) -> Bytes:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int | float = 1) -> None:
            if stop.is_set():
                raise _Cancelled
            on_bytes(name, int(n))

        def close(self) -> None:
            pass

    return Bytes
