"""A checkpoint on disk as a Source: a folder, one .safetensors file, or a Hub cache snapshot (given as a path, or
as the repo id the cache holds); its shards are read where they are, never deleted.

Imports: source (base, checkpoint, files).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fp8q.source.base import Fetch, HubRepo, ShardFiles
from fp8q.source.checkpoint import Checkpoint, Shard, read_checkpoint
from fp8q.source.files import hub_snapshot


class LocalShards:
    """The shard files of a checkpoint on disk: always there, never deleted."""

    def __init__(self) -> None:
        self.waits: list[tuple[float, float]] = []  # none: they are there
        self.order: list[str] = []  # nothing to download
        self.total_bytes = 0

    def ready(self, shard: Shard, stop: threading.Event) -> Path:
        return shard.path

    def done(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class LocalSource:
    """A checkpoint on disk. `repo_id`: the Hub repo id SRC named, resolved to the cache snapshot `path` (and
    `revision`, the one given with it); None for a path given as such."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def folder(self) -> Path:
        """The folder that holds it: the path itself, or a single file's folder (its config.json is beside it)."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def remote(self) -> Mapping[str, Shard]:
        return {}

    @property
    def given(self) -> str:
        return self.repo_id or str(self.path)

    @property
    def label(self) -> str:
        return self.origin or str(self.path)

    @property
    def origin(self) -> str | None:
        snapshot = hub_snapshot(self.path)
        return f"{snapshot[0]}@{snapshot[1]}" if snapshot else None

    @property
    def repo(self) -> HubRepo | None:
        if self.repo_id is not None:
            return HubRepo(self.repo_id, self.revision)
        snapshot = hub_snapshot(self.folder)
        return HubRepo(*snapshot) if snapshot else None  # a snapshot given as a path: the repo at its commit

    def read(self) -> Checkpoint:
        return read_checkpoint(self.path)

    def most_on_disk(self, skip: set[str]) -> list[int]:
        return []

    def shard_files(
        self, order: list[str], keep: bool, on_bytes: Callable[[str, int], None], staging: Path
    ) -> ShardFiles:
        return LocalShards()

    def on_demand(self) -> Fetch | None:
        return None

    def listing(self) -> dict[str, str | None] | None:
        return None

    def side_file(self, name: str) -> Path:
        return self.folder / name


__all__ = ["LocalShards", "LocalSource"]
