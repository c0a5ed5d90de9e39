"""Read a safetensors checkpoint's headers and index into a validated `Checkpoint`; no tensor data.

Imports: errors, dtypes, source.files. Every check a malformed or hostile checkpoint needs happens here, before a
single tensor byte is read: bounded header sizes, offsets that tile the file exactly, index entries
that agree with the shard headers in both directions, shard names that stay inside the folder, and
symbolic links that stay inside it too (a README.md linking to /proc/self/environ must not carry
HF_TOKEN into the output). The one place links may lead out of the folder is a Hub cache snapshot,
whose files link into their own repo's `blobs/`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from fp8q.dtypes import ITEMSIZE
from fp8q.errors import CheckpointError
from fp8q.source.files import (
    FileId,
    allowed_link_root,
    file_id,
    hub_blob,
    inside,
    is_unicode,
    read_bounded,
    read_config,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# ModelOpt writes its quantization here, beside a config.json that may have none (vLLM reads it from here then).
MODELOPT_FILE = "hf_quant_config.json"
# safetensors' own reader refuses headers above 100 MB; nothing legitimate comes close.
MAX_HEADER_BYTES = 100_000_000
# The longest file name most filesystems take, in bytes.
MAX_NAME_BYTES = 255
# fp8q's own records in OUT.partial/ are named with this prefix: a file of the source named so is never copied.
RECORD_PREFIX = ".fp8q"
# Weight files that are never copied and never opened (pickles may run code when unpickled).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", *PICKLE_SUFFIXES)


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One tensor as its shard header describes it. `start` is an absolute file offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    start: int
    nbytes: int

    @property
    def module(self) -> str:
        """The module name: the tensor name without its last component (`.weight`, `.bias`)."""
        return self.name.rpartition(".")[0]


@dataclass(frozen=True, slots=True)
class Shard:
    """One safetensors file: its tensors in file order and a hash of its header."""

    name: str
    path: Path
    size: int
    metadata: dict[str, str] | None
    tensors: tuple[TensorMeta, ...]
    header_sha256: str
    # When the file last changed, as read with its header: a change in place shows here even when the header
    # stays the same. The status-change time cannot be set back by any tool, unlike the modification time.
    mtime_ns: int = 0
    ctime_ns: int = 0
    # The Hub's sha256 of the file, for a shard in a Hub cache snapshot or still on the Hub: what identifies it.
    etag: str = ""
    # The file its header was read from (None: still on the Hub); the run reads that very file, or stops.
    file_id: FileId | None = None

    def stat_record(self) -> dict[str, int | str]:
        """What --resume compares to know a source shard is the very one a finished output shard was made from."""
        if self.etag:
            return {"file": self.name, "size": self.size, "sha256": self.etag}
        return {"file": self.name, "size": self.size, "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Everything about a source checkpoint that can be known without reading tensor data."""

    root: Path
    shards: tuple[Shard, ...]
    tensors: dict[str, TensorMeta]
    config: dict[str, Any] | None
    has_index: bool
    side_files: tuple[str, ...]
    skipped_files: tuple[str, ...]
    # One line each about what was left out and why (links out of the folder, shards the index does not list).
    notes: tuple[str, ...] = ()
    # Each side file's identity when planned (device, inode, of the file its name leads to): what is copied later
    # must be that very file, not one swapped in since (a link to a secret, say).
    side_ids: Mapping[str, FileId] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(shard.size for shard in self.shards)


def with_modelopt_config(config: dict[str, Any] | None, modelopt: dict[str, Any]) -> dict[str, Any] | None:
    """config.json with ModelOpt's hf_quant_config.json as its `quantization_config` (`quant_method: modelopt`), where
    it has none of its own."""
    section = modelopt.get("quantization")
    if config is None or "quantization_config" in config or not isinstance(section, dict):
        return config
    return {**config, "quantization_config": {"quant_method": "modelopt", **section}}


