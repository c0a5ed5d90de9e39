"""Turn the `src` argument into a local path: a checkpoint on disk as it is, or a Hub repo id as a snapshot folder
(or, for a repo not in the cache, a HubStream that fetches its shards as the run goes: fp8q.source.streaming).

Imports: errors, checkpoint, network, streaming, huggingface_hub (which only this module and streaming talk to). A
repo id is looked up in the local Hugging Face cache first, so a cached model converts with no network at all (and
under HF_HUB_OFFLINE=1); only a cache miss downloads. Only what a conversion reads or copies is fetched: safetensors
weights and small side files, never pickles (`*.bin`, `*.pt`, ... can run code when unpickled) nor other weight
formats. When the repo has an index, only the shards it lists are fetched: some repos (Mistral's) also ship a
`consolidated.safetensors` that would double the download. Every failure is one `CheckpointError` line naming the
repo, with no traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import huggingface_hub.errors as hf_errors
from huggingface_hub import constants, snapshot_download
from huggingface_hub.utils import (
    HFValidationError,
    LocalEntryNotFoundError,
    validate_repo_id,
)
from huggingface_hub.utils import tqdm as hf_tqdm

from fp8q.errors import CheckpointError, UsageError
from fp8q.source.checkpoint import INDEX_FILE, WEIGHT_SUFFIXES, index_shards
from fp8q.source.network import HUB_ERRORS, OFFLINE_FIX, bound_requests, explain
from fp8q.source.streaming import HubStream, open_stream

# Side files a conversion copies: config, tokenizer, chat template, sentencepiece/tiktoken vocab, custom code, card.
SIDE_PATTERNS = (INDEX_FILE, "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "*.md")
# Weight formats fp8q never reads; pickles above all. Listed as ignore patterns so that they win over any allow.
IGNORE_PATTERNS = tuple(f"*{suffix}" for suffix in WEIGHT_SUFFIXES if suffix != ".safetensors")


class _PartialSnapshot(LocalEntryNotFoundError):
    """A cached snapshot without (all) its weights: one that AutoConfig alone filled, say."""


# huggingface_hub >= 1.x raises IncompleteSnapshotError when its cached tree listing shows missing files.
_PARTIAL = (_PartialSnapshot, getattr(hf_errors, "IncompleteSnapshotError", _PartialSnapshot))


def resolve_source(
    src: str, revision: str | None = None, cache_dir: str | Path | None = None, *, stream: bool = False
) -> Path | HubStream:
    """A local path as it is; otherwise `org/name` is a Hub repo id, resolved to a local snapshot folder, or with
    `stream`, when its weights are not all in the cache and it has an index, to a HubStream: side files
    downloaded, the missing shards' headers read by range requests, their weights left for the run to fetch.

    `revision` (branch, tag or commit hash; default: the repo's main branch) applies to repo ids only.
    `cache_dir` defaults to huggingface_hub's own (HF_HUB_CACHE), so a model cached by transformers or vLLM is reused.

    Raises:
        UsageError: a revision was given for a local path.
        CheckpointError: `src` is neither an existing path nor a usable repo id, or the repo cannot be fetched.
    """
    if src and Path(src).exists():
        if revision is not None:
            raise UsageError(f"{src}: --revision applies to Hub repo ids only, not to a local path")
        return Path(src)
    if not _is_repo_id(src):
        raise CheckpointError(
            f"{src}: no such file or folder; give a checkpoint folder, a .safetensors file or a Hub repo id"
        )
    bound_requests()
    label = f"Hub repo {src}" + (f" at revision {revision}" if revision else "")
    # Said too: a typo of a local folder (`lama`) reads as a repo id. A bare name is more likely a typo: said first.
    local = f" (and no file or folder {src!r} here)"
    if "/" not in src:
        label, local = f"{src}: no such file or folder here, and as a Hub repo: {label}", ""
    try:
        try:
            return _snapshot(src, revision, cache_dir, local_only=True)
        except LocalEntryNotFoundError as error:
            if _offline():
                what = "is only partly" if isinstance(error, _PARTIAL) else "is not"
                raise CheckpointError(
                    f"{label} {what} in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; {OFFLINE_FIX}{local}"
                ) from None
        if stream:
            side = _side_files(src, revision, cache_dir, local_only=False)
            streamed = open_stream(src, side, cache_dir, revision)
            if streamed is not None:
                return streamed if streamed.remote else side
        return _snapshot(src, revision, cache_dir, local_only=False)
    except HUB_ERRORS as error:
        raise CheckpointError(f"{label}: {explain(error)}{local}") from None


def _is_repo_id(src: str) -> bool:
    """`name` or `org/name` as the Hub spells them; a missing `x.safetensors` is a typo, not a repo."""
    if src.endswith(WEIGHT_SUFFIXES):
        return False
    try:
        validate_repo_id(src)
    except HFValidationError:
        return False
    return True


def _offline() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import; an environment set later is honoured here too."""
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def _snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, *, local_only: bool) -> Path:
    """Fetch (or find) side files, then the weights of the same commit; raise LocalEntryNotFoundError if incomplete.

    Two calls because the index, a side file, says which shards to fetch. The second names the commit the first
    resolved (the snapshot folder's name), so a branch that moves in between cannot mix two commits.
    """
    side = _side_files(repo_id, revision, cache_dir, local_only=local_only)
    weights = index_shards(side)
    patterns = ["*.safetensors"] if weights is None else [_literal(name) for name in weights]
    folder = Path(
        snapshot_download(
            repo_id,
            revision=side.name,
            allow_patterns=patterns,
            cache_dir=cache_dir,
            local_files_only=local_only,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    )
    if local_only and weights is None and len(list(folder.glob("*.safetensors"))) > 1:
        # Several shards and no index in the cache: some shards fetched alone (hf_hub_download), not the snapshot.
        raise _PartialSnapshot(f"{folder}: cached shards without their index")
    if not _has_weights(folder, weights):
        if local_only:
            # Caches written before huggingface_hub 1.x tree listings (or by hand) pass its own completeness check.
            raise _PartialSnapshot(f"{folder}: cached snapshot without its safetensors weights")
        raise CheckpointError(
            f"Hub repo {repo_id}: no .safetensors weights in the repo; fp8q converts safetensors checkpoints only "
            "and never downloads pickled .bin/.pt weights"
        )
    return folder


def _side_files(repo_id: str, revision: str | None, cache_dir: str | Path | None, *, local_only: bool) -> Path:
    """The snapshot folder with the repo's side files (config, index, tokenizer, card, ...), no weights."""
    folder = snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_only,
        allow_patterns=list(SIDE_PATTERNS),
        ignore_patterns=list(IGNORE_PATTERNS),
        tqdm_class=_Silent,  # a few small files: no bar of their own above fp8q's
    )
    return Path(folder)


class _Silent(hf_tqdm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly `name` (`[`, `*` and `?` escaped as one-character classes)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def _has_weights(folder: Path, shards: list[str] | None) -> bool:
    if shards is not None:
        return bool(shards) and all((folder / name).is_file() for name in shards)
    return folder.is_dir() and any(folder.glob("*.safetensors"))
