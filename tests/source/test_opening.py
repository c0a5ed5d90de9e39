"""open_source: SRC told apart once, into a Source whose names, checkpoint and shard files the engine and verify use
without asking what it is. Offline, against a Hugging Face cache built by hand."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from huggingface_hub import constants

from fp8q.errors import UsageError
from fp8q.source.base import HubRepo
from fp8q.source.local import LocalShards, LocalSource
from fp8q.source.opening import on_disk, open_source
from tests.source.test_source import COMMIT_A, COMMIT_B, REPO, _snapshot, cache, offline  # noqa: F401


@pytest.fixture
def hf_cache(cache: Path, offline: None, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_folder_is_a_local_source_named_by_its_path(hf_cache: Path) -> None:
    folder = _snapshot(hf_cache, COMMIT_A).resolve()
    plain = folder.parent.parent.parent.parent / "copy"
    plain.mkdir()
    for f in folder.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    source = open_source(plain)
    assert isinstance(source, LocalSource)
    assert (source.path, source.given, source.label) == (plain, str(plain), str(plain))
    assert source.origin is None and source.repo is None and dict(source.remote) == {}
    assert source.most_on_disk(set()) == [] and source.on_demand() is None and source.listing() is None
    checkpoint = source.read()
    assert list(checkpoint.tensors) == ["model.embed.weight"]
    files = source.shard_files(["model.safetensors"], False, lambda name, n: None, plain / "staging")
    assert isinstance(files, LocalShards) and files.total_bytes == 0 and files.order == []
    assert files.ready(checkpoint.shards[0], threading.Event()) == plain / "model.safetensors"
    assert not (plain / "staging").exists()  # nothing to download: no folder made
    assert source.side_file("config.json") == plain / "config.json"


def test_a_cache_snapshot_given_as_a_path_is_the_repo_at_its_commit(hf_cache: Path) -> None:
    snapshot = _snapshot(hf_cache, COMMIT_B)
    source = open_source(snapshot)
    assert source.given == str(snapshot) and source.label == f"{REPO}@{COMMIT_B}" == source.origin
    assert source.repo == HubRepo(REPO, COMMIT_B)  # what the model card names
    # One file of it: the card still names the repo; the fingerprint records no origin (the file is a blob link).
    single = open_source(snapshot / "model.safetensors")
    assert single.repo == HubRepo(REPO, COMMIT_B) and single.origin is None


@pytest.mark.parametrize(("revision", "commit"), [(None, COMMIT_A), ("v2", COMMIT_B)])
def test_a_cached_repo_id_is_named_as_given_and_read_from_its_snapshot(
    hf_cache: Path, revision: str | None, commit: str
) -> None:
    source = open_source(REPO, revision)
    assert isinstance(source, LocalSource) and source.path == _snapshot(hf_cache, commit).resolve()
    assert source.given == REPO and source.label == f"{REPO}@{commit}" == source.origin
    assert source.repo == HubRepo(REPO, revision)  # the revision as given (None: main), as the card says it
    assert source.read().config is not None


def test_a_source_passes_through_and_a_path_for_verify_asks_no_hub(tmp_path: Path) -> None:
    source = LocalSource(tmp_path)
    assert open_source(source) is source and on_disk(source) is source
    missing = tmp_path / "nothing"
    assert on_disk(missing) == LocalSource(missing)  # verify says what is missing, in its own words
    with pytest.raises(UsageError, match="--revision applies to Hub repo ids only"):
        open_source(tmp_path, "main")
