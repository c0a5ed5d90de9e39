"""The output folder: streaming shard files, JSON side files, copies, and the atomic rename.

Imports: torch, errors, units, output.shard_io, plan (types), source (checkpoint, files). All work happens in
`OUT.partial/` beside OUT, locked by the run that writes it; only a complete result is renamed to OUT, so a crash or
kill never leaves a folder that looks finished. fp8q deletes only what it made: its own `OUT.partial/`, and with
`--overwrite` an OUT whose fp8q.json lists every file in it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fp8q.errors import OutputError, UsageError, open_error
from fp8q.output.shard_io import copy_range, start_writeback, write_at
from fp8q.plan.planner import OutTensor, ShardPlan
from fp8q.source.checkpoint import RECORD_PREFIX
from fp8q.source.files import FileId, allowed_link_root, check_planned, read_bounded
from fp8q.units import size_text

# In OUT: fp8q's manifest; in OUT.partial/: the record of the run that writes it (see manifest.py).
MANIFEST_FILE = "fp8q.json"
RUN_FILE = f"{RECORD_PREFIX}-run.json"
# In OUT.partial/: where each process of a run downloads a streamed Hub repo's shards (`-RANK` added), its own.
STAGING_DIR = f"{RECORD_PREFIX}-downloads"


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
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """A UTF-8 text file, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def copy_file(src: Path, dst: Path, planned: FileId | None = None) -> None:
    """Copy one side file with its bytes unchanged: the very file planned (`planned`), whatever its name leads to
    now (a Hub cache snapshot's link into its blob is followed, a file swapped since for a link elsewhere is not).

    Raises:
        CheckpointError: the source cannot be opened, or is another file than planned.
        OSError: writing the copy failed.
    """
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise open_error(src, e) from None
    with open(fd, "rb") as source:
        check_planned(src, fd, planned)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def output_path(out: Path) -> Path:
    """OUT as the run uses it: a symbolic link to a folder stands for that folder, so the new checkpoint
    replaces the folder and the link keeps pointing at it.

    Raises:
        UsageError: OUT is `.`, `..`, `/` or holds the current folder: a checkpoint needs a folder of its own.
        OutputError: a link to nothing.
    """
    if (
        out.name in ("", ".", "..")
        or out.resolve() == Path(out.resolve().anchor)
        or Path.cwd().is_relative_to(out.resolve())
    ):
        raise UsageError(
            f"{out}: the output must be a new folder of its own, not '.', '..', '/' or a folder holding the current "
            "one: give it a name, e.g. ./model-fp8"
        )
    if not out.is_symlink():
        return out
    target = out.resolve()
    if not target.exists():
        raise OutputError(f"{out}: a symbolic link to {target}, which does not exist; create it or choose another")
    return target


def finalize(partial: Path, out: Path, overwrite: bool) -> None:
    """Move a finished `OUT.partial/` to OUT. An old OUT (empty, or an fp8q output `check_output` let
    `--overwrite` replace, checked again now) is moved into a folder this run creates, and deleted only
    once the new one is in place: no other path is ever touched.

    Raises:
        OutputError: OUT was filled while the run went (by another program, or another run) and may not be replaced.
        OSError: the rename failed (OUT is a mount point, say); an old OUT is back in its place.
    """
    _fsync_dir(partial)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: appeared while fp8q was running and is not a folder; move it away")
    if out.exists() and any(out.iterdir()):
        # Again: it may have been created or filled while the run was going.
        if not overwrite:
            raise OutputError(
                f"{out}: was filled by something else while fp8q was running; move it away (or pass --overwrite "
                "if it is an fp8q output)"
            )
        check_replaceable(out)
    trash = None
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        try:
            os.rename(out, trash / out.name)
        except OSError:  # a mount point (EBUSY), say: nothing moved, nothing to leave behind
            trash.rmdir()
            raise
    try:
        os.rename(partial, out)
    except OSError:
        if trash is not None:
            os.rename(trash / out.name, out)
            trash.rmdir()
        raise
    _fsync_dir(out.parent)
    if trash is not None:
        shutil.rmtree(trash)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def check_output(src: Path, out: Path, overwrite: bool) -> None:
    """OUT must be neither SRC nor inside it nor around it, and must be empty, or (with --overwrite) an
    fp8q output that holds nothing but what its fp8q.json lists.

    Raises:
        OutputError: naming OUT and what to do.
    """
    src_r, out_r = src.resolve(), out.resolve()
    if src_r.is_file():
        # A single file: only the file and the config.json beside it are read, so OUT may sit beside it.
        if out_r == src_r or out_r in src_r.parents or out_r == src.parent.resolve():
            raise OutputError(
                f"{out}: the output folder holds the source file ({src}); fp8q never replaces a folder holding "
                "its source: choose another folder"
            )
    else:
        # The folder whose files the run reads: a Hub cache snapshot's links lead into its repo folder.
        for inside in {src_r, allowed_link_root(src_r)}:
            if out_r == inside or inside in out_r.parents:
                raise OutputError(
                    f"{out}: the output must not be the source folder or inside it; choose another folder"
                )
            if out_r in inside.parents:
                raise OutputError(
                    f"{out}: the output folder holds the source ({src}); fp8q never replaces a folder holding "
                    "its source: choose another folder"
                )
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(
                f"{out}: exists and is not empty; pass --overwrite to replace it (an fp8q output only), "
                "or choose another folder"
            )
        check_replaceable(out)


