"""The run's records: a fingerprint of source and options, the progress log `--resume` trusts, and
the `fp8q.json` manifest left in OUT.

Imports: errors, output.writer (its file names), source (checkpoint, files). The progress log lives in `OUT.partial/`:
a record of the run (its fingerprint, the source files' stat) and one record per shard on disk, written atomically with
that shard's sha256, so a resumed run reuses exactly the shards that were finished and still hash the same.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from fp8q.errors import OutputError
from fp8q.output.writer import MANIFEST_FILE, RUN_FILE
from fp8q.source.checkpoint import RECORD_PREFIX, Checkpoint
from fp8q.source.files import read_bounded, sha256_file

# In OUT.partial/: the run's fingerprint, and one record per finished shard. One file per shard,
# so that any number of processes (torchrun) record their shards without touching each other's.
DONE_DIR = f"{RECORD_PREFIX}-done"
UPLOADED_DIR = f"{RECORD_PREFIX}-uploaded"  # --push-to-hub: the shards the Hub holds (sha256, size, sample)
# Map a window's pages in one call instead of faulting them one by one (Linux).
_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def fingerprint(
    checkpoint: Checkpoint, options: dict[str, Any], version: str, origin: str | None = None
) -> dict[str, Any]:
    """What must not change between an interrupted run and its `--resume`; the manifest records it too. `origin`: a
    Hub source as `org/name@commit`, whose commit fixes every byte (headers alone do not: a fine-tuned model of the
    same shapes has the same ones); None for a folder."""
    config = checkpoint.config
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest() if config else None
    return {
        "version": version,
        "options": options,
        "source": [{"file": s.name, "size": s.size, "header_sha256": s.header_sha256} for s in checkpoint.shards],
        "config_sha256": config_hash,
        "origin": origin,
    }


def same_output(manifest: dict[str, Any], fp: dict[str, Any]) -> bool:
    """Whether an fp8q.json says its output is what a run of this fingerprint makes: the same fp8q version, options
    and source (and origin, where it names one)."""
    source: dict[str, Any] = {"shards": fp.get("source"), "config_sha256": fp.get("config_sha256")}
    if fp.get("origin") is not None:
        source["origin"] = fp["origin"]
    ours = {"version": fp.get("version"), "options": fp.get("options"), "source": source}
    theirs = {key: manifest.get(key) for key in ours}
    if fp.get("origin") is None and isinstance(theirs["source"], dict):
        theirs["source"] = {k: v for k, v in theirs["source"].items() if k != "origin"}
    return manifest.get("tool") == "fp8q" and theirs == json.loads(json.dumps(ours))  # tuples are lists there


def holds_output(out: Path, fp: dict[str, Any], names: set[str]) -> bool:
    """Whether OUT already holds what a run of this fingerprint makes: its fp8q.json says so, for a source whose
    origin fixes its bytes (a Hub commit), lists the files (`names`) the run would write, and every one is there.
    Their bytes are `fp8q verify`'s to check; this answers in milliseconds."""
    if fp.get("origin") is None:
        return False
    try:
        manifest = json.loads(read_bounded(out / MANIFEST_FILE).decode("utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not same_output(manifest, fp):
        return False
    listed = manifest.get("files")
    return isinstance(listed, dict) and set(listed) == names and all((out / name).is_file() for name in listed)


# Files are hashed through a memory map, a window at a time: no copy out of the page cache (which
# `read` makes: a quarter of the hashing time), and at most one window resident at once.
HASH_WINDOW = 16 << 20


class FileHasher:
    """The sha256 of a file being written in any order. Each finished byte range is reported with
    `add`; the hash advances over the finished prefix at once, reading it back while it is still in
    the page cache, so that when the last range lands only what follows the prefix remains."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1  # opened on first use: the file may not exist yet
        self.digest = hashlib.sha256()
        self.hashed = 0  # bytes [0, hashed) are in the digest
        self.finished: dict[int, int] = {}  # start -> end of finished ranges beyond `hashed`
        self.error: OSError | None = None

    def add(self, start: int, end: int) -> None:
        if end <= start or self.error is not None:
            return
        self.finished[start] = end
        try:
            self._open()
            while self.hashed in self.finished:
                end = self.finished.pop(self.hashed)
                _hash_range(self.digest, self.fd, self.hashed, end)
                self.hashed = end
        except OSError as e:  # raised by finish(): the digest may hold part of a range now
            self.error = e

    def finish(self) -> str:
        """The file's sha256, hashing whatever was not reported; closes the file."""
        try:
            if self.error is not None:
                raise self.error
            self._open()
            _hash_range(self.digest, self.fd, self.hashed, os.fstat(self.fd).st_size)
            return self.digest.hexdigest()
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _open(self) -> None:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDONLY)


def _hash_range(digest: Any, fd: int, start: int, end: int) -> None:
    """Feed bytes [start, end) of the file to `digest`, a mapped window at a time."""
    offset = start
    while offset < end:
        base = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps start on a page
        length = min(HASH_WINDOW, end - base)
        try:
            window = mmap.mmap(fd, length, offset=base, flags=_POPULATE, prot=mmap.PROT_READ)
        except OSError:  # a filesystem that cannot map files: read instead
            digest.update(os.pread(fd, base + length - offset, offset))
        else:
            with window, memoryview(window) as view:
                digest.update(view[offset - base :])
        offset = base + length


class Progress:
    """The finished shards of the run in `partial`, each recorded (with its hash) once it is on disk."""

    def __init__(self, partial: Path, fingerprint: dict[str, Any], rank: int = 0) -> None:
        self.partial = partial
        self.fingerprint = fingerprint
        self.rank = rank  # the process (under torchrun) that records through this

    def start(self, source_stat: list[dict[str, Any]]) -> None:
        """Record what this run makes, from which source files as they are now (sizes and change times),
        and which process makes it; done once, by the process that holds the lock on `partial`."""
        (self.partial / DONE_DIR).mkdir(parents=True, exist_ok=True)
        record = {
            "fingerprint": self.fingerprint,
            "source_stat": source_stat,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        atomic_write_json(self.partial / RUN_FILE, record)

    def record(self, shard: str, sha256: str, tensors: dict[str, Any]) -> None:
        self._write(DONE_DIR, shard, {"sha256": sha256, "tensors": tensors, "rank": self.rank})

    def record_upload(self, shard: str, uploaded: dict[str, Any]) -> None:
        """A shard the Hub holds now (`--push-to-hub`): what committing it takes without its file."""
        self._write(UPLOADED_DIR, shard, uploaded)

    def _write(self, folder: str, shard: str, entry: dict[str, Any]) -> None:
        name = hashlib.sha256(shard.encode()).hexdigest()[:32] + ".json"
        with _RECORDING:  # shards finish on threads of their own: one record at a time
            (self.partial / folder).mkdir(exist_ok=True)
            atomic_write_json(self.partial / folder / name, {"shard": shard, **entry})

    def done(self) -> dict[str, Any]:
        """Shard name -> {"sha256", "tensors", "rank"} for every shard recorded so far, by any process."""
        return {
            name: {"sha256": r["sha256"], "tensors": r["tensors"], "rank": r.get("rank", 0)}
            for name, r in self._read(DONE_DIR, ("sha256", "tensors")).items()
        }

    def uploads(self) -> dict[str, Any]:
        """Shard name -> {"sha256", "size", "sample"} for every shard uploaded so far (`--push-to-hub`)."""
        return {
            name: {key: r[key] for key in ("sha256", "size", "sample")}
            for name, r in self._read(UPLOADED_DIR, ("sha256", "size", "sample")).items()
        }

    def _read(self, folder: str, keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        records = {}
        for path in sorted((self.partial / folder).glob("*.json")):
            try:
                record = json.loads(read_bounded(path))
                if isinstance(record["shard"], str) and all(key in record for key in keys):
                    records[record["shard"]] = record
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record cut short by a kill: that shard is simply redone
        return records

    def set_aside(self) -> Path:
        """Move the run's records out of `partial`, which is about to become OUT, into a folder made for them
        beside it; returns that folder (for `put_back` if OUT cannot be made after all)."""
        aside = Path(tempfile.mkdtemp(prefix=f".{self.partial.name}.records-", dir=self.partial.parent))
        for name in (RUN_FILE, DONE_DIR, UPLOADED_DIR):
            if (self.partial / name).exists():
                os.rename(self.partial / name, aside / name)
        return aside

    def put_back(self, aside: Path) -> None:
        """Return the records `set_aside` moved, so that `--resume` finds the finished shards."""
        for name in (RUN_FILE, DONE_DIR, UPLOADED_DIR):
            if (aside / name).exists() and self.partial.is_dir():
                os.rename(aside / name, self.partial / name)
        shutil.rmtree(aside, ignore_errors=True)


_RECORDING = threading.Lock()


def reusable_shards(
    partial: Path,
    expected: dict[str, Any],
    source_stat: list[dict[str, Any]],
    held: set[str] = frozenset(),  # type: ignore[assignment]
) -> dict[str, Any]:
    """The finished shards of an interrupted run that `--resume` may keep: recorded, and still
    hashing to what was recorded (or, `held`, uploaded to the Hub, which still holds them, and deleted here).

    The source must have the same shard names, sizes and header hashes (the fingerprint), and each kept
    shard's source file the same modification and status-change times (`source_stat`) as when it was
    made, so that data changed in place under an unchanged header is made again, not reused.

    Raises:
        OutputError: no usable run record, or the source, options or tool version changed.
    """
    try:
        run = json.loads(read_bounded(partial / RUN_FILE))
        recorded = run["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(
            f"{partial}: no readable run record, so nothing in it can be trusted; delete it and run again"
        ) from None
    for key, what in (
        ("version", "fp8q version"),
        ("options", "options"),
        ("source", "source checkpoint"),
        ("config_sha256", "source config.json"),
    ):
        if recorded.get(key) != expected.get(key):
            raise OutputError(
                f"{partial}: cannot resume: the {what} changed since the interrupted run"
                f"{_changes(recorded.get(key), expected.get(key))}; delete {partial.name} and run again without "
                "--resume (or run with what the interrupted run had)"
            )
    # A finished shard is kept only if its source file is the very one it was made from (output shards mirror
    # source shards one to one); one changed in place under an unchanged header is simply made again.
    then = {entry.get("file"): entry for entry in run.get("source_stat") or [] if isinstance(entry, dict)}
    now = {entry["file"]: entry for entry in source_stat}
    done = Progress(partial, expected).done()
    return {
        name: entry
        for name, entry in done.items()
        if name in now
        and then.get(name) == now[name]
        and (
            (name in held and not (partial / name).exists())
            or ((partial / name).is_file() and sha256_file(partial / name) == entry["sha256"])
        )
    }


def _changes(then: Any, now: Any) -> str:
    """What changed between two records, in words, where they are options (` (--scheme channel -> block)`)."""
    if not (isinstance(then, dict) and isinstance(now, dict)):
        return ""
    changed = [
        f"--{key.replace('_', '-')} {_option_text(then.get(key))} -> {_option_text(now.get(key))}"
        for key in sorted(set(then) | set(now))
        if then.get(key) != now.get(key)
    ]
    return f" ({', '.join(changed)})" if changed else ""


def _option_text(value: Any) -> str:
    """An option's recorded value as it is written on the command line (a block size 128x128, patterns a, b)."""
    if value is None or value == []:
        return "(none)"
    if isinstance(value, list):
        return ("x" if all(isinstance(v, int) for v in value) else ", ").join(map(str, value))
    return str(value)


def atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(
    partial: Path, fp: dict[str, Any], shards: dict[str, Any], timings: dict[str, float]
) -> dict[str, str]:
    """`fp8q.json`: version, options, source fingerprint, sha256 of every file, per-tensor stats, timings. Returns
    the files it lists, each with its sha256."""
    # Every file of the output by its path in it, but the manifest itself and the run's records (at the top only: a
    # side file `sub/fp8q.json` is the model's, and listed).
    # Shards uploaded to the Hub and deleted here (--push-to-hub without OUT) are listed from their records.
    paths = sorted({*(p for p in partial.rglob("*") if p.is_file()), *(partial / name for name in shards)})
    files = {
        name: shards[name]["sha256"] if name in shards else sha256_file(path)
        for path in paths
        if (name := path.relative_to(partial).as_posix()) != MANIFEST_FILE and not name.startswith(RECORD_PREFIX)
    }
    tensors = {name: stats for entry in shards.values() for name, stats in sorted(entry["tensors"].items())}
    manifest = {
        "tool": "fp8q",
        "version": fp["version"],
        "options": fp["options"],
        "source": {"shards": fp["source"], "config_sha256": fp["config_sha256"], "origin": fp.get("origin")},
        "files": files,
        "tensors": tensors,
        "timings": timings,
    }
    atomic_write_json(partial / MANIFEST_FILE, manifest)
    return files
