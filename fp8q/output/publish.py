"""An output published to a Hub repo in the same pass (`--push-to-hub`): the repo checked before anything is
converted (output.repo_target, which the Publisher extends), each finished shard uploaded while the next converts
(and, with no OUT, deleted once it is up), and every file committed at the end in one commit, so the repo shows nothing
of the run until it is complete.

Imports: errors, output (destination, the protocol it meets; manifest, the run's records; repo_target), source.network
(a bound on every request), httpx (what the client raises once its own retries are spent: not OSErrors), huggingface_hub
(the Hub's own client: Xet where hf_xet is installed and HF_HUB_DISABLE_XET unset, else classic LFS; HF_ENDPOINT,
HF_TOKEN and the cache settings as everywhere). Uploads go through `preupload_lfs_files`, which stores the bytes but
commits nothing; `create_commit` then names every file at once. A shard's sha256 is the one fp8q computed while writing
it, handed to the client (`UploadInfo`; both paths use a known one instead of hashing again), so the client reads each
shard once, to send it."""

from __future__ import annotations

import base64
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, RepoFile
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info
from huggingface_hub.utils._runtime import is_xet_available

from fp8q.errors import OutputError, Stopped
from fp8q.output.destination import Delivered, Published, Say
from fp8q.output.manifest import Progress
from fp8q.output.repo_target import BORN_WITH, CARD, RepoTarget, cause_of, hub_error
from fp8q.source.network import no_answer

SAMPLE_BYTES = 512  # what the Hub is shown of a file to choose how it is stored (UploadInfo.sample)
# A commit answered "LFS pointer pointed to a file that does not exist" right after the upload (the Hub's storage
# lagging behind) is sent again after these waits; then the answer stands.
STORAGE_LAG_WAITS_S = (1.0, 2.0, 4.0, 8.0)
_LAG_WORDS = "pointed to a file that does not exist"


@dataclass(frozen=True)
class Uploaded:
    """A shard's bytes as the Hub holds them (LFS): enough to commit it without the file."""

    sha256: str
    size: int
    sample: str  # base64 of its first SAMPLE_BYTES bytes

    def operation(self, name: str, path: Path, *, held: bool = False) -> CommitOperationAdd:
        """Its entry for huggingface_hub: the local file where it is still there (else empty bytes, never sent),
        with fp8q's sha256, so that the client does not hash it again. `held`: the Hub has the object already (this
        process or another uploaded it; `confirmed` asked, on --resume): the entry is marked as the client marks an
        operation `preupload_lfs_files` has uploaded, and the commit only names it (LFS or Xet alike)."""
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path) if path.is_file() else b"")
        op.upload_info = UploadInfo(self.size, base64.b64decode(self.sample), sha256=bytes.fromhex(self.sha256))
        if held:
            op._upload_mode, op._is_uploaded = "lfs", True
        return op


