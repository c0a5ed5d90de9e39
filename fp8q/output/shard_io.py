"""Bytes into output files: a CPU tensor's bytes at an offset, a range copied between files in the kernel where it
can (`os.copy_file_range`, so kept tensors never enter this process), and each write handed to the disk at once
(`sync_file_range`, Linux) rather than left dirty until the shard's fsync, which would then wait for all of it.

Imports: torch, source.reader (its byte view of a tensor).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

import torch

from fp8q.source.reader import byte_view

COPY_CHUNK = 64 << 20
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


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these dirty bytes to disk without waiting, so the final fsync has little left."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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


__all__ = ["copy_range", "start_writeback", "write_at"]
