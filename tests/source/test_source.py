"""resolve_source against a real Hugging Face cache folder built by hand, fully offline.

The cache is laid out as huggingface_hub lays it out: `models--org--name/blobs/<sha256>`, `snapshots/<commit>/<file>`
as relative symlinks to the blobs, `refs/<branch>` holding the commit hash (no newline: huggingface_hub does not strip
it). The network is never reached: offline tests use HF_HUB_OFFLINE, and the few that exercise the download path
replace snapshot_download's network side by a fake while its cache-only side stays the real one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load_file, save_file

import fp8q.source.hub as source
from fp8q import QuantizeOptions, quantize
from fp8q.errors import CheckpointError, UsageError
from fp8q.source.checkpoint import read_checkpoint
from fp8q.source.hub import resolve_source
from tests.support.factories import write_shards
from tests.support.runs import CONFIG, ROOT, _cli, _refused

REPO = "tiny-org/tiny-model"
COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"
Files = dict[str, bytes]


def _safetensors(tensors: dict[str, torch.Tensor], tmp: Path) -> bytes:
    path = tmp / f"t{len(list(tmp.glob('t*')))}.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()


def _model_files(tmp: Path, value: float) -> Files:
    weight = torch.full((4, 8), value, dtype=torch.bfloat16)
    return {
        "model.safetensors": _safetensors({"model.embed.weight": weight}, tmp),
        "config.json": json.dumps({"model_type": "llama", "marker": value}).encode(),
        "tokenizer.json": b'{"version": "1.0"}\n',
    }


def add_commit(
    cache: Path, repo_id: str, commit: str, files: Files, refs: tuple[str, ...] = (), tree: list[str] | None = None
) -> Path:
    """Add one commit to a hub cache as huggingface_hub stores it; `tree` also writes its cached tree listing."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    if tree is not None:
        entries = {name: {"size": len(files.get(name, b"x")), "blob_id": "0" * 40} for name in tree}
        (repo / "trees").mkdir(parents=True, exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": entries}))
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache with REPO at two commits: `main` -> A (embed all 1.0), `v2` -> B (embed all 2.0)."""
    blobs_tmp = tmp_path / "build"
    blobs_tmp.mkdir()
    root = tmp_path / "hub"
    add_commit(root, REPO, COMMIT_A, _model_files(blobs_tmp, 1.0), refs=("main",))
    add_commit(root, REPO, COMMIT_B, _model_files(blobs_tmp, 2.0), refs=("v2",))
    return root


def _snapshot(cache: Path, commit: str) -> Path:
    return cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit


def _embed_value(folder: Path) -> float:
    return float(load_file(str(folder / "model.safetensors"))["model.embed.weight"][0, 0])


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    assert error.value.__cause__ is None  # `from None`: no chained traceback for the CLI to show
    assert error.value.__context__ is None or error.value.__suppress_context__
    return message


# -- repo ids, from the cache, offline -------------------------------------------------------------------------------


def test_repo_id_resolves_through_refs_main(cache: Path, offline: None) -> None:
    folder = resolve_source(REPO, cache_dir=cache)
    assert folder == _snapshot(cache, COMMIT_A).resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "model.safetensors").is_symlink()
    assert _embed_value(folder) == 1.0
    checkpoint = read_checkpoint(folder)  # fp8q reads a symlinked snapshot as any folder
    assert list(checkpoint.tensors) == ["model.embed.weight"]
    assert checkpoint.config is not None and checkpoint.config["marker"] == 1.0


@pytest.mark.parametrize(
    ("revision", "commit", "value"),
    [("main", COMMIT_A, 1.0), (COMMIT_A, COMMIT_A, 1.0), ("v2", COMMIT_B, 2.0), (COMMIT_B, COMMIT_B, 2.0)],
)
def test_revision_picks_the_snapshot(cache: Path, offline: None, revision: str, commit: str, value: float) -> None:
    folder = resolve_source(REPO, revision=revision, cache_dir=cache)
    assert folder == _snapshot(cache, commit).resolve()
    assert _embed_value(folder) == value


def test_default_cache_dir_is_hf_hub_cache(cache: Path, offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_CACHE at import; snapshot_download looks the constant up at each call.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_source(REPO, revision="v2") == _snapshot(cache, COMMIT_B).resolve()


def test_unknown_repo_offline(cache: Path, offline: None) -> None:
    with pytest.raises(CheckpointError) as error:
        resolve_source("nobody/nothing", cache_dir=cache)
    message = _one_line(error)
    assert "nobody/nothing" in message
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set" in message
    assert "unset HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("revision", ["v9", "c" * 40])
def test_unknown_revision_offline(cache: Path, offline: None, revision: str) -> None:
    with pytest.raises(CheckpointError) as error:
        resolve_source(REPO, revision=revision, cache_dir=cache)
    message = _one_line(error)
    assert REPO in message and f"revision {revision}" in message and "HF_HUB_OFFLINE=1" in message


def test_env_offline_is_honoured_when_set_after_import(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", _no_network)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1 is set"):
        resolve_source("nobody/nothing", cache_dir=cache)


def test_snapshot_without_weights_offline(tmp_path: Path, offline: None) -> None:
    # What AutoConfig leaves in the cache: the config alone, and (before huggingface_hub 1.x) no tree listing.
    add_commit(tmp_path, REPO, COMMIT_A, {"config.json": b"{}"}, refs=("main",))
    with pytest.raises(CheckpointError) as error:
        resolve_source(REPO, cache_dir=tmp_path)
    assert "is only partly in the local Hugging Face cache" in _one_line(error)


def _sharded_files(tmp: Path) -> Files:
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": torch.ones(2, 2, dtype=torch.bfloat16)},
        "model-00002-of-00002.safetensors": {"b.weight": torch.ones(2, 2, dtype=torch.bfloat16)},
    }
    files = {name: _safetensors(tensors, tmp) for name, tensors in shards.items()}
    weight_map = {tensor: name for name, tensors in shards.items() for tensor in tensors}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = b"{}"
    return files


def test_tree_listing_only_requires_indexed_shards(tmp_path: Path, offline: None) -> None:
    # huggingface_hub 1.x checks a cached snapshot against its tree listing. A `consolidated.safetensors` next to the
    # indexed shards (as Mistral ships) was never fetched, and need not be; a pickle is ignored as well.
    files = _sharded_files(tmp_path)
    tree = [*files, "consolidated.safetensors", "pytorch_model.bin"]
    snapshot = add_commit(tmp_path / "hub", REPO, COMMIT_A, files, refs=("main",), tree=tree)
    assert resolve_source(REPO, cache_dir=tmp_path / "hub") == snapshot.resolve()


def test_tree_listing_shows_a_missing_shard(tmp_path: Path, offline: None) -> None:
    files = _sharded_files(tmp_path)
    missing = files.pop("model-00002-of-00002.safetensors")
    add_commit(
        tmp_path / "hub", REPO, COMMIT_A, files, refs=("main",), tree=[*files, "model-00002-of-00002.safetensors"]
    )
    assert missing
    with pytest.raises(CheckpointError) as error:
        resolve_source(REPO, cache_dir=tmp_path / "hub")
    assert "is only partly in the local Hugging Face cache and HF_HUB_OFFLINE=1" in _one_line(error)


# -- local paths ------------------------------------------------------------------------------------------------------


def test_local_paths_are_returned_unchanged(tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(_safetensors({"w": torch.zeros(2)}, tmp_path))
    assert resolve_source(str(folder)) == folder
    assert resolve_source(str(folder / "model.safetensors")) == folder / "model.safetensors"
    # A relative folder whose name is also a valid repo id is a local path: the disk wins.
    monkeypatch.chdir(tmp_path)
    assert resolve_source("ckpt") == Path("ckpt")


@pytest.mark.parametrize("src", ["./missing", "a/b/c", "/abs/missing/folder", "../x", "missing.safetensors", ""])
def test_missing_path_that_is_no_repo_id(
    src: str, offline: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # where none of these relative paths exists
    with pytest.raises(CheckpointError) as error:
        resolve_source(src)
    assert _one_line(error) == (
        f"{src}: no such file or folder; give a checkpoint folder, a .safetensors file or a Hub repo id"
    )


def test_revision_for_a_local_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--revision applies to Hub repo ids only"):
        resolve_source(str(tmp_path), revision="main")


# -- the download path, with snapshot_download's network side faked ---------------------------------------------------


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the test tried to reach the Hub")


def _response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", f"https://huggingface.co/api/models/{REPO}"))


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[..., str]], list[dict[str, Any]]]:
    """Install `download` as snapshot_download's online side; cache-only calls still run the real function."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", _no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", _no_network)
    real = huggingface_hub.snapshot_download
    calls: list[dict[str, Any]] = []

    def install(download: Callable[..., str]) -> list[dict[str, Any]]:
        def fake(repo_id: str, **kwargs: Any) -> str:
            if kwargs["local_files_only"]:
                return real(repo_id, **kwargs)
            calls.append(kwargs)
            return download(repo_id, **kwargs)

        monkeypatch.setattr(source, "snapshot_download", fake)
        return calls

    return install


def test_cache_miss_downloads_only_what_a_conversion_needs(tmp_path: Path, online: Any) -> None:
    hub = tmp_path / "hub"
    files = _sharded_files(tmp_path)

    def download(repo_id: str, **kwargs: Any) -> str:
        snapshot = _snapshot(hub, COMMIT_A)
        if not snapshot.exists():  # first call: side files, and the branch's ref
            add_commit(hub, repo_id, COMMIT_A, {k: v for k, v in files.items() if k.endswith(".json")}, refs=("main",))
        else:
            add_commit(hub, repo_id, COMMIT_A, {k: v for k, v in files.items() if k.endswith(".safetensors")})
        return str(snapshot)

    calls = online(download)
    folder = resolve_source(REPO, cache_dir=hub)
    assert folder == _snapshot(hub, COMMIT_A)
    assert read_checkpoint(folder).has_index
    first, second = calls
    assert first["revision"] is None and "*.safetensors" not in first["allow_patterns"]
    assert {"*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "*.md"} <= set(first["allow_patterns"])
    # The weights come from the very commit the side files came from, and only the indexed shards.
    assert second["revision"] == COMMIT_A
    assert second["allow_patterns"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for call in calls:
        assert {"*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.gguf", "*.onnx", "*.h5", "*.msgpack"} <= set(
            call["ignore_patterns"]
        )
        assert call["cache_dir"] == hub


def test_partial_cache_is_completed_online(tmp_path: Path, online: Any) -> None:
    add_commit(tmp_path, REPO, COMMIT_A, {"config.json": b"{}"}, refs=("main",))
    weights = _safetensors({"w": torch.zeros(2, dtype=torch.bfloat16)}, tmp_path)

    def download(repo_id: str, **kwargs: Any) -> str:
        if "*.safetensors" in kwargs["allow_patterns"]:
            add_commit(tmp_path, repo_id, COMMIT_A, {"model.safetensors": weights})
        return str(_snapshot(tmp_path, COMMIT_A))

    calls = online(download)
    assert resolve_source(REPO, cache_dir=tmp_path) == _snapshot(tmp_path, COMMIT_A)
    assert len(calls) == 2


def test_repo_without_safetensors(tmp_path: Path, online: Any) -> None:
    def download(repo_id: str, **kwargs: Any) -> str:
        add_commit(tmp_path, repo_id, COMMIT_A, {"config.json": b"{}"}, refs=("main",))
        return str(_snapshot(tmp_path, COMMIT_A))

    online(download)
    with pytest.raises(CheckpointError) as error:
        resolve_source(REPO, cache_dir=tmp_path)
    assert "no .safetensors weights in the repo" in _one_line(error)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (lambda: GatedRepoError("gated", response=_response(401)), "gated"),
        (lambda: RepositoryNotFoundError("404", response=_response(404)), "no such repo on the Hub"),
        (lambda: RevisionNotFoundError("404", response=_response(404)), "no such revision"),
        (lambda: huggingface_hub.utils.HfHubHTTPError("403", response=_response(403)), "access denied (HTTP 403)"),
        (lambda: huggingface_hub.utils.HfHubHTTPError("boom\nmore", response=_response(503)), "HTTP 503: boom"),
        (lambda: httpx.ConnectError("[Errno -3] name resolution failed"), "cannot download it (ConnectError"),
        (lambda: ConnectionResetError("reset by peer"), "cannot download it (ConnectionResetError"),
    ],
)
def test_hub_errors_become_one_line(
    tmp_path: Path, online: Any, raised: Callable[[], Exception], expected: str
) -> None:
    def download(repo_id: str, **kwargs: Any) -> str:
        raise raised()

    online(download)
    with pytest.raises(CheckpointError) as error:
        resolve_source(REPO, revision="v3", cache_dir=tmp_path)
    message = _one_line(error)
    assert message.startswith(f"Hub repo {REPO} at revision v3: ") and expected in message


def test_network_down_through_the_real_snapshot_download(tmp_path: Path, online: Any) -> None:
    # snapshot_download turns a ConnectError of repo_info into LocalEntryNotFoundError; its cause names the problem.
    def repo_info(*args: Any, **kwargs: Any) -> Any:
        raise httpx.ConnectError("network is unreachable")

    online(lambda repo_id, **kw: huggingface_hub.snapshot_download(repo_id, **kw))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
        with pytest.raises(CheckpointError) as error:
            resolve_source(REPO, cache_dir=tmp_path)
    message = _one_line(error)
    assert "cannot download it (ConnectError: network is unreachable)" in message
    assert "not in the local Hugging Face cache" in message


def test_repo_id_and_revision_through_the_command(tmp_path):
    def files(value: float) -> dict[str, bytes]:
        folder = tmp_path / f"build-{value}"
        tensors = {
            "model.layers.0.mlp.up_proj.weight": torch.full((64, 32), value, dtype=torch.bfloat16),
            "model.norm.weight": torch.ones(32, dtype=torch.bfloat16),
        }
        write_shards(folder, {"model.safetensors": tensors}, index=False, config=CONFIG)
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    cache = tmp_path / "hub"
    a = add_commit(cache, "org/tiny", "a" * 40, files(1.0), refs=("main",))
    b = add_commit(cache, "org/tiny", "b" * 40, files(2.0), refs=("v2",))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    made = {}
    for revision, snapshot in (("v2", b), (None, a)):
        out = tmp_path / f"out-{revision}"
        pinned = ["--revision", revision] if revision else []
        args = ["quantize", "org/tiny", str(out), "--device", "cpu", "-q", *pinned]
        run = subprocess.run([sys.executable, "-m", "fp8q", *args], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        direct = tmp_path / f"direct-{revision}"
        quantize(snapshot, direct, QuantizeOptions(device="cpu"))
        made[revision] = (out / "model.safetensors").read_bytes()
        assert made[revision] == (direct / "model.safetensors").read_bytes()
    assert made["v2"] != made[None]
    run = subprocess.run(
        [sys.executable, "-m", "fp8q", "quantize", "org/tiny", str(tmp_path / "x"), "--revision", "nope"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "Hub repo org/tiny at revision nope" in run.stderr


def test_a_typo_of_a_local_folder_says_so_before_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["quantize", "lama", "out"], ["verify", "lama"]):
        _refused(_cli(*command), "error: lama: no such file or folder here, and as a Hub repo: Hub repo lama is not in")
    _refused(_cli("verify", "org/lama"), "Hub repo org/lama is not in the local Hugging Face cache")
    _refused(_cli("verify", "org/lama"), "(and no file or folder 'org/lama' here)")
