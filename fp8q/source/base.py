"""What a source is, whatever kind: the Source protocol the engine and verify read a checkpoint through (a folder, one
.safetensors file, a Hub cache snapshot: source.local; a Hub repo streamed as the run goes: source.streaming), and
ShardFiles, where a run's reader finds each shard, and Fetch, where verify's does.

Imports: source.checkpoint (its types, for type checking). The kind of SRC is decided once, by
`source.opening.open_source`: no other module asks whether it holds a path or a repo.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fp8q.source.checkpoint import Checkpoint, Shard


@dataclass(frozen=True)
class HubRepo:
    """The Hub repo a source is (a repo id given, or a cache snapshot given as a path), and the revision a model card
    names: the one given with a repo id (None: its main branch), a snapshot's commit."""

    id: str
    revision: str | None


class ShardFiles(Protocol):
    """Where the source shards are to read: the reader waits on `ready` before it opens a shard, and the writer
    tells `done` once a shard is written. A streamed Hub repo's downloads (streaming.ShardDownloads), or a
    folder's files (local.LocalShards)."""

    waits: list[tuple[float, float]]  # in `ready`, for shards not there yet (perf_counter intervals)
    order: list[str]  # the shards it downloads, in the order it does

    @property
    def total_bytes(self) -> int:
        """What it downloads in all."""

    def ready(self, shard: Shard, stop: threading.Event) -> Path: ...

    def done(self, name: str) -> None: ...

    def close(self) -> None: ...


class Fetch(Protocol):
    """Where a shard is once it is on disk (a streamed repo's, downloaded on demand: fp8q.source.streaming);
    `close(other)` before another shard's file is deleted to make room."""

    bytes_downloaded: int

    def path(self, name: str, close: Callable[[str], None]) -> Path: ...

    def expect(self, order: list[str]) -> None:
        """The order the shards will be read in, so that the next can be fetched while one is read."""

    def close(self) -> None:
        """Stop downloading, and delete what was downloaded."""


class Source(Protocol):
    """A checkpoint to read, opened: where it is on disk, what it is called, and how its shards reach a reader."""

    @property
    def path(self) -> Path:
        """On disk: the folder or the .safetensors file; for a Hub repo, the cache snapshot with its side files."""

    @property
    def remote(self) -> Mapping[str, Shard]:
        """The shards still on the Hub, by name, known from their headers (empty: every shard is on disk)."""

    @property
    def given(self) -> str:
        """SRC as given: the path, or the repo id."""

    @property
    def label(self) -> str:
        """SRC as a plan names it: a Hub repo (streamed, or a cache snapshot) as `org/name@commit`, a path as it is."""

    @property
    def origin(self) -> str | None:
        """`org/name@commit` where a Hub commit fixes the source's bytes (what a fingerprint records); else None."""

    @property
    def repo(self) -> HubRepo | None:
        """The Hub repo the source is, if it is one."""

    def read(self) -> Checkpoint:
        """Every shard's header and the side files, validated; no tensor data."""

    def most_on_disk(self, skip: set[str]) -> list[int]:
        """The sizes of the downloads a run that skips the shards `skip` holds at once (none for files on disk)."""

    def shard_files(
        self, order: list[str], keep: bool, on_bytes: Callable[[str, int], None], staging: Path
    ) -> ShardFiles:
        """Where a run's reader finds the shards `order` (in that order): downloaded into `staging` (a folder of the
        run's own) or, with `keep`, into the Hugging Face cache, `on_bytes` told as they come; or the files on disk."""

    def on_demand(self) -> Fetch | None:
        """For a reader that goes its own way (verify): the shards downloaded as they are read (a temporary folder,
        deleted on `close`); None when they are on disk."""

    def listing(self) -> dict[str, str | None] | None:
        """Every file of a Hub repo with its LFS sha256 (None for a regular file), from one tree listing; None for
        files on disk (list them there)."""

    def side_file(self, name: str) -> Path:
        """A small regular file of the source, on disk (a Hub repo's from the cache, downloaded into it if need be)."""


__all__ = ["Fetch", "HubRepo", "ShardFiles", "Source"]
