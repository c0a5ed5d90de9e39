"""Source tensors read from their shards: positioned reads straight into a tensor's own memory (pinned when a GPU
will take it) with `os.preadv`, so nothing is memory-mapped and the resident set holds only the tensors in
flight; and a hint that asks the kernel to fetch the bytes a reader will want next (Linux; elsewhere it does
nothing).

Imports: torch, dtypes, errors, source (base, checkpoint, files).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from fp8q.dtypes import TORCH_DTYPE
from fp8q.errors import open_error, read_error
from fp8q.source.base import Fetch, ShardFiles
from fp8q.source.checkpoint import Checkpoint, Shard, TensorMeta
from fp8q.source.files import FileId, check_planned

# The kernel reads at most its read-ahead size (often 128 KiB-8 MiB) per hint: hint in steps this big.
HINT_STEP = 2 << 20
# A reader keeps the kernel fetching this far ahead of it, so the disk works while it waits or computes (measured on
# a cold cache: 256 MiB as fast as more).
READ_AHEAD = 256 << 20


def open_for_reading(path: Path, planned: FileId | None = None) -> int:
    """A source file's descriptor, opened read-only; with `planned`, the very file its header was read from.

    Raises:
        CheckpointError: it cannot be opened (removed or made unreadable since the plan was made), or is another
            file now (swapped for a link elsewhere, say).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise open_error(path, e) from None
    try:
        check_planned(path, fd, planned)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_shard(files: ShardFiles, shard: Shard, stop: threading.Event) -> tuple[Path, int]:
    """Where a source shard is (once downloaded, for a streamed one), open for reading."""
    path = files.ready(shard, stop)
    return path, open_for_reading(path, shard.file_id)


def read_ahead(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start reading these bytes into the page cache; returns without waiting."""
    if not hasattr(os, "posix_fadvise"):
        return
    end = offset + nbytes
    for start in range(offset, end, HINT_STEP):
        os.posix_fadvise(fd, start, min(HINT_STEP, end - start), os.POSIX_FADV_WILLNEED)


class ReadAhead:
    """Read-ahead hints for one file read in order: each read at `start` keeps the kernel fetching up to `ahead`
    bytes past it, each byte hinted once."""

    def __init__(self, fd: int, ahead: int = READ_AHEAD) -> None:
        self.fd, self.ahead, self.hinted = fd, ahead, 0

    def at(self, start: int) -> None:
        if start + self.ahead > self.hinted:
            begin = max(self.hinted, start)
            self.hinted = start + self.ahead
            read_ahead(self.fd, begin, self.hinted - begin)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over the bytes of a contiguous CPU tensor (keep `t` alive while used)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def read_tensor(fd: int, meta: TensorMeta, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor from an open shard, into `buf` (a pool buffer) or fresh memory.

    Raises:
        OSError: the file ended early or could not be read.
    """
    if buf is None:
        buf = torch.empty(meta.nbytes, dtype=torch.uint8)
    view = byte_view(buf[: meta.nbytes])
    done = 0
    while done < meta.nbytes:
        n = os.preadv(fd, [view[done:]], meta.start + done)
        if n == 0:
            raise OSError(f"unexpected end of file after {done} of {meta.nbytes} bytes")
        done += n
    return buf[: meta.nbytes].view(TORCH_DTYPE[meta.dtype]).reshape(meta.shape)


class ShardReader:
    """A checkpoint's shards opened on demand, closed together: reads tensors by their header entries, from
    whichever shard holds them (a scale may live in another shard than its weight). With `fetch`, a shard is
    asked of it before it is opened."""

    def __init__(self, checkpoint: Checkpoint, fetch: Fetch | None = None, ahead: int = 0, drop: bool = False) -> None:
        self.paths = {s.name: s.path for s in checkpoint.shards}
        self.ids = {s.name: s.file_id for s in checkpoint.shards}
        self.fds: dict[str, int] = {}
        self.fetch = fetch
        self.ahead = ahead  # with reads in file order: keep the kernel this many bytes ahead (`ReadAhead`)
        self._hints: dict[str, ReadAhead] = {}
        # A checkpoint read once, end to end: each tensor's pages leave the page cache once read, so the kernel has
        # nothing to reclaim to make room for the next (on a checkpoint larger than the cache, half the system time).
        self.drop = drop

    def fd(self, shard: str) -> int:
        if shard not in self.fds:
            if self.fetch is not None:
                self.paths[shard] = self.fetch.path(shard, self.close_shard)
            self.fds[shard] = open_for_reading(self.paths[shard], self.ids[shard])
        return self.fds[shard]

    def read(self, meta: TensorMeta, buf: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, into `buf` when given (a pool buffer).

        Raises:
            CheckpointError: an OSError while reading, naming the file and tensor.
        """
        try:
            fd = self.fd(meta.shard)
            if self.ahead:
                self._hints.setdefault(meta.shard, ReadAhead(fd, self.ahead)).at(meta.start)
            tensor = read_tensor(fd, meta, buf)
            if self.drop and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, meta.start, meta.nbytes, os.POSIX_FADV_DONTNEED)
            return tensor
        except OSError as e:
            raise read_error(self.paths[meta.shard], meta.name, e) from None

    def locate(self, shard: str, path: Path) -> None:
        """Read `shard` from `path` (a streamed shard's download) rather than where its header was read."""
        self.paths[shard] = path

    def close_shard(self, shard: str) -> None:
        """Done with this shard for now (a streamed shard's download is deleted next: an open file keeps its space)."""
        fd = self.fds.pop(shard, None)
        self._hints.pop(shard, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "READ_AHEAD",
    "Fetch",
    "ReadAhead",
    "ShardReader",
    "byte_view",
    "open_for_reading",
    "read_ahead",
    "read_tensor",
]
