"""Every file of an fp8q output against the sha256 its fp8q.json lists: one changed byte anywhere (a weight, a
scale, config.json) is named, and so is a file the output lacks; a file fp8q.json does not list is said in a note
(a person may add an evals table to a published repo: that is no fault of the output).

Imports: errors, source (base, checkpoint, files). A local folder's files are hashed on a thread of their own while the
values are checked (both read the same pages: the second read comes from the page cache). A Hub repo is not downloaded
again for this: its tree lists each LFS file's sha256 (what the Hub checked when it took the upload), and its regular
files are the small side files, hashed where the cache holds them.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fp8q.errors import Fp8qError
from fp8q.source.base import Source
from fp8q.source.checkpoint import CONFIG_FILE, INDEX_FILE, Checkpoint
from fp8q.source.files import read_bounded, sha256_file

MANIFEST_FILE = "fp8q.json"


@dataclass
class FileCheck:
    """What the files told: `problems` (changed or missing), `notes` (not listed), how many were checked."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0


def listed_files(folder: Path) -> dict[str, str] | None:
    """The files fp8q.json in `folder` lists, each with its sha256; None when fp8q did not make the folder."""
    try:
        manifest = json.loads(read_bounded(folder / MANIFEST_FILE).decode("utf-8"))
    except (OSError, ValueError, Fp8qError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("tool") == "fp8q" else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return None
    return {str(name): sha for name, sha in files.items()}


class FileHashes:
    """Started before the values are checked, `result()` after: every file fp8q.json lists, hashed (or, on the
    Hub, looked up) on a thread of its own."""

    def __init__(self, checkpoint: Checkpoint, source: Source, threads: int = 2) -> None:
        self.checkpoint, self.source, self.threads = checkpoint, source, max(1, threads)
        self.listed = listed_files(checkpoint.root)
        self._result = FileCheck()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fp8q-hash", daemon=True)
        if self.listed is not None:
            self._thread.start()

    def result(self) -> FileCheck:
        """The findings (nothing when fp8q.json lists no files: not an fp8q output).

        Raises:
            Fp8qError: a Hub repo's listing or one of its small files could not be had.
        """
        if self.listed is None:
            return self._result
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._result

    def _run(self) -> None:
        try:
            self._check()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by result()
            self._failure = e

    def _check(self) -> None:
        assert self.listed is not None
        found = self._result
        remote = self.source.listing()
        present = set(remote) if remote is not None else self._local_files()
        listed = sorted(self.listed.items())
        hashed = [name for name, _ in listed if name in present and (remote is None or remote.get(name) is None)]
        with ThreadPoolExecutor(self.threads, thread_name_prefix="fp8q-hash") as pool:
            # Two files at a time: hashing is the longest check of an output on the disk it was written to.
            local = dict(zip(hashed, pool.map(self._local_sha256, hashed), strict=True))
        for name, expected in listed:
            if name not in present:
                found.problems.append(
                    f"{name}: listed in {MANIFEST_FILE} but not in the output; it is incomplete: restore the file, "
                    "or make the output again"
                )
                continue
            actual = local.get(name) or (remote or {}).get(name) or ""
            found.checked += 1
            if actual != expected:
                found.problems.append(
                    f"{name}: its sha256 is {actual[:16]}..., not the {expected[:16]}... {MANIFEST_FILE} lists: it "
                    "changed after fp8q wrote it; restore it, or make the output again"
                )
        extra = sorted(present - set(self.listed) - {MANIFEST_FILE, ".gitattributes"})
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            found.notes.append(f"{extra[0]}{more}: not listed in {MANIFEST_FILE} (added after fp8q wrote the output)")

    def _local_sha256(self, name: str) -> str:
        """A file's sha256: the output folder's, or a Hub repo's small regular file (its copy in the cache)."""
        return sha256_file(self.source.side_file(name))

    def _local_files(self) -> set[str]:
        c = self.checkpoint
        names = {s.name for s in c.shards} | set(c.side_files) | set(c.skipped_files)
        return names | {n for n in (INDEX_FILE, CONFIG_FILE) if (c.root / n).is_file()}


__all__ = ["MANIFEST_FILE", "FileCheck", "FileHashes", "listed_files"]