def read_checkpoint(src: Path, remote: Mapping[str, Shard] | None = None) -> Checkpoint:
    """Validate a checkpoint folder (or one `.safetensors` file) from its headers alone. `remote`: shards of a
    Hub snapshot folder that are still on the Hub, their headers read by range requests (fp8q.source.streaming).

    Raises:
        CheckpointError: naming the file or tensor at fault and what to do about it.
    """
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder; give a checkpoint folder or a .safetensors file")
    if src.is_file():
        if src.suffix != ".safetensors":
            raise CheckpointError(f"{src}: not a .safetensors file; give a checkpoint folder or a .safetensors file")
        # The file the user named is read even through a link; the config.json beside it (which engines need)
        # only where it stays inside its folder.
        folder = src.parent
        _refuse_one_of_several(src, folder)
        shard = read_shard(folder, src.name)
        config_path = folder / CONFIG_FILE
        config = read_config(inside(config_path, allowed_link_root(folder))) if config_path.is_file() else None
        return Checkpoint(folder, (shard,), _tensor_map([shard]), config, False, (), ())
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a file or folder")

    allowed = allowed_link_root(src)
    files, outside = _list_files(src, allowed)
    index_path = src / INDEX_FILE
    if index_path.is_file():
        shard_names = read_index(inside(index_path, allowed))
    elif (src / SINGLE_FILE).is_file():
        shard_names = {SINGLE_FILE: set()}
    else:
        shard_names = _guess_shards(src, files)

    for name in shard_names:
        inside(src / name, allowed)
    remote = remote or {}
    shards = [remote[name] if name in remote else read_shard(src, name) for name in sorted(shard_names)]
    tensors = _tensor_map(shards)
    if index_path.is_file():
        _check_index_matches(shards, shard_names)

    config_path = src / CONFIG_FILE
    config = read_config(inside(config_path, allowed)) if config_path.is_file() else None
    used = set(shard_names) | {INDEX_FILE, CONFIG_FILE}
    if (src / MODELOPT_FILE).is_file():
        # Never copied: beside a dequantized or converted output it would make engines read it as ModelOpt's.
        used.add(MODELOPT_FILE)
        config = with_modelopt_config(config, read_config(inside(src / MODELOPT_FILE, allowed)))
    own = [f for f in files if f.startswith(RECORD_PREFIX)]  # would land on fp8q's records: never copied
    side = tuple(f for f in files if f not in used and f not in own and not f.endswith(WEIGHT_SUFFIXES))
    skipped = tuple(f for f in files if f not in used and (f in own or f.endswith(WEIGHT_SUFFIXES)))
    notes = [
        f"{src / f}: a symbolic link to {target}, outside the checkpoint folder: not copied"
        for f, target in outside
        if f not in used
    ]
    notes += [f"{src / f}: named like fp8q's own records ({RECORD_PREFIX}*): not copied" for f in own]
    if index_path.is_file():
        notes += [
            f"{src / f}: not listed in {INDEX_FILE}: neither converted nor copied"
            for f in skipped
            if f.endswith(".safetensors") and "/" not in f
        ]
    ids = {f: file_id(os.stat(src / f)) for f in side}
    return Checkpoint(src, tuple(shards), tensors, config, index_path.is_file(), side, skipped, tuple(notes), ids)


def read_shard(root: Path, name: str) -> Shard:
    """Parse and validate one shard's header (bounded size, JSON, offsets tiling the file)."""
    path = root / name
    if not path.is_file():
        raise CheckpointError(f"{path}: shard is missing; download it again or fix {INDEX_FILE}")
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        header_len = header_length(path, f.read(8), stat.st_size)
        raw = f.read(header_len)
    shard = parse_shard(path, name, stat.st_size, raw, etag=hub_blob(path))
    return replace(shard, mtime_ns=stat.st_mtime_ns, ctime_ns=stat.st_ctime_ns, file_id=file_id(stat))


def header_length(path: Path, prefix: bytes, size: int) -> int:
    """The header length a shard's first 8 bytes give, checked against the file size and a sane bound."""
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: file is truncated ({size} bytes); download it again")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES} byte limit; "
            "the file is corrupt or not safetensors"
        )
    if 8 + header_len > size:
        raise CheckpointError(
            f"{path}: header length {header_len} runs past the end of the file ({size} bytes); "
            "the file is truncated or corrupt, download it again"
        )
    return header_len