class Publisher(RepoTarget):
    """The Hub repo an output goes to, a Destination (output.destination): `check` before anything is converted;
    `put` each finished shard (uploaded on a thread of its own, one at a time, in order); `commit` once at the end.
    With `room` set (no OUT: shards are deleted once uploaded) at most that many finished or open shards wait on
    local disk: `room` holds the writer."""

    def __init__(self, repo_id: str, revision: str | None, *, room: int | None, **target: Any) -> None:
        """`target`: what RepoTarget takes (create_pr, private, overwrite, source_repo, fingerprint)."""
        super().__init__(repo_id, revision, **target)
        self.xet = is_xet_available()  # how the client uploads: Xet (hf_xet installed, not disabled), else LFS
        self.notes: list[str] = []  # what the commit left alone or replaced that a person may have made
        self.kept: list[str] = []  # files the commit left as they were: fp8q did not write them
        self.uploaded: dict[str, Uploaded] = {}
        self.bytes_sent = 0
        # Waits on the Hub (perf_counter intervals): uploads holding the disk, the last uploads, the commit.
        self.waits: list[tuple[float, float]] = []
        self._room = room
        self._on_disk = 0
        self._changed = threading.Condition()
        self._failure: BaseException | None = None
        self._queue: list[tuple[str, Path, str, Delivered, bool]] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self._pending = 0  # handed to `put`, not on the Hub yet

    # ── before anything is converted ──

    @property
    def sends(self) -> bool:
        return True

    def resume(self, progress: Progress) -> set[str]:
        """Which shards an earlier run uploaded (its records) the Hub still holds (it offers no upload for them);
        they are committed as uploaded. An upload counts only for the shard as last made: a shard made again after
        its upload (its source changed in place, say) has a done record of another sha256, and is sent again. Over
        Xet, none: the client never asks the LFS batch endpoint there, and what it answers of objects uploaded by Xet
        is not the Xet store's word. A shard still on disk is then committed from it (its chunks, in the store
        already, are not sent again: the commit is the check), and one deleted after its upload is made again."""
        done = progress.done()
        recorded = {
            name: Uploaded(**entry)
            for name, entry in progress.uploads().items()
            if name in done and done[name]["sha256"] == entry["sha256"]
        }
        held = self._confirmed(recorded)
        self.uploaded = {name: recorded[name] for name in held}
        return held

    def _confirmed(self, recorded: dict[str, Uploaded]) -> set[str]:
        if not recorded or self.xet:
            return set()
        infos = {
            name: UploadInfo(u.size, base64.b64decode(u.sample), sha256=bytes.fromhex(u.sha256))
            for name, u in recorded.items()
        }
        try:
            actions, errors, _ = post_lfs_batch_info(infos.values(), None, "model", self.repo_id)
        except (HfHubHTTPError, ValueError, httpx.HTTPError, OSError):
            return set()
        missing = {a["oid"] for a in actions if a.get("actions")} | {e.get("oid") for e in errors}
        return {name for name, u in recorded.items() if u.sha256 not in missing}

    def _adopt(self, recorded: dict[str, dict[str, Any]], done: dict[str, Any]) -> None:
        """Shards other processes of this run uploaded (their records, under torchrun): committed with the rest.
        Each commit entry carries the object's sha256 and size, so the Hub's copy is used, whoever uploaded it. A
        record counts only for the shard as last made (`done`, the shards' records): an upload of an earlier
        making of it is not the shard any more."""
        for name, entry in recorded.items():
            if name not in done or done[name]["sha256"] != entry["sha256"]:
                continue
            if name not in self.uploaded or self.uploaded[name].sha256 != entry["sha256"]:
                self.uploaded[name] = Uploaded(**entry)
                self.bytes_sent += int(entry["size"])

    # ── while converting ──

    def room(self, stop: threading.Event) -> None:
        """Hold the caller while `room` shards are on local disk (open, or finished and not uploaded yet)."""
        with self._changed:
            since = time.perf_counter()
            while self._room is not None and self._on_disk >= self._room:
                self._raise_if_failed()
                if stop.is_set():
                    return
                self._changed.wait(0.1)
            self.waits.append((since, time.perf_counter()))
            self._raise_if_failed()
            self._on_disk += 1

    def lost(self) -> None:
        """A shard given room will not be uploaded (it could not be finished): its room is free again."""
        with self._changed:
            if self._room is not None:
                self._on_disk -= 1
            self._changed.notify_all()

    def put(self, name: str, path: Path, sha256: str, delivered: Delivered) -> None:
        """Upload a finished shard on the upload thread; once the Hub has it, tell `delivered` its record (for
        --resume) and, with room bounded (no OUT), delete the local file."""
        with self._changed:
            self._raise_if_failed()
            self._queue.append((name, path, sha256, delivered, self._room is not None))
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._uploads, name="fp8q-upload", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def _uploads(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if not self._queue:
                    return
                name, path, sha256, delivered, delete = self._queue.pop(0)
            try:
                size = path.stat().st_size
                with open(path, "rb") as f:
                    sample = f.read(SAMPLE_BYTES)
                done = Uploaded(sha256, size, base64.b64encode(sample).decode("ascii"))
                op = done.operation(name, path)
                self.api.preupload_lfs_files(self.repo_id, [op], revision=self._target(), create_pr=self.create_pr)
                if op._upload_mode != "lfs":  # the repo's .gitattributes, say: it would go in the commit, not now
                    raise OutputError(f"the Hub stores {name} as a regular file, not LFS (the repo's .gitattributes?)")
                delivered(name, asdict(done))
                if delete:
                    os.unlink(path)
            except BaseException as e:  # noqa: BLE001 - the run's failure, raised in the writer or at the end
                with self._changed:
                    self._failure = _upload_error(self.repo_id, name, e)
                    self._queue.clear()
                    self._changed.notify_all()
                return
            with self._changed:
                self.uploaded[name] = done
                self.bytes_sent += size
                self._pending -= 1
                if delete:
                    self._on_disk -= 1
                self._changed.notify_all()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def drain(self, stop: threading.Event, say: Say) -> None:
        """Wait for every upload (with OUT, conversion may be far ahead of them), said if any is left; raise the
        first failure (OutputError naming the shard), or Stopped once `stop` is set (SIGINT, SIGTERM: the run ends
        now)."""
        with self._changed:
            pending = self._pending  # handed to `put`, not on the Hub yet (the one being sent included)
        if pending:
            say(f"uploading the last {pending} shard(s) to {self.repo_id}")
        since = time.perf_counter()
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        while self._thread is not None and self._thread.is_alive():
            if stop.is_set():
                raise Stopped
            self._thread.join(0.1)
        self.waits.append((since, time.perf_counter()))
        self._raise_if_failed()

    def close(self) -> None:
        """At the run's end, whatever happened: no upload starts any more. One in progress is not waited for (a
        stopped run ends now, not after a shard of gigabytes is sent): the thread is a daemon, and a shard it does
        finish is recorded as uploaded, which is true."""
        with self._changed:
            self._closing = True
            self._queue.clear()
            self._changed.notify_all()

    # ── at the end ──

    def commit(
        self, folder: Path, names: list[str], progress: Progress, message: str, stop: threading.Event, say: Say
    ) -> None:
        """One commit of every file of the output (shards uploaded already, by any process, the rest from
        `folder`), replacing what the repo held (--overwrite); nothing of the run is visible before it. The request
        runs on a thread of its own, so that a signal (`stop`) ends the wait for a Hub that does not answer.

        Raises:
            OutputError: the Hub refused it (the one line says to run again with --resume), or did not answer.
            Stopped: `stop` was set while the commit was under way (its words say it may have landed).
        """
        self._adopt(progress.uploads(), progress.done())  # the shards the other processes uploaded (under torchrun)
        say(f"committing {len(names)} files to {self.where}")
        ops: list[CommitOperationAdd | CommitOperationDelete] = []
        for name in names:
            if name in self.uploaded:
                ops.append(self.uploaded[name].operation(name, folder / name, held=True))
            else:
                ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)))
                self.bytes_sent += (folder / name).stat().st_size
        # Only what fp8q wrote there before goes (or is replaced); what a person added stays, said in a note.
        new = set(names)
        replaced = set(self.changed) & new if self.overwrite else set()  # changed since, and --overwrite says so
        theirs = sorted(set(self.existing) & new - self.ours - replaced - ({CARD} if self.stub_card else set()))
        if theirs and not self.create_pr:
            raise OutputError(
                f"{self.repo_id}: holds {theirs[0]}, which fp8q did not write and the output has too; fp8q replaces "
                "nothing it did not write: move it aside on the Hub, or use --create-pr to propose the output"
            )
        ops += [CommitOperationDelete(path_in_repo=name) for name in self.existing if name in self.ours - new]
        if replaced:
            self.notes.append(
                f"{self.repo_id}: replaced {', '.join(sorted(replaced))}, changed on the Hub since fp8q published it "
                "(--overwrite)"
            )
        self.kept = sorted(set(self.existing) - self.ours - new)
        if self.kept:
            more = f" and {len(self.kept) - 1} more" if len(self.kept) > 1 else ""
            self.notes.append(
                f"{self.repo_id}: kept {self.kept[0]}{more}, which fp8q did not write (its fp8q.json does not list it)"
            )
        if self.stub_card and CARD in new:
            self.notes.append(
                f"{self.repo_id}: its README.md, the stub the Hub made with the repo, is now the model card"
            )
        answer: list[Any] = []

        def send() -> None:
            try:
                if not self.branch_exists and not self.create_pr:
                    self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
                for wait in (*STORAGE_LAG_WAITS_S, None):
                    try:
                        answer.append(
                            self.api.create_commit(
                                self.repo_id,
                                ops,
                                commit_message=message,
                                revision=self.revision,
                                create_pr=self.create_pr,
                                parent_commit=self.parent if self.branch_exists else None,
                            )
                        )
                        return
                    except HfHubHTTPError as e:
                        if wait is None or not _storage_lag(e):
                            raise
                        time.sleep(wait)  # an object just uploaded, not yet seen by the commit's side of the Hub
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                answer.append(e)

        sender = threading.Thread(target=send, name="fp8q-commit", daemon=True)
        since = time.perf_counter()
        sender.start()
        while sender.is_alive():
            if stop.is_set():
                raise Stopped(f"while the commit to {self._where()} was under way: it may have landed; {self._check()}")
            sender.join(0.1)
        self.waits.append((since, time.perf_counter()))
        info = answer[0]
        if isinstance(info, BaseException):
            raise self._commit_error(info) from None
        self._check_committed(info.oid, [op for op in ops if isinstance(op, CommitOperationAdd)], set(self.kept))
        self.published = Published(self.repo_id, self.revision, info.oid, info.commit_url, info.pr_url)

    def _check(self) -> str:
        """How a user tells whether a commit whose answer never came landed."""
        revision = "refs/pr/N" if self.create_pr else self.revision
        return f"check with `fp8q verify {self.repo_id} --revision {revision}`"

    def _commit_error(self, error: BaseException) -> BaseException:
        """A failed commit in one line that says what happened to the repo and what to do."""
        if not isinstance(error, (HfHubHTTPError, ValueError, RuntimeError, httpx.HTTPError, OSError)):
            return error  # a bug: its traceback is worth more (RuntimeError: hf_xet's errors)
        status, _ = cause_of(error)
        lost = no_answer(error) is not None or isinstance(error, httpx.RemoteProtocolError)
        if status is None and lost:  # the request went out; its answer did not come back
            why = no_answer(error) or "the connection closed before the Hub answered"
            return OutputError(f"{self.repo_id}: the commit was sent but {why}; it may have landed: {self._check()}")
        if isinstance(error, HfHubHTTPError) and _storage_lag(error):
            return OutputError(
                f"{self.repo_id}: the Hub does not show the shards this run uploaded (its answer to the commit, after "
                f"{len(STORAGE_LAG_WAITS_S) + 1} tries over {sum(STORAGE_LAG_WAITS_S):g} s: {cause_of(error)[1]}); "
                "the repo is as it was: rerun with --resume"
            )
        if status == 412:
            return OutputError(
                f"{self.repo_id}: {self.revision} moved while this run went on (another push to it?), so the commit "
                "was refused and the repo is as that push left it; check what it holds, then rerun with --resume to "
                "commit on top of it"
            )
        return _upload_error(self.repo_id, "the commit", error)

    def _check_committed(self, commit: str, added: list[CommitOperationAdd], kept: set[str]) -> None:
        """Read back the commit's tree: every file there with the size (and, for the shards, the sha256) fp8q wrote,
        and nothing else but what a repo is born with and what a person added (`kept`; a pull request shows the
        branch's files too).
        One listing of the tree; the bytes are not read again.

        Raises:
            OutputError: the Hub holds something else than what was sent.
        """
        try:
            tree = {
                entry.path: entry
                for entry in self.api.list_repo_tree(self.repo_id, revision=commit, recursive=True)
                if isinstance(entry, RepoFile)
            }
        except (HfHubHTTPError, ValueError, httpx.HTTPError, OSError) as e:
            raise hub_error(self.repo_id, f"reading back commit {commit[:12]}", e) from None
        for op in added:
            name, info = op.path_in_repo, op.upload_info
            entry = tree.get(name)
            lfs_sha = entry.lfs.sha256 if entry is not None and entry.lfs is not None else None
            hashed = getattr(info, "is_hashed", True)  # else knowing it would read the file again
            if entry is None or entry.size != info.size or (lfs_sha and hashed and lfs_sha != info.sha256.hex()):
                found = (
                    "nothing" if entry is None else f"{entry.size} bytes" + (f", sha256 {lfs_sha}" if lfs_sha else "")
                )
                raise OutputError(
                    f"{self.repo_id}: commit {commit[:12]} holds {found} as {name}, not the {info.size} bytes fp8q "
                    "wrote; do not use that commit: revert it on the Hub and run again"
                )
        extra = sorted(set(tree) - {op.path_in_repo for op in added} - set(BORN_WITH) - kept)
        if extra and not self.create_pr:
            raise OutputError(
                f"{self.repo_id}: commit {commit[:12]} also holds {extra[0]} (and {len(extra) - 1} more), which the "
                "output does not have; do not use that commit: revert it on the Hub and run again"
            )


def _storage_lag(error: HfHubHTTPError) -> bool:
    """The Hub's answer to a commit naming an object its storage does not show yet (right after an upload)."""
    return _LAG_WORDS in str(error) or _LAG_WORDS in getattr(getattr(error, "response", None), "text", "")


def _upload_error(repo_id: str, what: str, error: BaseException) -> OutputError:
    """One line naming the file; the run adds where its finished shards are kept for --resume."""
    status, first = cause_of(error)
    why = no_answer(error) or (f"HTTP {status}: {first}" if status else first)
    return OutputError(f"{repo_id}: uploading {what} failed ({why}); what the Hub took is kept")


__all__ = ["Published", "Publisher", "Uploaded"]
