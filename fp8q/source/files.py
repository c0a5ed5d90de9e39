"""Files of a source folder fp8q reads whole or follows: bounded reads of side files (config.json, the index, a model
card, fp8q's own records), config.json parsed, and the rules for links: where they may lead (inside the folder, or
a Hub cache snapshot's own repo folder) and that a file read later is the very one planned.

Imports: errors. The one place links may lead out of the folder is a Hub cache snapshot, whose files link into
their own repo's `blobs/`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from fp8q.errors import CheckpointError

# Files fp8q reads whole (config.json, the index, a model card, fp8q.json and the run's records) are kilobytes to a
# few tens of MB (DeepSeek-V3's index: 9 MB); one larger than this is none of them, and is not read into memory.
MAX_SIDE_FILE_BYTES = 100_000_000
_HASH_CHUNK = 8 << 20  # what sha256_file reads at a time
# A file as the filesystem knows it: (device, inode).
FileId = tuple[int, int]


def file_id(stat_result: os.stat_result) -> FileId:
    return stat_result.st_dev, stat_result.st_ino


def check_planned(path: Path, fd: int, planned: FileId | None) -> None:
    """The file open at `fd` must be the one planned (None: no plan to hold it to).

    Raises:
        CheckpointError: it is another file now (replaced, or a link to somewhere else since the run was planned).
    """
    if planned is not None and file_id(os.fstat(fd)) != planned:
        raise CheckpointError(
            f"{path}: is no longer the file fp8q planned to read (replaced since, by a link elsewhere say): not "
            "read; put it back, then run again with --resume"
        )


def allowed_link_root(folder: Path) -> Path:
    """Where the symbolic links of a checkpoint folder may lead: into the folder itself, or, for a
    Hub cache snapshot (`models--org--name/snapshots/<commit>/`), into that repo's cache folder."""
    real = folder.resolve()
    return real.parent.parent if hub_snapshot(real) else real


# A Hub model id as `base_model` takes it: `org/name` (ASCII letters, digits, `-_.`; no `--` or `..`, no `.git` at the
# end, at most 96 characters).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", re.ASCII)


def is_model_id(text: object) -> bool:
    """Whether `text` is a Hub model id of the `org/name` form (what a card's `base_model` names)."""
    return (
        isinstance(text, str)
        and len(text) <= 96
        and _REPO_ID.fullmatch(text) is not None
        and "--" not in text
        and ".." not in text
        and not text.endswith((".", "-", ".git"))
    )


def hub_snapshot(folder: Path) -> tuple[str, str] | None:
    """(repo id, commit) when `folder` is a Hub cache snapshot (`models--org--name/snapshots/<commit>/`)."""
    real = folder.resolve()
    repo = real.parent.parent.name
    if real.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/"), real.name
    return None


def inside(path: Path, allowed: Path) -> Path:
    """`path` itself when it is no link out of `allowed`.

    Raises:
        CheckpointError: the path is a symbolic link (or inside a linked folder) that leads out.
    """
    target = path.resolve()
    if not target.is_relative_to(allowed):
        raise CheckpointError(
            f"{path}: a symbolic link to {target}, outside the checkpoint folder; fp8q follows no link out of "
            "the source: copy the file in, or point SRC at the real folder"
        )
    return path


def hub_blob(path: Path) -> str:
    """The Hub's content hash (sha256) of a file in a Hub cache snapshot, which links it to `blobs/<hash>`;
    "" for any other file."""
    real = path.resolve()
    if real.parent.name == "blobs" and real.parent.parent.name.startswith("models--") and len(real.name) == 64:
        return real.name
    return ""


def read_bounded(path: Path, limit: int = MAX_SIDE_FILE_BYTES, planned: FileId | None = None) -> bytes:
    """The bytes of a small file fp8q reads whole, never more than `limit` of them; with `planned`, only from the
    very file planned.

    Raises:
        OSError: it cannot be read, is not a regular file (a device such as /dev/zero, a pipe), or holds more than
            `limit` bytes; `strerror` says which.
        CheckpointError: it is not the file planned.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a pipe must not block the open
    try:
        check_planned(path, fd, planned)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"more than {limit // 1_000_000} MB, which no such file holds")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict.

    Raises:
        CheckpointError: unreadable, not JSON (or nested too deep to parse), or not an object.
    """
    try:
        config = json.loads(read_bounded(path).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); fix or restore the file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not valid JSON; fix or restore the file") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deep to be a model config; fix or restore the file") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if not is_unicode(json.dumps(config, ensure_ascii=False)):
        raise CheckpointError(
            f"{path}: holds a \\ud800-style escape of half a character (a lone surrogate), which no UTF-8 file can "
            "hold: fix the file"
        )
    return config


def is_unicode(text: str) -> bool:
    """Whether text can be written as UTF-8: JSON may escape half a character (a lone surrogate), no file holds one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sha256_file(path: Path) -> str:
    """A whole file's sha256 (what fp8q.json lists, what the Hub's LFS records), read into one buffer again and
    again: no allocation per read, and hashlib releases the GIL on large buffers, so other threads go on meanwhile."""
    digest = hashlib.sha256()
    chunk = memoryview(bytearray(_HASH_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            digest.update(chunk[:n])
    return digest.hexdigest()


__all__ = [
    "MAX_SIDE_FILE_BYTES",
    "FileId",
    "allowed_link_root",
    "check_planned",
    "file_id",
    "hub_blob",
    "hub_snapshot",
    "inside",
    "is_unicode",
    "read_bounded",
    "read_config",
    "sha256_file",
]