def parse_shard(path: Path, name: str, size: int, raw: bytes, etag: str = "") -> Shard:
    """A shard from its raw JSON header and its file size, wherever they were read from (a file, or ranged
    requests to the Hub): the header must be a JSON object whose offsets tile the file exactly."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: header is not valid JSON; the file is corrupt, download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt, download it again")

    lone = next((name for name in header if not is_unicode(name)), None)
    if lone is not None:
        raise CheckpointError(
            f"{path}: tensor name {lone!r} holds half a character (a lone surrogate), which no engine can look up; "
            "the file is corrupt"
        )
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    data_start = 8 + len(raw)
    # In offset order, as safetensors validates them: a zero-size tensor sits at the offset of the next one (and
    # sorts before it: its end comes first).
    tensors = sorted(
        (_tensor_meta(path, name, name_entry, data_start) for name, name_entry in header.items()),
        key=lambda t: (t.start, t.nbytes, t.name),
    )
    expected = data_start
    for meta in tensors:
        if meta.start != expected:
            raise CheckpointError(
                f"{path}: tensor {meta.name} starts at byte {meta.start - data_start} of the data, "
                f"expected {expected - data_start}; the offsets do not tile the file, it is corrupt"
            )
        expected += meta.nbytes
    if expected != size:
        what = "truncated" if expected > size else "has trailing bytes"
        raise CheckpointError(
            f"{path}: the header's offsets cover {expected} bytes but the file has {size}: it is {what}; "
            "download it again"
        )
    digest = hashlib.sha256(raw).hexdigest()
    return Shard(name, path, size, metadata, tuple(tensors), digest, etag=etag)


def changed_since_read(shard: Shard, stat: os.stat_result) -> bool:
    """Whether the file `stat` describes differs from the one the shard's header was read from. A Hub blob is
    named by its content's hash and written once: only its size is compared (a shard streamed from the Hub is
    downloaded after its header was read, so its times are new by nature)."""
    if shard.etag:
        return stat.st_size != shard.size
    return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) != (shard.size, shard.mtime_ns, shard.ctime_ns)


def _tensor_meta(path: Path, name: str, entry: Any, data_start: int) -> TensorMeta:
    bad = CheckpointError(f"{path}: header entry for tensor {name} is malformed; the file is corrupt")
    if not isinstance(entry, dict):
        raise bad
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(shape, list)
        and all(_is_count(d) for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
    ):
        raise bad
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype!r}, which fp8q does not know")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {name} spans {end - begin} bytes but its shape {shape} and dtype {dtype} "
            f"need {nbytes}; the file is corrupt"
        )
    return TensorMeta(name, dtype, tuple(shape), path.name, data_start + begin, nbytes)


def _is_count(value: Any) -> bool:
    """A JSON integer >= 0 (JSON's `true` is a Python bool, which is an int, and no dimension)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _list_files(root: Path, allowed: Path) -> tuple[list[str], list[tuple[str, Path]]]:
    """Every regular file under root, skipping hidden folders; and apart, the links that lead out of
    `allowed` (each with where it leads), which are never read."""
    found, outside = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts[:-1]) or rel.parts[0] in (".git", ".cache"):
            continue
        if not path.is_file():
            continue
        target = path.resolve()
        if target.is_relative_to(allowed):
            found.append(rel.as_posix())
        else:
            outside.append((rel.as_posix(), target))
    return found, outside


def _refuse_one_of_several(src: Path, folder: Path) -> None:
    """A file the index beside it lists among other shards is part of a model, not one: converting it alone would
    make a model of one shard under the whole model's config.

    Raises:
        CheckpointError: naming the folder to give instead.
    """
    index = folder / INDEX_FILE
    if not index.is_file():
        return
    try:
        listed = read_index(inside(index, allowed_link_root(folder)))
    except CheckpointError:
        return  # an index that cannot be read says nothing of this file, which is read as it is
    if src.name in listed and len(listed) > 1:
        raise CheckpointError(
            f"{src}: one of the {len(listed)} shards {INDEX_FILE} beside it lists, not a whole checkpoint; give the "
            f"folder instead: {folder}"
        )


