"""Raw tensor bytes between files and torch tensors, with positioned reads and writes.

Imports: torch, dtypes, checkpoint types. Reads go straight into a tensor's own memory (pinned when
a GPU will take it) with `os.preadv`, so nothing is memory-mapped and the resident set holds only
the tensors in flight; kept tensors are copied file to file by the kernel (`os.copy_file_range`)
without entering this process at all.

Two hints keep the disk busy while the CPU works, on Linux (elsewhere they do nothing): the reader
asks the kernel to fetch the bytes it will want next (`read_ahead`), and each write is handed to
the disk at once (`start_writeback`) rather than left dirty until the shard's fsync, which would
then wait for all of it.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from fp8q.dtypes import TORCH_DTYPE
from fp8q.errors import open_error, read_error
from fp8q.source.checkpoint import Checkpoint, FileId, TensorMeta, check_planned

COPY_CHUNK = 64 << 20
# The kernel reads at most its read-ahead size (often 128 KiB-8 MiB) per hint: hint in steps this big.
HINT_STEP = 2 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """The C library's sync_file_range (Linux), which Python's os module does not wrap."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # the libc this process already runs on
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


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


def read_ahead(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start reading these bytes into the page cache; returns without waiting."""
    if not hasattr(os, "posix_fadvise"):
        return
    end = offset + nbytes
    for start in range(offset, end, HINT_STEP):
        os.posix_fadvise(fd, start, min(HINT_STEP, end - start), os.POSIX_FADV_WILLNEED)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these dirty bytes to disk without waiting, so the final fsync has little left."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over the bytes of a contiguous CPU tensor (keep `t` alive while used)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


class Stopped(Exception):
    """Raised in a thread waiting on a pool or queue once the run is being stopped."""


class BufferPool:
    """A few reusable byte buffers, each as large as the largest tensor that will pass through.

    Taking blocks while all are in use, which bounds memory whatever the queues hold, and reusing
    buffers spares the page faults a fresh allocation costs (25 000 for a 100 MB tensor).
    """

    def __init__(self, capacity: int, count: int, pin: bool = False) -> None:
        self.capacity = max(1, capacity)
        self.pin = pin
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._unmade = count
        self._lock = threading.Lock()

    def take(self, stop: threading.Event) -> torch.Tensor:
        with self._lock:
            if self._free.empty() and self._unmade > 0:
                self._unmade -= 1
                return torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pin)
        while not stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise Stopped

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def typed_view(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The first bytes of a pool buffer seen as a tensor of this dtype and shape."""
    nbytes = math.prod(shape) * dtype.itemsize
    return buf[:nbytes].view(dtype).reshape(shape)


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
    return typed_view(buf, TORCH_DTYPE[meta.dtype], meta.shape)


def write_at(fd: int, offset: int, t: torch.Tensor) -> None:
    """Write a CPU tensor's bytes at `offset`."""
    view = byte_view(t.contiguous())
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes between files, in the kernel where it can."""
    done = 0
    while done < nbytes:
        n = min(COPY_CHUNK, nbytes - done)
        try:
            copied = os.copy_file_range(src_fd, dst_fd, n, src_offset + done, dst_offset + done)
        except OSError:
            copied = 0  # filesystems (and kernels) without copy_file_range: plain read and write
        if copied == 0:
            data = os.pread(src_fd, n, src_offset + done)
            if not data:
                raise OSError(f"unexpected end of file after {done} of {nbytes} bytes")
            copied = os.pwrite(dst_fd, data, dst_offset + done)
        done += copied


class ShardReader:
    """A checkpoint's shards opened on demand, closed together: reads tensors by their header entries, from
    whichever shard holds them (a scale may live in another shard than its weight)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.paths = {s.name: s.path for s in checkpoint.shards}
        self.ids = {s.name: s.file_id for s in checkpoint.shards}
        self.fds: dict[str, int] = {}

    def fd(self, shard: str) -> int:
        if shard not in self.fds:
            self.fds[shard] = open_for_reading(self.paths[shard], self.ids[shard])
        return self.fds[shard]

    def read(self, meta: TensorMeta, buf: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, into `buf` when given (a pool buffer).

        Raises:
            CheckpointError: an OSError while reading, naming the file and tensor.
        """
        try:
            return read_tensor(self.fd(meta.shard), meta, buf)
        except OSError as e:
            raise read_error(self.paths[meta.shard], meta.name, e) from None

    def locate(self, shard: str, path: Path) -> None:
        """Read `shard` from `path` (a streamed shard's download) rather than where its header was read."""
        self.paths[shard] = path

    def close_shard(self, shard: str) -> None:
        """Done with this shard for now (a streamed shard's download is deleted next: an open file keeps its space)."""
        fd = self.fds.pop(shard, None)
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
