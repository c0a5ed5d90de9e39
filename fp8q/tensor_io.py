"""Raw tensor bytes between files and torch tensors, with positioned reads and writes.

Imports: torch, dtypes, checkpoint types. Reads go straight into a tensor's own memory (pinned when
a GPU will take it) with `os.preadv`, so nothing is memory-mapped and the resident set holds only
the tensors in flight; kept tensors are copied file to file by the kernel (`os.copy_file_range`)
without entering this process at all.
"""

from __future__ import annotations

import ctypes
import os

import torch

from fp8q.checkpoint import TensorMeta
from fp8q.dtypes import TORCH_DTYPE

COPY_CHUNK = 64 << 20


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over the bytes of a contiguous CPU tensor (keep `t` alive while used)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def read_tensor(fd: int, meta: TensorMeta, pin: bool = False) -> torch.Tensor:
    """Read one tensor from an open shard into fresh memory.

    Raises:
        OSError: the file ended early or could not be read.
    """
    buf = torch.empty(meta.nbytes, dtype=torch.uint8, pin_memory=pin)
    view = byte_view(buf)
    done = 0
    while done < meta.nbytes:
        n = os.preadv(fd, [view[done:]], meta.start + done)
        if n == 0:
            raise OSError(f"unexpected end of file after {done} of {meta.nbytes} bytes")
        done += n
    return buf.view(TORCH_DTYPE[meta.dtype]).reshape(meta.shape)


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
