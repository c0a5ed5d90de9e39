"""The Hub repo an output is published to, as it stands before the run (RepoTarget, the part of output.publish's
Publisher that reads): checked without a change (a token that can write, the source not the target, what the repo
holds at the revision and who wrote it: fp8q's fp8q.json lists its files, and what a person added or changed since is
theirs), created only once every local check has passed (`open`), and said in a line for --dry-run (`outlook`).

Imports: errors, output.destination (types), output.manifest (what makes two outputs the same), source (files,
network), httpx, huggingface_hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from fp8q.errors import OutputError, UsageError
from fp8q.output.destination import Broadcast, Published
from fp8q.output.manifest import same_output
from fp8q.source.files import sha256_file
from fp8q.source.network import bound_requests, no_answer

MANIFEST = "fp8q.json"
CARD = "README.md"
# Files a repo holds from its creation, which say nothing of what is in it.
BORN_WITH = (".gitattributes",)
_XET_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3}) ")  # in hf_xet's RuntimeError text
_STUB_MAX_BYTES = 4096  # a README the Hub's "new repository" page makes is a few lines
_FRONT_MATTER = re.compile(r"\A\s*---\r?\n.*?\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)


class RepoTarget:
    """The repo, read before anything is converted: `check` (changing nothing), `outlook` (--dry-run), `settle`
    (under torchrun), `open` (a repo `check` found missing, created)."""

    def __init__(
        self,
        repo_id: str,
        revision: str | None,
        *,
        create_pr: bool,
        private: bool,
        overwrite: bool,
        source_repo: str | None,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self.repo_id = repo_id
        # What makes this run's output (the fingerprint --resume compares): a repo whose fp8q.json has the same holds
        # this very output (a run that committed, then failed on this side), and may be published again.
        self.fingerprint = fingerprint
        self.revision = revision or "main"  # a branch, created from main if missing
        self.create_pr = create_pr  # the commit opens a pull request instead of landing on the branch
        self.private = private  # for a repo created now
        self.overwrite = overwrite  # replace what fp8q published there before (its fp8q.json says so)
        self.source_repo = source_repo
        bound_requests()
        self.api = HfApi()
        self.parent: str | None = None  # the revision's commit when checked: the commit fails if it moved
        self.branch_exists = True
        self.existing: list[str] = []  # files the repo holds at the revision
        # What fp8q wrote there before (the files its current fp8q.json lists, and fp8q.json): all a commit may
        # replace or delete. Anything else (evals.json, a results table a person added) stays.
        self.ours: set[str] = set()
        self.changed: list[str] = []  # files fp8q published there that someone changed since (theirs now)
        self.gone: list[str] = []  # files the repo's fp8q.json lists that it no longer holds
        self.listed: set[str] = set()  # the files the repo's fp8q.json lists
        self.up_to_date = False  # the repo holds this very output, every file as published: nothing to do
        self.stub_card = False  # the repo holds only a README the Hub made with it: the model card replaces it
        self.missing = False  # `check` found no such repo: `open` makes it
        self.published: Published | None = None  # the commit that holds the output: found (`check`), or made

    # ── before anything is converted ──

    def check(self, names: set[str]) -> bool:
        """The repo checked, nothing changed on the Hub (a repo that does not exist is not created); True when it
        holds this very output (the files `names`), every file as published."""
        self._check_repo(create=False)
        if self.up_to_date and self.listed == names:
            assert self.parent is not None
            url = f"{self.api.endpoint}/{self.repo_id}/commit/{self.parent}"
            self.published = Published(self.repo_id, self.revision, self.parent, url, None)
            return True
        return False

    def accept(self) -> None:
        pass  # what the repo refuses, `check` refused: a run replaces only what fp8q published there

    def outlook(self, names: set[str]) -> str | None:
        """What a run would do to the repo, in a line (--dry-run, once checked)."""
        if self.missing:
            return f"{self.repo_id} does not exist: a run creates it and commits the output to it"
        if self.published is not None:
            return f"up to date: {self.repo_id}@{self.parent} holds this output: a run changes nothing"
        where = f"a pull request against {self.revision}" if self.create_pr else f"one commit on {self.revision}"
        what = "replaces the fp8q output it holds" if self.ours else "publishes the output"
        return f"{self.repo_id}: a run {what} in {where}"

    def settle(self, broadcast: Broadcast) -> None:
        """Under torchrun: whether the branch exists, as rank 0 found it (uploads are checked against it)."""
        self.branch_exists = broadcast(self.branch_exists)

    def _check_repo(self, *, create: bool) -> None:
        """Refuse, in one line, what would fail later: no usable token, a token that cannot write, the source as
        the target, a target holding files fp8q did not publish (or did, without --overwrite). `create` False
        (--dry-run): change nothing on the Hub; a repo that does not exist yet is only checked to be in a
        namespace of the token's user.

        Raises:
            OutputError, UsageError: as above.
        """
        repo_id = self.repo_id
        if self.source_repo is not None and repo_id.lower() == self.source_repo.lower():
            raise UsageError(f"--push-to-hub {repo_id}: that is the source repo; push to another one")
        try:
            me = self.api.whoami()
        except (HfHubHTTPError, LocalTokenNotFoundError, httpx.HTTPError, OSError) as e:
            raise hub_error(repo_id, "cannot publish", e) from None
        try:
            if create:
                self.api.create_repo(repo_id, private=self.private, exist_ok=True)
            if self.private and self.api.model_info(repo_id).private is False:
                raise OutputError(
                    f"{repo_id}: is public and --private was given; fp8q does not change a repo's visibility: make "
                    "it private on the Hub first, or push without --private"
                )
            try:
                info = self.api.model_info(repo_id, revision=self.revision)
                self.parent = info.sha
                self.existing = [s.rfilename for s in info.siblings or [] if s.rfilename not in BORN_WITH]
            except RevisionNotFoundError:
                if self.create_pr:
                    raise OutputError(
                        f"{repo_id}: has no branch {self.revision} for --create-pr to open a pull request against; "
                        "push to it without --create-pr (it is then created from main), or name an existing branch"
                    ) from None
                self.branch_exists = False  # made from main just before the commit
            probe = CommitOperationAdd(path_in_repo=".fp8q-write-check", path_or_fileobj=b"fp8q")
            # Asks the Hub how it would store a file, which takes write access, and stores nothing.
            self.api.preupload_lfs_files(repo_id, [probe], revision=self._target(), create_pr=self.create_pr)
        except RepositoryNotFoundError as e:
            if create:
                raise hub_error(repo_id, "cannot publish there", e) from None
            _check_namespace(repo_id, me)
            self.missing = True
            return  # a run would create it: nothing in it to check
        except (HfHubHTTPError, httpx.HTTPError, OSError) as e:
            raise hub_error(repo_id, "cannot publish there", e) from None
        manifest = self._manifest() if MANIFEST in self.existing else None
        if manifest is not None and manifest.get("tool") == "fp8q":
            listed = manifest.get("files")
            listed = {str(k): str(v) for k, v in listed.items()} if isinstance(listed, dict) else {}
            # A file fp8q wrote that someone changed since (a model card edited on the Hub) is theirs now.
            self.listed = set(listed)
            self.changed = self._changed_since(listed)
            self.ours = ({MANIFEST} | set(listed)) - set(self.changed)
            if self.changed and not self.overwrite and not self.create_pr:
                more = f" (and {len(self.changed) - 1} more)" if len(self.changed) > 1 else ""
                raise OutputError(
                    f"{repo_id}: {self.changed[0]}{more} changed on the Hub since fp8q published it, and fp8q "
                    "replaces nothing it did not write: pass --overwrite to replace it with this run's, or move it "
                    "aside (or --create-pr)"
                )
        if self.existing == [CARD] and self._is_stub_card():
            self.stub_card = True  # what the Hub's "new repository" page makes: nothing of anyone's to keep
        elif self.existing and not self.create_pr:
            if not self.ours:
                raise OutputError(
                    f"{repo_id}: holds files ({len(self.existing)}) that fp8q did not publish; push to an empty or "
                    "new repo (or use --create-pr to propose the output instead)"
                )
            # This very output, every file of it as published: the run has nothing to do (a CI job run again).
            same = manifest is not None and self._same_output(manifest)
            whole = not self.changed and not self.gone
            self.up_to_date = same and whole and (self.fingerprint or {}).get("origin") is not None
            if not self.overwrite and manifest is not None and not same:
                raise OutputError(
                    f"{repo_id}: already holds an fp8q output; pass --overwrite to replace it in one commit, or "
                    "push elsewhere"
                )

    def _changed_since(self, listed: dict[str, str]) -> list[str]:
        """The files fp8q.json lists whose bytes on the Hub are not the ones it lists: an LFS file's sha256 from the
        tree (one listing), a regular (small) one hashed once downloaded. A file gone counts as unchanged (and is
        recorded in `gone`)."""
        try:
            tree = {
                e.path: e
                for e in self.api.list_repo_tree(self.repo_id, revision=self.parent, recursive=True)
                if isinstance(e, RepoFile)
            }
            changed = []
            self.gone = sorted(name for name in listed if name not in tree)
            for name, sha256 in sorted(listed.items()):
                entry = tree.get(name)
                if entry is None:
                    continue
                if entry.lfs is not None:
                    now = entry.lfs.sha256
                else:
                    path = self.api.hf_hub_download(self.repo_id, name, revision=self.parent)
                    now = sha256_file(Path(path))
                if now != sha256:
                    changed.append(name)
            return changed
        except (HfHubHTTPError, httpx.HTTPError, OSError) as e:
            raise hub_error(self.repo_id, "reading what fp8q published there", e) from None

    def _is_stub_card(self) -> bool:
        """Whether the repo's README.md is the stub a new repo is made with: front matter and headings at most."""
        try:
            path = self.api.hf_hub_download(self.repo_id, CARD, revision=self.revision)
            with open(path, "rb") as f:
                text = f.read(_STUB_MAX_BYTES + 1).decode("utf-8")
        except (HfHubHTTPError, OSError, UnicodeDecodeError, httpx.HTTPError):
            return False
        if len(text) > _STUB_MAX_BYTES:
            return False
        body = _FRONT_MATTER.sub("", text, count=1)
        return all(not line.strip() or line.lstrip().startswith("#") for line in body.splitlines())

    def open(self) -> None:
        """The repo `check` found missing, created now (and checked as a run checks an existing one)."""
        if self.missing:
            self._check_repo(create=True)
            self.missing = False

    def _manifest(self) -> dict[str, Any] | None:
        """The repo's fp8q.json (at most 1 MB of it), or None when it cannot be read as one."""
        try:
            path = self.api.hf_hub_download(self.repo_id, MANIFEST, revision=self.revision)
            with open(path, "rb") as f:
                manifest = json.loads(f.read(1 << 20))
        except (HfHubHTTPError, OSError, ValueError, httpx.HTTPError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def _same_output(self, manifest: dict[str, Any]) -> bool:
        """Whether the repo's fp8q.json says it holds what this run makes: same fp8q version, options and source."""
        return self.fingerprint is not None and same_output(manifest, self.fingerprint)

    def _target(self) -> str | None:
        """The revision uploads are checked against: the branch, or main until a missing branch is made."""
        return self.revision if self.branch_exists else None

    def _where(self) -> str:
        return f"{self.repo_id} ({'a pull request on ' if self.create_pr else ''}{self.revision})"

    @property
    def where(self) -> str:
        """The repo and the branch (or pull request) the commit goes to, in words."""
        return self._where()


def cause_of(error: BaseException) -> tuple[int | None, str]:
    """The HTTP status and first line of what went wrong: huggingface_hub wraps a refused upload's HTTP error in
    one of its own ("Error while uploading ..."), so the chain is walked to the answer that has a status."""
    seen: BaseException | None = error
    while seen is not None:
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if status is not None:
            break
        seen = seen.__cause__ or seen.__context__
    found = seen or error
    text = str(found).strip()
    if status is None and (xet := _XET_STATUS.search(text)):  # hf_xet's errors say the status in their text
        status = int(xet[1])
    return status, text.splitlines()[0] if text else type(found).__name__


def hub_error(repo_id: str, what: str, error: Exception) -> OutputError:
    status, first = cause_of(error)
    silent = no_answer(error)
    if silent is not None:
        why = silent
    elif get_token() is None or isinstance(error, LocalTokenNotFoundError):
        why = (
            "no Hugging Face token found: log in with `hf auth login`, or set HF_TOKEN to a token that can write to it"
        )
    elif status == 401:
        why = "the Hub does not accept the token: set HF_TOKEN to a token that can write to it"
    elif status == 403:
        why = "the token may not write to it: use a token with write access to its namespace"
    else:
        why = first
    return OutputError(f"{repo_id}: {what}: {why}")


def _check_namespace(repo_id: str, me: dict[str, Any]) -> None:
    """What a dry run can tell of a repo that does not exist yet without creating it: the token can write, and the
    namespace is its user's or one of their organizations'."""
    auth = me.get("auth") or {}
    role = (auth.get("accessToken") or {}).get("role")
    if role == "read":
        raise OutputError(f"{repo_id}: cannot publish there: the token may not write to it: use a token with write "
                          "access to its namespace")  # fmt: skip
    namespace = repo_id.split("/")[0]
    names = {me.get("name")} | {org.get("name") for org in me.get("orgs") or []}
    if namespace not in names:
        raise OutputError(
            f"{repo_id}: cannot publish there: {namespace} is neither the token's user ({me.get('name')}) nor one of "
            "their organizations; use a token with write access to its namespace"
        )


__all__ = ["BORN_WITH", "CARD", "MANIFEST", "RepoTarget", "cause_of", "hub_error"]