def index_shards(folder: Path) -> list[str] | None:
    """The shard names `folder`'s index lists (checked as `read_index` checks them), or None without an index.

    Raises:
        CheckpointError: an index that is not one, or names shards outside the folder.
    """
    return sorted(read_index(folder / INDEX_FILE)) if (folder / INDEX_FILE).is_file() else None


def read_index(index_path: Path) -> dict[str, set[str]]:
    """Shard file name -> tensor names, from the index, with hostile shard names refused."""
    try:
        index = json.loads(read_bounded(index_path).decode("utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot be read ({e.strerror or e}); download it again") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError):
        raise CheckpointError(
            f"{index_path}: not a valid index (JSON with a weight_map object); download it again"
        ) from None
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not _is_safe_shard_name(shard):
            raise CheckpointError(
                f"{index_path}: shard name {shard!r} for tensor {tensor} must be a .safetensors file "
                "inside the checkpoint folder (no '..', no absolute path); the index is corrupt or hostile"
            )
        if not is_unicode(shard):
            raise CheckpointError(
                f"{index_path}: shard name {shard!r} for tensor {tensor} holds half a character (a lone surrogate), "
                "which no file name can: the index is corrupt"
            )
        if "/" in shard or len(shard.encode("utf-8")) > MAX_NAME_BYTES:
            what = "is longer than a file name can be" if "/" not in shard else "is a path, not a file name"
            raise CheckpointError(
                f"{index_path}: shard name {shard!r} for tensor {tensor} {what}; fp8q reads shards named plainly "
                "in the checkpoint folder itself, where transformers and vLLM look for them: move the file there and "
                "fix the index"
            )
        shards.setdefault(shard, set()).add(tensor)
    if not shards:
        raise CheckpointError(f"{index_path}: weight_map is empty; the index is corrupt")
    return shards


def _is_safe_shard_name(name: str) -> bool:
    # Checked with both path flavours so that C:\x, \\server\x and /x are refused on every OS.
    for flavour in (PurePosixPath, PureWindowsPath):
        p = flavour(name)
        if p.is_absolute() or p.drive or p.root or ".." in p.parts:
            return False
    return name.endswith(".safetensors") and "\\" not in name


def _guess_shards(root: Path, files: list[str]) -> dict[str, set[str]]:
    candidates = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    if len(candidates) == 1:
        return {candidates[0]: set()}
    if len(candidates) > 1:
        raise CheckpointError(
            f"{root}: {len(candidates)} .safetensors files but no {INDEX_FILE}; "
            "add the index, or pass one .safetensors file"
        )
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"{root}: only pickle weights ({pickles[0]}); fp8q reads safetensors only and never unpickles. "
            "Convert them to safetensors first (transformers: save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{root}: no model.safetensors or {INDEX_FILE}; this is not a safetensors checkpoint")


def _tensor_map(shards: list[Shard]) -> dict[str, TensorMeta]:
    tensors: dict[str, TensorMeta] = {}
    for shard in shards:
        for meta in shard.tensors:
            if meta.name in tensors:
                raise CheckpointError(
                    f"{shard.path}: tensor {meta.name} is also in {tensors[meta.name].shard}; "
                    "a tensor must live in exactly one shard"
                )
            tensors[meta.name] = meta
    return tensors


def _check_index_matches(shards: list[Shard], listed: dict[str, set[str]]) -> None:
    """The index and the shard headers must name the same tensors, shard by shard."""
    for shard in shards:
        in_header = {t.name for t in shard.tensors}
        missing = sorted(listed[shard.name] - in_header)
        if missing:
            raise CheckpointError(
                f"{shard.path}: tensor {missing[0]} is listed in {INDEX_FILE} but not in this shard "
                f"({len(missing)} missing); the shard is incomplete or the index is stale"
            )
        extra = sorted(in_header - listed[shard.name])
        if extra:
            raise CheckpointError(
                f"{shard.path}: tensor {extra[0]} is in this shard but {INDEX_FILE} does not list it there "
                f"({len(extra)} unlisted); the index is stale, regenerate it"
            )
