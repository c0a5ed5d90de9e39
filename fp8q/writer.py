"""The output folder: streaming shard files, JSON side files, copies, and the atomic rename.

Imports: errors, plan types, tensor_io. All work happens in `OUT.partial/` beside OUT; only a
complete result is renamed to OUT, so a crash or kill never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fp8q.errors import OutputError
from fp8q.plan import OutTensor, ShardPlan
from fp8q.tensor_io import copy_range, start_writeback, write_at


class ShardFile:
    """An output shard being filled: its header is written first, then tensors land at their
    planned offsets in any order. Holds no tensor data of its own; `on_written(start, end)` hears of
    each byte range once it is in the file (the hash follows the writes)."""

    def __init__(self, path: Path, plan: ShardPlan, on_written: Callable[[int, int], None] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.on_written = on_written or (lambda start, end: None)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, plan.header)
        os.ftruncate(self.fd, plan.size)
        self.on_written(0, len(plan.header))

    def write(self, out: OutTensor, t: torch.Tensor) -> None:
        if t.numel() * t.element_size() != out.nbytes:
            raise AssertionError(f"{out.name}: {t.numel() * t.element_size()} bytes, planned {out.nbytes}")
        write_at(self.fd, out.start, t)
        self._landed(out)

    def copy(self, src_fd: int, src_offset: int, out: OutTensor) -> None:
        copy_range(src_fd, src_offset, self.fd, out.start, out.nbytes)
        self._landed(out)

    def _landed(self, out: OutTensor) -> None:
        start_writeback(self.fd, out.start, out.nbytes)
        self.on_written(out.start, out.start + out.nbytes)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_json(path: Path, data: Any) -> None:
    """JSON the way transformers writes it (indent 2, key order kept), flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def copy_file(src: Path, dst: Path) -> None:
    """Copy one side file (following hub-cache symlinks) with its bytes unchanged."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def finalize(partial: Path, out: Path) -> None:
    """Move a finished `OUT.partial/` to OUT, replacing an old OUT only now that the new one is whole."""
    _fsync_dir(partial)
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
    os.rename(partial, out)
    _fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def check_output(src: Path, out: Path, overwrite: bool) -> None:
    """OUT must not be SRC or inside it, and must be empty unless --overwrite.

    Raises:
        OutputError: naming OUT and what to do.
    """
    src_r, out_r = src.resolve(), out.resolve()
    if src_r.is_file():
        # A single file: the output only must not be the file or the folder holding it.
        if out_r in (src_r, src_r.parent):
            raise OutputError(f"{out}: the output must not be the source file or its folder; choose another folder")
    elif out_r == src_r or src_r in out_r.parents:
        raise OutputError(f"{out}: the output must not be the source folder or inside it; choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: exists and is not empty; pass --overwrite to replace it, or choose another folder")


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start a run that cannot fit on the output disk."""
    probe = out.parent if not out.exists() else out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OutputError(
            f"{out}: needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free on that disk; "
            "free some space or write elsewhere"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