def check_replaceable(out: Path) -> None:
    """`--overwrite` replaces only what is provably an fp8q output: a folder whose fp8q.json, written by
    fp8q, lists every file in it.

    Raises:
        OutputError: anything else, naming what makes it so.
    """
    try:
        manifest = json.loads(read_bounded(out / MANIFEST_FILE).decode("utf-8"))
        listed = manifest["files"] if manifest.get("tool") == "fp8q" else None
        if not isinstance(listed, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError, KeyError, TypeError):
        raise OutputError(
            f"{out}: exists, is not empty and is not an fp8q output (no {MANIFEST_FILE} of fp8q's): fp8q deletes "
            "nothing it did not write; empty it yourself or choose another folder"
        ) from None
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_symlink() or (not path.is_dir() and rel != MANIFEST_FILE and rel not in listed):
            raise OutputError(
                f"{out}: holds {rel}, which fp8q did not write (its {MANIFEST_FILE} does not list it); "
                "--overwrite replaces only an fp8q output: move it away, or choose another folder"
            )


def lock_partial(partial: Path) -> int:
    """Take the exclusive lock on `OUT.partial/` that every run writing into it holds until it ends;
    returns the descriptor to release it with (closing it releases the lock).

    Raises:
        OutputError: another run holds it.
    """
    fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise OutputError(f"{partial}: cannot be locked ({e.strerror or e}); write elsewhere") from None
        raise OutputError(
            f"{partial}: another fp8q run{_holder(partial)} is writing it right now; wait for it to finish or "
            "stop it, or write elsewhere"
        ) from None
    return fd


def _holder(partial: Path) -> str:
    """` (pid N on HOST)` from the run record of the run that holds the lock, where it says."""
    try:
        record = json.loads(read_bounded(partial / RUN_FILE).decode("utf-8"))
        return f" (pid {int(record['pid'])} on {record['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def check_free_space(out: Path, files: list[int], download: tuple[Path, list[int]] | None = None) -> None:
    """Refuse to start a run that cannot fit on the output disk: `files` are the sizes of the files it writes
    there, each taking whole filesystem blocks; `download`: the folder a streamed run downloads into, and the
    sizes of the files it holds there at once (two shards), on the same disk or another."""
    probe = _existing(out)
    needed = on_disk(probe, files)
    if download is not None:
        cache, sizes = download
        cache_probe = _existing(cache)
        size = on_disk(cache_probe, sizes)
        if os.stat(cache_probe).st_dev == os.stat(probe).st_dev:
            needed += size
        elif shutil.disk_usage(cache_probe).free < size:
            raise OutputError(
                f"{cache}: the Hugging Face cache needs {size_text(size)} for the two shards being streamed but "
                f"only {size_text(shutil.disk_usage(cache_probe).free)} are free there; free some space or set "
                "HF_HUB_CACHE to a larger disk"
            )
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OutputError(
            f"{out}: needs {size_text(needed)} but only {size_text(free)} are free on that disk; "
            "free some space or write elsewhere"
        )


def on_disk(folder: Path, sizes: list[int]) -> int:
    """The space files of these sizes take on the filesystem of `folder`: each a whole number of its blocks (a
    1-byte file takes 4 KiB on most), plus a block for each file's entry."""
    try:
        block = os.statvfs(folder).f_frsize or 4096
    except OSError:
        block = 4096
    return sum(-(-size // block) * block + block for size in sizes)


def _existing(path: Path) -> Path:
    """The nearest folder at or above `path` that exists."""
    probe = path.parent if not path.exists() else path
    while not probe.exists():
        probe = probe.parent
    return probe


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
