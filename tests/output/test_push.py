"""`--push-to-hub`: a Hub repo in, an FP8 repo out, in one streaming pass. Against tests/support/hub_server.py, the
local stand-in for the Hub, which takes uploads the way huggingface_hub's own client sends them (classic LFS:
HF_HUB_DISABLE_XET=1), with `fp8q` run as a user runs it: a child process with HF_ENDPOINT, HF_HOME and HF_TOKEN.

What is checked is what lands on the Hub: the committed tree byte for byte against a local run, one commit and
nothing shown before it, the local disk the run holds, what a refused upload leaves and what `--resume` then sends,
and the refusals made before any weight is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load, save

from fp8q import QuantizeOptions, quantize
from fp8q.output.manifest import DONE_DIR
from tests.engine.test_resume import _big_source
from tests.support.hub_server import HubServer
from tests.support.hub_server import disk_bytes as _disk

ROOT = Path(__file__).resolve().parents[2]
SRC = "org/model"
SHARDS = [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
TOKENS = {"hf_write": ("me", "write"), "hf_read": ("me", "read")}
# The layout families: per-channel compressed-tensors, fp8 blocks (vLLM / DeepSeek), MXFP8.
LAYOUTS = {
    "channel": (),
    "block-fp8": ("--scheme", "block", "--format", "fp8"),
    "mx": ("--scheme", "mx"),
}
# What a local run writes that names where it went (the card) or when (fp8q.json's timings): compared apart.
NAMED = ("README.md", "fp8q.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The 6-shard repo's folder (served by every test's hub) and its local conversion in each layout family."""
    root = tmp_path_factory.mktemp("push")
    _big_source(root / "repos" / SRC, shards=6)
    (root / "repos" / SRC / "README.md").write_text("---\nlicense: mit\n---\n# A model\n")
    local = {}
    for name, args in LAYOUTS.items():
        scheme = args[1] if args else "channel"
        fmt = args[3] if len(args) > 2 else "compressed-tensors"
        local[name] = root / "local" / name
        quantize(root / "repos" / SRC, local[name], QuantizeOptions(scheme=scheme, format=fmt, device="cpu"))
    return root / "repos", local


@pytest.fixture
def hub(reference):
    server = HubServer(reference[0], tokens=TOKENS, orgs={"team": {"me"}})
    yield server
    server.close()


# The two transports huggingface_hub uploads by: classic LFS, and Xet (hf_xet installed, as by default).
TRANSPORTS = {"lfs": {"HF_HUB_DISABLE_XET": "1"}, "xet": {"HF_HUB_DISABLE_XET": "0"}}


def _env(tmp_path: Path, hub: HubServer, token: str | None = "hf_write") -> dict[str, str]:
    """What a user's shell gives fp8q: the stand-in as HF_ENDPOINT, classic LFS, the token; staging under
    tmp_path/cache (XDG_CACHE_HOME), temporary files under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FP8Q_"))}
    env |= {
        "TMPDIR": str(tmp_path / "tmp"),
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_XET": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        # What the tests themselves run with ahead of ROOT (another huggingface_hub, say), then ROOT.
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p),
        "OMP_NUM_THREADS": "1",
    }
    return env | ({"HF_TOKEN": token} if token is not None else {})


def _fp8q(
    tmp_path: Path,
    hub: HubServer,
    *args: str,
    token: str | None = "hf_write",
    stop_after: str = "",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """fp8q in a child process against the stand-in (`_env`, plus `env`); `stop_after` K:SIGNAL: stopped once K
    shards are recorded."""
    cmd = [sys.executable, "-m", "fp8q", *args]
    if stop_after:
        cmd = [sys.executable, str(ROOT / "tests" / "support" / "stopped_run.py"), stop_after, *args]
    full = _env(tmp_path, hub, token) | (env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300)


def _one_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The error line (the plan's notes, printed before, apart)."""
    lines = [line for line in result.stderr.strip().splitlines() if line and not line.startswith("note:")]
    assert result.returncode == code and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, str]:
    """The committed files -> their sha256."""
    commit = hub.commits(repo_id, revision)[-1]
    return {name: _sha(hub.read(repo_id, name, revision)) for name in sorted(commit.files)}


def _local(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_as_local(
    hub: HubServer, repo_id: str, local: Path, revision: str = "main", kept: set[str] = frozenset()
) -> None:
    """The pushed tree holds the local run's files byte for byte (the card and fp8q.json apart, which name where the
    run went and when), and its fp8q.json lists every file with the sha256 the Hub holds; `kept`: files a person
    added, which the push left there."""
    tree = {name: sha for name, sha in _tree(hub, repo_id, revision).items() if name not in kept}
    expected = _local(local)
    assert set(tree) == set(expected)
    assert {n: s for n, s in tree.items() if n not in NAMED} == {n: s for n, s in expected.items() if n not in NAMED}
    manifest = json.loads(hub.read(repo_id, "fp8q.json", revision))
    assert manifest["tool"] == "fp8q"
    assert manifest["files"] == {n: s for n, s in tree.items() if n != "fp8q.json"}
    card = ModelCard(hub.read(repo_id, "README.md", revision).decode())
    assert card.data.base_model == SRC
    assert repo_id in card.text  # the serving snippets name the pushed repo


@contextmanager
def _peak_disk(hub: HubServer, *folders: Path) -> Iterator[list[int]]:
    """[the most bytes the folders held], sampled every 2 ms and at the start and end of every download, while the
    block runs."""
    peak = [0]
    stop = threading.Event()

    def sample(*_: object) -> None:
        peak[0] = max(peak[0], _disk(*folders))

    def sampling() -> None:
        while not stop.wait(0.002):
            sample()

    hub.on_download = sample
    sampler = threading.Thread(target=sampling)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def _source_downloads(hub: HubServer) -> list[str]:
    return sorted(r.file for r in hub.requests if r.downloads and r.repo == SRC and r.file.endswith(".safetensors"))


def _uploads(hub: HubServer) -> list[str]:
    """The sha256 of every LFS object the stand-in took (PUTs answered 200)."""
    return [r.file for r in hub.requests if r.kind == "upload" and r.status == 200]


def _sent_with_the_commit(hub: HubServer) -> int:
    """Objects the final commit had to upload itself (LFS PUTs, or Xet uploads, after its own preupload request):
    none when every shard was uploaded as it was finished."""
    kinds = [r.kind for r in hub.requests if r.status == 200]
    last = len(kinds) - 1 - kinds[::-1].index("preupload")
    return kinds[last:].count("upload") + kinds[last:].count("xet-token")


def _upload_calls(hub: HubServer) -> int:
    """Uploads the stand-in let in: LFS PUTs, and Xet uploads (each asks for a write token first)."""
    return sum(r.kind in ("upload", "xet-token") and r.status == 200 for r in hub.requests)


def _commits(hub: HubServer, repo_id: str) -> list[str]:
    return [c.summary for c in hub.commits(repo_id)]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pushed_tree_equals_local_run_in_one_commit_shown_only_when_complete(
    reference, hub, tmp_path, layout, transport
):
    _, local = reference
    final = set(_local(local[layout]))
    seen: list[frozenset[str]] = []  # what `main` showed, sampled while the run went on
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            found = hub.repo("me/out")
            seen.append(frozenset(found[1]) if found else frozenset())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu", *LAYOUTS[layout])
        result = _fp8q(tmp_path, hub, *args, env=TRANSPORTS[transport])
    finally:
        stop.set()
        sampler.join()
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", local[layout])
    # One commit on top of the repo's creation, one commit request, and before it `main` showed nothing.
    assert _commits(hub, "me/out") == ["initial commit", f"fp8q quantize: {_describe(local[layout])}"]
    assert sum(r.kind == "commit" for r in hub.requests) == 1
    assert seen and set(seen) <= {frozenset(), frozenset(final)}
    assert frozenset() in seen  # the sampler saw the run before its commit: it was not blind
    # Each source shard downloaded once, each output shard uploaded once, and the staging folder gone.
    assert _source_downloads(hub) == SHARDS
    shards = {_sha((local[layout] / n).read_bytes()) for n in final if n.endswith(".safetensors")}
    if transport == "lfs":
        assert sorted(_uploads(hub)) == sorted(shards)
    else:  # by Xet: one upload a shard, no LFS request at all; the commit rebuilt each from the store and checked it
        assert _upload_calls(hub) == len(SHARDS) and _uploads(hub) == []
        assert not any(r.kind == "batch" for r in hub.requests)
    assert _sent_with_the_commit(hub) == 0
    assert not any((tmp_path / "cache" / "fp8q" / "push").rglob("*.safetensors"))
    assert "pushed:  me/out (main)" in result.stderr


def _describe(local: Path) -> str:
    """The layout in words, as the default commit message has it."""
    from fp8q.layouts import find

    options = json.loads((local / "fp8q.json").read_text())["options"]
    return find(options["scheme"], options["format"], options["scale_format"]).describe()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_disk_holds_at_most_two_source_and_two_output_shards(reference, hub, tmp_path, transport):
    """Everything the run keeps on local disk counts: the staging folder and HF_HOME, where huggingface_hub keeps its
    metadata and hf_xet its logs and caches (its shard cache and staging too, against a CAS server)."""
    repos, local = reference
    with _peak_disk(hub, tmp_path / "cache", tmp_path / "hf") as peak:
        args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
        result = _fp8q(tmp_path, hub, *args, env=TRANSPORTS[transport] | {"HF_XET_CACHE": str(tmp_path / "hf" / "xet")})
    assert result.returncode == 0, result.stderr
    source = sorted(((repos / SRC / n).stat().st_size for n in SHARDS), reverse=True)
    out = local["channel"]
    written = sorted(((out / n).stat().st_size for n in SHARDS), reverse=True)
    side = sum(p.stat().st_size for p in out.iterdir() if p.name not in SHARDS)  # index, config, card, tokenizer
    records = 64 * 1024  # the run record: a few hundred bytes a shard, and huggingface_hub's metadata
    bound = source[0] + source[1] + written[0] + written[1] + side + records
    assert written[0] < peak[0] <= bound, (peak[0], bound)
    assert peak[0] < sum(written) + source[-1]  # never the whole output and a source shard, as a local run holds


def test_refused_upload_then_resume_uploads_only_the_rest(reference, hub, tmp_path):
    _, local = reference
    hub.faults.refuse_upload_after = 3
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    line = _one_line(_fp8q(tmp_path, hub, *args))
    assert line.startswith("error: me/out: uploading model-00004-of-00006.safetensors failed (HTTP 403"), line
    assert line.endswith("rerun with --resume"), line
    assert _commits(hub, "me/out") == ["initial commit"]  # nothing published
    first = _uploads(hub)
    assert len(first) == 3

    hub.faults.refuse_upload_after = None
    hub.requests.clear()
    result = _fp8q(tmp_path, hub, *args, "--resume")
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", local["channel"])
    assert len(hub.commits("me/out")) == 2
    # The three shards the Hub holds were neither downloaded, converted nor uploaded again.
    again = _uploads(hub)
    assert len(again) == 3 and not set(again) & set(first)
    assert set(_source_downloads(hub)) <= set(SHARDS[3:])
    assert "reused" in result.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_killed_run_resumes_without_uploading_twice(reference, hub, tmp_path, transport):
    _, local = reference
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    killed = _fp8q(tmp_path, hub, *args, stop_after="4:KILL", env=TRANSPORTS[transport])
    assert killed.returncode == -9, killed.stderr
    assert _commits(hub, "me/out") == ["initial commit"]
    sent = hub.xet_bytes()
    result = _fp8q(tmp_path, hub, *args, "--resume", env=TRANSPORTS[transport])
    assert result.returncode == 0, result.stderr
    if transport == "xet":  # what the killed run sent is not sent again: chunk data for the rest only
        _same_as_local(hub, "me/out", local["channel"])
        shards = [(local["channel"] / n).stat().st_size for n in SHARDS]
        assert hub.xet_bytes() - sent < 1.1 * sum(shards) - 0.9 * sent, (hub.xet_bytes(), sent, shards)
        return
    _same_as_local(hub, "me/out", local["channel"])
    uploads = _uploads(hub)
    assert len(uploads) == len(set(uploads)) == len(SHARDS)  # every shard once, over both runs


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "no Hugging Face token found: log in with `hf auth login`, or set HF_TOKEN"),
        ("hf_unknown", "set HF_TOKEN to a token that can write"),
        ("hf_read", "use a token with write access"),
    ],
)
def test_a_token_that_cannot_write_is_refused_before_any_download(reference, hub, tmp_path, token, expected):
    result = _fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu", token=token)
    line = _one_line(result)
    assert line.startswith("error: me/out:") and expected in line, line
    assert _source_downloads(hub) == []
    assert not (tmp_path / "cache" / "fp8q" / "push" / "me--out").exists()


def test_another_namespace_is_refused(reference, hub, tmp_path):
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "other/out", "--device", "cpu"))
    assert "other/out" in line and "write access" in line, line
    assert hub.repo("other/out") is None and _source_downloads(hub) == []


def test_an_organization_the_user_belongs_to_is_written(reference, hub, tmp_path):
    result = _fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "team/out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "team/out", reference[1]["channel"])


def test_the_source_repo_as_target_is_refused(reference, hub, tmp_path):
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", SRC, "--device", "cpu"), code=2)
    assert "source repo" in line, line
    assert _source_downloads(hub) == []


def test_a_repo_fp8q_did_not_make_is_refused_but_a_pull_request_may_propose(reference, hub, tmp_path):
    hub.create("me/taken", {"README.md": b"# mine\n\nMy notes.\n"})
    before = _tree(hub, "me/taken")
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/taken", "--device", "cpu"))
    assert "me/taken" in line and "fp8q did not publish" in line, line
    assert _source_downloads(hub) == [] and _tree(hub, "me/taken") == before

    result = _fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/taken", "--device", "cpu", "--create-pr")
    assert result.returncode == 0, result.stderr
    assert _tree(hub, "me/taken") == before  # main as it was
    assert "refs/pr/1" in hub.refs("me/taken")
    pr = _tree(hub, "me/taken", "refs/pr/1")
    assert {n: s for n, s in pr.items() if n not in NAMED} == {
        n: s for n, s in _local(reference[1]["channel"]).items() if n not in NAMED
    }
    assert "/me/taken/discussions/1" in result.stderr


def test_an_fp8q_repo_is_replaced_only_with_overwrite_in_one_commit(reference, hub, tmp_path):
    _, local = reference
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *args).returncode == 0
    hub.create("me/out", {"notes/extra.txt": b"later\n"})
    before = _tree(hub, "me/out")

    line = _one_line(_fp8q(tmp_path / "2", hub, *args, *LAYOUTS["block-fp8"]))
    assert "already holds an fp8q output" in line and "--overwrite" in line, line
    assert _tree(hub, "me/out") == before

    result = _fp8q(tmp_path / "3", hub, *args, *LAYOUTS["block-fp8"], "--overwrite")
    assert result.returncode == 0, result.stderr
    # notes/extra.txt, which a person added (fp8q.json does not list it), stays, named in a note.
    assert hub.read("me/out", "notes/extra.txt") == b"later\n"
    assert "note: me/out: kept notes/extra.txt, which fp8q did not write" in result.stderr
    _same_as_local(hub, "me/out", local["block-fp8"], kept={"notes/extra.txt"})
    assert len(hub.commits("me/out")) == 4  # creation, the first push, the extra file, the replacement


def test_a_push_deletes_or_replaces_only_what_fp8q_wrote(reference, hub, tmp_path):
    """A file a person added (evals.json) stays when the same push runs again and when --overwrite replaces the
    output; a file the old fp8q.json lists and the new output lacks is deleted."""
    _, local = reference
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *args).returncode == 0
    manifest = json.loads(hub.read("me/out", "fp8q.json"))
    manifest["files"]["old-extra.json"] = _sha(b"{}")  # as if an earlier fp8q output had written it
    hub.create("me/out", {"evals.json": b'{"mmlu": 0.7}', "old-extra.json": b"{}",
                          "fp8q.json": json.dumps(manifest).encode()})  # fmt: skip
    result = _fp8q(tmp_path / "2", hub, *args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert hub.read("me/out", "evals.json") == b'{"mmlu": 0.7}'
    assert "old-extra.json" not in _tree(hub, "me/out")
    assert "note: me/out: kept evals.json, which fp8q did not write" in result.stderr
    _same_as_local(hub, "me/out", local["channel"], kept={"evals.json"})
    again = _fp8q(tmp_path / "3", hub, *args)  # the very same output again: up to date, nothing touched
    assert again.returncode == 0, again.stderr
    assert hub.read("me/out", "evals.json") == b'{"mmlu": 0.7}'
    assert "up to date: me/out@" in again.stderr


def test_the_same_push_again_is_up_to_date_with_nothing_downloaded_uploaded_or_committed(reference, hub, tmp_path):
    """A CI job run again: the repo's fp8q.json names this fp8q, these options and this source commit, and the repo
    holds every file it lists as published: exit 0 in one line, no shard downloaded, nothing uploaded, no commit.
    Another option, or a file changed on the Hub, is no longer up to date."""
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *args).returncode == 0
    head = hub.commits("me/out")[-1].id
    hub.requests.clear()
    again = _fp8q(tmp_path / "2", hub, *args, "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["up_to_date"] is True and result["pushed"]["commit"] == head, result
    assert _source_downloads(hub) == [] and _upload_calls(hub) == 0 and hub.commits("me/out")[-1].id == head
    shown = _fp8q(tmp_path / "3", hub, *args)
    assert shown.stderr.strip().splitlines()[-1] == f"up to date: me/out@{head} holds this output", shown.stderr
    # Another layout asked for: a real run (with --overwrite, as an fp8q output is replaced).
    other = _fp8q(tmp_path / "4", hub, *args, *LAYOUTS["block-fp8"], "--overwrite")
    assert other.returncode == 0 and "up to date" not in other.stderr and hub.commits("me/out")[-1].id != head


def test_a_local_out_that_holds_the_output_is_up_to_date(reference, hub, tmp_path):
    """The same for a local OUT made from a Hub repo: exit 0, no shard downloaded; a file of it gone, and OUT is a
    folder to refuse again (not empty), as it was."""
    out = tmp_path / "out"
    args = ("quantize", SRC, str(out), "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *args).returncode == 0
    hub.requests.clear()
    again = _fp8q(tmp_path / "2", hub, *args)
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines()[-1] == f"up to date: {out} holds this output"
    assert _source_downloads(hub) == []
    next(out.glob("model-*.safetensors")).unlink()
    assert "exists and is not empty" in _one_line(_fp8q(tmp_path / "3", hub, *args))


def test_a_file_a_person_added_under_a_name_the_output_has_is_not_replaced(reference, hub, tmp_path):
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *args).returncode == 0
    manifest = json.loads(hub.read("me/out", "fp8q.json"))
    del manifest["files"]["tokenizer.json"]  # a tokenizer the person put there, not fp8q
    hub.create("me/out", {"fp8q.json": json.dumps(manifest).encode()})
    before = _tree(hub, "me/out")
    line = _one_line(_fp8q(tmp_path / "2", hub, *args, "--overwrite"))
    assert "holds tokenizer.json, which fp8q did not write and the output has too" in line, line
    assert _tree(hub, "me/out") == before


def test_private_against_an_existing_public_repo_is_refused_before_any_download(reference, hub, tmp_path):
    hub.create("me/public", {})
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/public", "--private"))
    assert line.startswith("error: me/public: is public and --private was given"), line
    assert _source_downloads(hub) == [] and _commits(hub, "me/public") == ["initial commit", "made by hand"]
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/public", "--private", "--dry-run"))
    assert "is public and --private was given" in line, line


def test_a_repo_as_the_hub_makes_it_new_is_a_target_without_overwrite(reference, hub, tmp_path):
    """.gitattributes and a stub README (front matter, a title): taken, the README replaced by the model card;
    a README with text of a person's in it is not a stub."""
    stub = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
            "README.md": b"---\nlicense: mit\n---\n# out\n"}  # fmt: skip
    hub.create("me/out", stub)
    result = _fp8q(tmp_path / "1", hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "note: me/out: its README.md, the stub the Hub made with the repo, is now the model card" in result.stderr
    assert ModelCard(hub.read("me/out", "README.md").decode()).data.base_model == SRC
    hub.create("me/mine", {**stub, "README.md": b"# mine\n\nMy results, kept here.\n"})
    line = _one_line(_fp8q(tmp_path / "2", hub, "quantize", SRC, "--push-to-hub", "me/mine", "--device", "cpu"))
    assert "fp8q did not publish" in line, line


def test_a_branch_is_created_from_main_and_main_is_left_alone(reference, hub, tmp_path):
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--push-revision", "fp8", "--device", "cpu")
    result = _fp8q(tmp_path, hub, *args, "--commit-message", "FP8 weights")
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"], revision="fp8")
    assert _tree(hub, "me/out") == {}
    assert hub.commits("me/out", "fp8")[-1].summary == "FP8 weights"


def test_out_given_keeps_the_same_checkpoint_locally(reference, hub, tmp_path):
    out = tmp_path / "kept"
    result = _fp8q(tmp_path, hub, "quantize", SRC, str(out), "--push-to-hub", "me/out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert _local(out) == _tree(hub, "me/out")


def test_private_repo_is_created_private(reference, hub, tmp_path):
    result = _fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/secret", "--private", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert hub.is_private("me/secret")


def test_dequantize_and_convert_push_too(reference, hub, tmp_path):
    args = ("quantize", SRC, "--push-to-hub", "me/fp8", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *args).returncode == 0
    result = _fp8q(tmp_path / "2", hub, "dequantize", "me/fp8", "--push-to-hub", "me/bf16", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert any(n.endswith(".safetensors") for n in _tree(hub, "me/bf16"))
    assert ModelCard(hub.read("me/bf16", "README.md").decode()).data.base_model == "me/fp8"
    result = _fp8q(tmp_path / "3", hub, "convert", "me/fp8", "--push-to-hub", "me/block", "--device", "cpu",
                   *LAYOUTS["block-fp8"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _commits(hub, "me/block")[-1].startswith("fp8q convert:")


def test_json_success_and_failure(reference, hub, tmp_path):
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu", "--json")
    result = _fp8q(tmp_path / "1", hub, *args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    pushed = report["pushed"]
    assert (pushed["repo_id"], pushed["revision"]) == ("me/out", "main")
    assert pushed["commit"] == hub.refs("me/out")["main"]
    tree = _tree(hub, "me/out")
    assert report["files"] == {n: s for n, s in tree.items() if n != "fp8q.json"}
    assert report["bytes_uploaded"] >= sum((reference[1]["channel"] / n).stat().st_size for n in SHARDS)
    assert report["bytes_downloaded"] > 0

    failed = _fp8q(tmp_path / "2", hub, *args, "--push-revision", "x", token="hf_read")
    assert failed.returncode == 1
    body = json.loads(failed.stdout)
    assert body["ok"] is False and body["exit_code"] == 1 and "write access" in body["error"]


def test_verify_a_pushed_repo_against_its_source_streams_each_shard_once(reference, hub, tmp_path):
    repos, local = reference
    assert _fp8q(tmp_path / "push", hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu").returncode == 0
    hub.requests.clear()
    with _peak_disk(hub, tmp_path / "verify" / "tmp", tmp_path / "verify" / "hf") as peak:
        result = _fp8q(tmp_path / "verify", hub, "verify", "me/out", "--source", SRC, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["tensors_checked"] == 12 and report["path"] == "me/out"
    # Every shard of both repos downloaded once, never more than two of each on disk, and none left behind.
    shards = sorted(r.file for r in hub.requests if r.downloads and r.file.endswith(".safetensors"))
    assert shards == sorted(SHARDS * 2)
    source = sorted(((repos / SRC / n).stat().st_size for n in SHARDS), reverse=True)
    written = sorted(((local["channel"] / n).stat().st_size for n in SHARDS), reverse=True)
    side = _disk(repos / SRC) - sum(source) + _disk(local["channel"]) - sum(written)
    bound = source[0] + source[1] + written[0] + written[1] + side + 64 * 1024
    assert written[-1] < peak[0] <= bound, (peak[0], bound)
    assert report["bytes_downloaded"] == sum(source) + sum(written)
    assert not list((tmp_path / "verify" / "tmp").glob("fp8q-*"))  # (torch keeps a folder of its own there)


def test_verify_a_broken_pushed_repo_names_the_tensor(reference, hub, tmp_path):
    assert _fp8q(tmp_path / "push", hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu").returncode == 0
    name = SHARDS[2]
    tensors = load(hub.read("me/out", name))
    scale = "model.layers.2.mlp.up_proj.weight_scale"
    tensors[scale] = torch.zeros_like(tensors[scale])  # a zero scale: the whole row dequantizes to 0
    hub.create("me/out", {name: save(tensors, metadata={"format": "pt"})})
    result = _fp8q(tmp_path / "verify", hub, "verify", "me/out", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and "2 problem(s)" in report["error"], report["error"]
    # The bytes are not those fp8q.json lists (the tree's sha256 says so), and the scale is named.
    assert report["problems"][0].startswith(f"{name}: its sha256 is "), report["problems"]
    assert scale in report["problems"][1], report["problems"]
    assert not list((tmp_path / "verify" / "tmp").glob("fp8q-*"))  # (torch keeps a folder of its own there)


# Over LFS only: over Xet, the stand-in's local:// store is one folder both processes open, and hf_xet's store lock
# lets one process at a time (a real Hub's CAS is a server: each process keeps its own cache).
@pytest.mark.parametrize("transport", ["lfs"])
def test_under_torchrun_each_process_uploads_its_shards_and_rank_0_commits_them_all(
    reference, hub, tmp_path, transport
):
    from tests.engine.test_distributed import _free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "fp8q", "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu",
    ]  # fmt: skip
    env = _env(tmp_path, hub) | TRANSPORTS[transport]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"])
    assert len(hub.commits("me/out")) == 2 and sum(r.kind == "commit" for r in hub.requests) == 1
    uploads = _uploads(hub)
    if transport == "lfs":
        assert len(uploads) == len(set(uploads)) == len(SHARDS)  # each shard once, by the process that made it
    else:  # each shard once; the commit took the other process's uploads from the store by their sha256
        assert uploads == [] and _upload_calls(hub) == len(SHARDS)
    assert _sent_with_the_commit(hub) == 0
    ranks = json.loads(hub.read("me/out", "fp8q.json"))["timings"]["shards"]
    assert {entry["rank"] for entry in ranks.values()} == {0, 1}


def test_the_client_hashes_no_shard_again(reference, hub, tmp_path):
    """fp8q hashes each shard while writing it and hands the sha256 to huggingface_hub: the client reads a shard
    once, to send it, and hashes at most the small files beside the shards."""
    counted = tmp_path / "hashed.json"
    harness = str(ROOT / "tests" / "support" / "hashed_run.py")
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    cmd = [sys.executable, harness, str(counted), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path, hub), timeout=300)
    assert result.returncode == 0, result.stderr
    hashed = json.loads(counted.read_text())["bytes"]
    tree = hub.commits("me/out")[-1].files
    side = sum(f.size for name, f in tree.items() if not name.endswith(".safetensors"))
    smallest = min(f.size for name, f in tree.items() if name.endswith(".safetensors"))
    assert hashed <= side < smallest, (hashed, side)


def test_a_commit_the_hub_does_not_hold_as_sent_fails_the_run(reference, hub, tmp_path):
    """The commit's tree is read back: a file the Hub answered for but does not hold is one line, exit 1."""
    hub.faults.lose_in_commit = SHARDS[1]
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu"))
    assert line.startswith("error: me/out: commit ") and f"holds nothing as {SHARDS[1]}" in line, line


def test_a_failed_commit_leaves_the_repo_as_it_was_and_resume_only_commits(reference, hub, tmp_path):
    hub.faults.fail_commit = True
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    line = _one_line(_fp8q(tmp_path, hub, *args))
    assert line.startswith("error: me/out: uploading the commit failed (HTTP 500"), line
    assert line.endswith("rerun with --resume"), line
    assert _commits(hub, "me/out") == ["initial commit"]
    hub.faults.fail_commit = False
    hub.requests.clear()
    result = _fp8q(tmp_path, hub, *args, "--resume")
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"])
    # Nothing downloaded, converted or uploaded again: every shard was on the Hub already.
    assert _uploads(hub) == [] and _source_downloads(hub) == []


def test_an_upload_cut_off_once_is_sent_again_by_the_client(reference, hub, tmp_path):
    hub.faults.drop_uploads = 1  # the first PUT's connection is closed halfway
    result = _fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert any(r.kind == "upload" and r.status == 0 for r in hub.requests)  # the cut happened
    _same_as_local(hub, "me/out", reference[1]["channel"])


def test_a_repo_deleted_mid_run_is_one_line_and_resume_publishes_anew(reference, hub, tmp_path):
    hub.faults.delete_repo_after = 2
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    line = _one_line(_fp8q(tmp_path, hub, *args))
    assert line.startswith("error: me/out: uploading model-0000") and "(HTTP 404" in line, line
    assert line.endswith("rerun with --resume"), line
    assert hub.repo("me/out") is None
    # The repo is made again; the shards the old one held are not on the Hub any more, so they are sent again.
    hub.faults.delete_repo_after = None
    result = _fp8q(tmp_path, hub, *args, "--resume")
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"])
    assert _commits(hub, "me/out") == ["initial commit", "fp8q quantize: compressed-tensors channel"]


def test_dry_run_checks_the_target_as_a_run_does_and_changes_nothing(reference, hub, tmp_path):
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu", "--dry-run")
    result = _fp8q(tmp_path, hub, *args)
    assert result.returncode == 0, result.stderr
    assert "push: me/out does not exist: a run creates it" in result.stderr, result.stderr
    assert hub.repo("me/out") is None  # a run would create it; the dry run did not
    line = _one_line(_fp8q(tmp_path, hub, *args, token="hf_read"))
    assert "write access" in line, line
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "other/out", "--dry-run"))
    assert "other is neither the token's user (me) nor one of their organizations" in line, line
    hub.create("me/taken", {"README.md": b"# mine\n\nMy notes.\n"})
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/taken", "--dry-run"))
    assert "fp8q did not publish" in line, line
    assert [c.summary for c in hub.commits("me/taken")] == ["initial commit", "made by hand"]
    assert not any(r.kind in ("create", "commit", "upload", "branch") for r in hub.requests)
    assert _source_downloads(hub) == []


def test_dry_run_says_whether_the_target_is_up_to_date_or_would_be_replaced(reference, hub, tmp_path):
    push = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *push).returncode == 0
    head = hub.commits("me/out")[-1].id
    same = _fp8q(tmp_path / "2", hub, *push, "--dry-run", "--json")
    assert same.returncode == 0, same.stderr
    said = json.loads(same.stdout)["push_target"]
    assert said == f"up to date: me/out@{head} holds this output: a run changes nothing", said
    other = _fp8q(tmp_path / "3", hub, *push, *LAYOUTS["block-fp8"], "--overwrite", "--dry-run")
    assert "push: me/out: a run replaces the fp8q output it holds in one commit on main" in other.stderr, other.stderr
    assert hub.commits("me/out")[-1].id == head


def test_verify_a_branch_and_a_pull_request_by_revision(reference, hub, tmp_path):
    push = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *push, "--push-revision", "fp8").returncode == 0
    assert _fp8q(tmp_path / "2", hub, *push, "--push-revision", "fp8", "--create-pr", "--overwrite").returncode == 0
    for revision in ("fp8", "refs/pr/1"):
        result = _fp8q(tmp_path / "3", hub, "verify", "me/out", "--revision", revision, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["tensors_checked"] == 12
    line = _one_line(_fp8q(tmp_path / "3", hub, "verify", "me/out", "--quiet"))
    assert "me/out" in line, line  # main holds nothing: no FP8 checkpoint there


def test_a_run_refused_on_this_side_creates_no_repo(reference, hub, tmp_path):
    """The repo is created only once every local check passed: a run refused for its staging folder (left by an
    interrupted run, without --resume) leaves the Hub as it was."""
    (tmp_path / "cache" / "fp8q" / "push" / "me--out.partial").mkdir(parents=True)
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu"))
    assert "left by an interrupted run" in line, line
    assert hub.repo("me/out") is None and not any(r.kind == "create" for r in hub.requests)


def test_the_copier_running_ahead_never_takes_the_room_the_writer_needs(hub, tmp_path):
    """Shard 1 keeps nothing whole, shards 2 and 3 do: the copier, which opens the shards it copies into ahead of
    the writer, must not take the two shards' room (no OUT) before the writer has shard 1 (it hung here)."""
    from tests.support.factories import write_shards

    def weights(i: int) -> dict[str, torch.Tensor]:
        return {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 256).to(torch.bfloat16),
            f"model.layers.{i}.mlp.down_proj.weight": torch.randn(256, 256).to(torch.bfloat16),
        }

    layout = {"model-00001-of-00004.safetensors": weights(0)}
    for i in range(1, 4):
        norm = {f"model.layers.{i}.input_layernorm.weight": torch.ones(256, dtype=torch.bfloat16)}
        layout[f"model-{i + 1:05d}-of-00004.safetensors"] = {**weights(i), **norm}
    src = write_shards(tmp_path / "src", layout, config={"architectures": ["LlamaForCausalLM"]})
    quantize(src, tmp_path / "local", QuantizeOptions(device="cpu"))
    result = _fp8q(tmp_path, hub, "quantize", str(src), "--push-to-hub", "me/out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    tree = _tree(hub, "me/out")
    assert {n: s for n, s in tree.items() if n not in NAMED} == {
        n: s for n, s in _local(tmp_path / "local").items() if n not in NAMED
    }


def test_resume_commits_a_shard_as_last_made_not_an_earlier_upload_of_it(reference, hub, tmp_path):
    """A shard uploaded, then made again (its source changed in place) by a run killed before the new one was
    uploaded: the next --resume commits the new one, not the object the Hub holds from before."""
    src = tmp_path / "src"
    shutil.copytree(reference[0] / SRC, src)
    args = ("quantize", str(src), "--push-to-hub", "me/out", "--device", "cpu")
    hub.faults.refuse_upload_after = 3
    assert _fp8q(tmp_path, hub, *args).returncode == 1  # shards 1-3 on the Hub, 4 finished here
    hub.faults.refuse_upload_after = None
    first = src / SHARDS[0]
    with open(first, "r+b") as f:  # new values under the same header: the shard must be made again
        f.seek(-4096, os.SEEK_END)
        data = bytearray(f.read(4096))
        f.seek(-4096, os.SEEK_END)
        f.write(bytes(b ^ 0x01 for b in data))
    partial = tmp_path / "cache" / "fp8q" / "push" / "me--out.partial"
    finished = len(list((partial / DONE_DIR).glob("*.json")))
    # Killed at the resumed run's first record: shard 1 made again (its record replaces the old one), not uploaded.
    killed = _fp8q(tmp_path, hub, *args, "--resume", stop_after=f"{finished}:KILL")
    assert killed.returncode == -9, killed.stderr
    result = _fp8q(tmp_path, hub, *args, "--resume")
    assert result.returncode == 0, result.stderr
    quantize(src, tmp_path / "local", QuantizeOptions(device="cpu"))
    expected = {n: s for n, s in _local(tmp_path / "local").items() if n not in NAMED}
    assert {n: s for n, s in _tree(hub, "me/out").items() if n not in NAMED} == expected


def test_the_same_output_may_be_published_again_without_overwrite(reference, hub, tmp_path):
    """A repo whose fp8q.json says it holds what this run makes (same fp8q, options and source: a job run again,
    or a run that committed and then failed on this side) is published again; another output needs --overwrite."""
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *args).returncode == 0
    result = _fp8q(tmp_path / "2", hub, *args)
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"])
    line = _one_line(_fp8q(tmp_path / "3", hub, *args, *LAYOUTS["mx"]))
    assert "already holds an fp8q output; pass --overwrite" in line, line


@pytest.mark.parametrize(
    ("silent", "command", "where"),
    [
        ("whoami", ("quantize", SRC, "--push-to-hub", "me/out"), "GET {url}/api/whoami-v2"),
        ("info", ("quantize", SRC, "out"), "GET {url}/api/models/" + SRC + "/revision/main"),
        ("info", ("verify", SRC), "GET {url}/api/models/" + SRC + "/revision/main"),
        ("preupload", ("quantize", SRC, "--push-to-hub", "me/out"), "POST {url}/api/models/me/out/preupload/main"),
        ("commit", ("quantize", SRC, "--push-to-hub", "me/out"), "POST {url}/api/models/me/out/commit/main"),
    ],
)
def test_a_hub_that_never_answers_ends_the_run_in_one_line(reference, hub, tmp_path, silent, command, where):
    """The stand-in takes the request and never answers (a black-holing proxy): every request has a bound
    (FP8Q_HUB_TIMEOUT), and the run ends in one line naming the request, not in a hang."""
    hub.faults.silent = {silent}
    started = time.monotonic()
    result = _fp8q(tmp_path, hub, *command, env={"FP8Q_HUB_TIMEOUT": "1"})
    elapsed = time.monotonic() - started
    line = _one_line(result)
    assert f"no answer from {where.format(url=hub.url)} within 1 s" in line, line
    assert "FP8Q_HUB_TIMEOUT" in line, line
    if silent == "commit":
        assert "it may have landed: check with `fp8q verify me/out --revision main`" in line, line
    assert elapsed < 60, elapsed
    assert any(r.kind == silent and r.status == 0 for r in hub.requests)  # the request was taken, not refused


def test_a_timeout_that_is_not_a_number_is_a_usage_error(reference, hub, tmp_path):
    line = _one_line(_fp8q(tmp_path, hub, "verify", SRC, env={"FP8Q_HUB_TIMEOUT": "soon"}), code=2)
    assert "FP8Q_HUB_TIMEOUT='soon'" in line, line


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stalled_commit_ends_on_a_signal_saying_it_may_have_landed(reference, hub, tmp_path, sig, code):
    hub.faults.silent = {"commit"}
    cmd = [sys.executable, "-m", "fp8q", "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu"]
    env = _env(tmp_path, hub) | {"FP8Q_HUB_TIMEOUT": "600"}
    # Popen resets SIGINT to its default in the child, as a terminal does (a bash `&` job would ignore it).
    child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(r.kind == "commit" for r in hub.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the commit request is out and waiting
    sent = time.monotonic()
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert child.returncode == code, stderr
    assert "it may have landed; check with `fp8q verify me/out --revision main`" in stderr, stderr
    assert "Traceback" not in stderr


def test_verify_of_a_hub_repo_names_a_flipped_bit_from_the_tree_without_another_download(reference, hub, tmp_path):
    """One FP8 value with one bit flipped (still a valid value, the scale valid): the tree's LFS sha256 differs from
    what fp8q.json lists; each shard is downloaded once all the same (for the values), nothing more."""
    assert _fp8q(tmp_path / "push", hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu").returncode == 0
    name = SHARDS[4]
    data = bytearray(hub.read("me/out", name))
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_len])["model.layers.4.mlp.up_proj.weight"]["data_offsets"]
    data[8 + header_len + start] ^= 0x40  # one FP8 value's bit 6: header and size unchanged
    hub.create("me/out", {name: bytes(data)})
    hub.requests.clear()
    result = _fp8q(tmp_path / "verify", hub, "verify", "me/out", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["problems"][0].startswith(f"{name}: its sha256 is "), report["problems"]
    assert report["files_checked"] == len(json.loads(hub.read("me/out", "fp8q.json"))["files"])
    shards = sorted(r.file for r in hub.requests if r.downloads and r.file.endswith(".safetensors"))
    assert shards == sorted(SHARDS)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (("--push-to-hub", "me/naïve"), "--push-to-hub 'me/naïve': not a Hub repo id"),
        (("--push-to-hub", "me/x.git"), "--push-to-hub 'me/x.git': not a Hub repo id"),
        (("--push-to-hub", "me/out", "--push-revision", "refs/pr/9"), "--push-revision refs/pr/9: takes a branch"),
    ],
)
def test_a_target_that_cannot_be_is_a_usage_error_before_any_work(reference, hub, tmp_path, args, expect):
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, *args, "--device", "cpu"), code=2)
    assert expect in line and "internal error" not in line, line
    assert hub.requests == []  # not even the source's side files


def test_a_pull_request_against_a_missing_branch_is_refused_before_any_download(reference, hub, tmp_path):
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--create-pr", "--push-revision", "nobranch", "--device", "cpu")
    line = _one_line(_fp8q(tmp_path, hub, *args))
    assert "has no branch nobranch for --create-pr" in line, line
    assert _source_downloads(hub) == [] and not any(r.kind == "upload" for r in hub.requests)


def test_a_commit_whose_answer_was_lost_says_it_may_have_landed(reference, hub, tmp_path):
    hub.faults.lose_commit_answer = True
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    line = _one_line(_fp8q(tmp_path, hub, *args))
    assert "the commit was sent but" in line and "it may have landed: check with `fp8q verify me/out" in line, line
    assert len(hub.commits("me/out")) == 2  # it had landed
    hub.faults.lose_commit_answer = False
    result = _fp8q(tmp_path, hub, *args, "--resume")  # the very same output: published again, nothing converted
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"])


def test_a_concurrent_push_is_one_line_and_the_repo_is_as_it_left_it(reference, hub, tmp_path):
    hub.faults.before_commit = lambda: hub.create("me/out", {"theirs.txt": b"pushed meanwhile\n"})
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu"))
    assert "main moved while this run went on (another push to it?)" in line, line
    assert "rerun with --resume" in line, line
    assert _commits(hub, "me/out") == ["initial commit", "made by hand"]


def test_a_disk_that_fills_mid_run_is_said_to_be_full(reference, hub, tmp_path):
    """The output's disk (where the shards are downloaded too) fills up while a shard downloads: the line says the
    disk is full, not to check the network. A tmpfs of 64 MB, filled by another writer once the run is under way."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("no tmpfs can be mounted here")
    try:
        downloads = []

        def fill(file: str, phase: str) -> None:
            downloads.append((file, phase))
            if file == SHARDS[2] and phase == "start":
                free = shutil.disk_usage(disk).free
                with open(disk / "someone-else.bin", "wb") as f:
                    f.write(b"\0" * (free - 64 * 1024))

        hub.on_download = fill
        line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, str(disk / "out"), "--device", "cpu"))
        assert "disk is full" in line or "disk full" in line, line
        assert "check the network" not in line, line
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_commit_the_hub_answers_while_its_storage_lags_is_sent_again(reference, hub, tmp_path):
    hub.faults.lagging_commits = 2  # the first two tries: "an LFS pointer pointed to a file that does not exist"
    result = _fp8q(tmp_path / "1", hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert [r.status for r in hub.requests if r.kind == "commit"] == [400, 400, 200]
    _same_as_local(hub, "me/out", reference[1]["channel"])


def test_a_storage_that_never_catches_up_is_one_line_after_bounded_tries(reference, hub, tmp_path):
    from fp8q.output.publish import STORAGE_LAG_WAITS_S

    hub.faults.lagging_commits = 100
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/mine", "--device", "cpu"))
    assert "the Hub does not show the shards this run uploaded" in line and "rerun with --resume" in line, line
    assert sum(r.kind == "commit" for r in hub.requests) == len(STORAGE_LAG_WAITS_S) + 1
    assert _commits(hub, "me/mine") == ["initial commit"]


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_a_commit_whose_tree_lists_another_size_or_sha256_fails_the_run(reference, hub, tmp_path, wrong):
    """The read-back checks what the tree says of each file, not only that it is there."""
    hub.faults.misreport = {SHARDS[3]: wrong}
    line = _one_line(_fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu"))
    assert line.startswith("error: me/out: commit ") and f"as {SHARDS[3]}, not the " in line, line
    assert "do not use that commit" in line, line


def test_resume_sends_again_what_the_hub_no_longer_holds(reference, hub, tmp_path):
    """Uploads nobody committed expire on the Hub: a resume asks, and sends again those its records list but the
    Hub no longer holds (trusting the records would make a commit the Hub refuses)."""
    hub.faults.refuse_upload_after = 3
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path, hub, *args).returncode == 1
    first = _uploads(hub)
    assert len(first) == 3 and hub.forget_uncommitted() == 3
    hub.faults.refuse_upload_after = None
    hub.requests.clear()
    result = _fp8q(tmp_path, hub, *args, "--resume")
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"])
    assert set(first) <= set(_uploads(hub))  # the three expired ones, sent again


def test_over_xet_a_resume_sends_only_what_the_store_lacks(reference, hub, tmp_path):
    """Over Xet the client never asks the LFS batch endpoint: a resume does not either. Shards uploaded and deleted
    are made again, and their chunks, which the store holds, are not sent again: the resume sends the missing
    shards' bytes (measured: the chunk data the store gained), and the commit checks every file."""
    _, local = reference
    hub.faults.refuse_upload_after = 3
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    line = _one_line(_fp8q(tmp_path, hub, *args, env=TRANSPORTS["xet"]))
    assert line.startswith("error: me/out: uploading model-00004-of-00006.safetensors failed (HTTP 403"), line
    assert len(hub.xet_uploads("me/out")) == 3 and _commits(hub, "me/out") == ["initial commit"]
    before = hub.xet_bytes()
    hub.faults.refuse_upload_after = None
    hub.requests.clear()
    result = _fp8q(tmp_path, hub, *args, "--resume", env=TRANSPORTS["xet"])
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", local["channel"])
    assert not any(r.kind == "batch" for r in hub.requests)
    sent = hub.xet_bytes() - before
    shards = [(local["channel"] / n).stat().st_size for n in SHARDS]
    # The three shards the store lacked, give or take Xet's framing; not the three it held.
    assert 0.9 * sum(shards[3:]) < sent < 1.1 * sum(shards[3:]) < sum(shards), (sent, shards)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_lowest_huggingface_hub_pyproject_admits_publishes(reference, hub, tmp_path, transport):
    """The floor pyproject.toml declares, installed apart (pip, from the package index) and put first on the path of
    the fp8q it runs: the push works with it, over both transports."""
    import re

    floor = re.search(r'"huggingface_hub>=([0-9.]+)', (ROOT / "pyproject.toml").read_text())[1]
    target = tmp_path / "floor"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    if subprocess.run([*pip, f"huggingface_hub=={floor}"], capture_output=True).returncode:
        pytest.skip(f"huggingface_hub=={floor} cannot be installed here")
    env = TRANSPORTS[transport] | {"PYTHONPATH": os.pathsep.join((str(target), str(ROOT)))}
    probe = [sys.executable, "-c", "import huggingface_hub; print(huggingface_hub.__version__)"]
    assert subprocess.run(probe, capture_output=True, text=True, env=_env(tmp_path, hub) | env).stdout.strip() == floor
    result = _fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu", env=env)
    assert result.returncode == 0, result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"])


def test_a_silent_xet_token_endpoint_ends_the_run_in_one_line(reference, hub, tmp_path):
    """hf_xet asks the Hub for its write token itself (its own HTTP client, not huggingface_hub's): a Hub that never
    answers it ends the run too."""
    hub.faults.silent = {"xet_token"}
    started = time.monotonic()
    env = TRANSPORTS["xet"] | {"FP8Q_HUB_TIMEOUT": "2"}
    result = _fp8q(tmp_path, hub, "quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu", env=env)
    elapsed = time.monotonic() - started
    line = _one_line(result)
    assert "uploading model-00001-of-00006.safetensors failed" in line and "/xet-write-token/main" in line, line
    assert elapsed < 60, elapsed


def test_a_file_fp8q_wrote_that_someone_changed_since_is_theirs(reference, hub, tmp_path):
    """A model card edited on the Hub after the push: the same push again does not overwrite the edit unasked (it is
    refused before any download, naming the file); --overwrite replaces it, said in a note."""
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    assert _fp8q(tmp_path / "1", hub, *args).returncode == 0
    edited = hub.read("me/out", "README.md") + b"\nEvaluated by a person: see evals.\n"
    hub.create("me/out", {"README.md": edited})
    hub.requests.clear()
    line = _one_line(_fp8q(tmp_path / "2", hub, *args))
    assert "me/out: README.md changed on the Hub since fp8q published it" in line and "--overwrite" in line, line
    assert _source_downloads(hub) == [] and hub.read("me/out", "README.md") == edited
    result = _fp8q(tmp_path / "3", hub, *args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "note: me/out: replaced README.md, changed on the Hub since fp8q published it (--overwrite)" in result.stderr
    _same_as_local(hub, "me/out", reference[1]["channel"])


def test_the_push_shows_its_uploads_and_counts_hub_waits_apart_from_conversion(reference, hub, tmp_path):
    """Over a slow link (the stand-in paced to 1 MB/s each way) the summary says what went each way and splits the
    time: converting, and waiting on the Hub (a download not there yet, the last uploads, the commit); the rate is
    the conversion's own. (On a terminal, test_cli shows the uploads' bar and the steps.)"""
    hub.faults.throttle_bytes_per_s = 1e6
    args = ("quantize", SRC, "--push-to-hub", "me/out", "--device", "cpu")
    shown = _fp8q(tmp_path / "1", hub, *args)
    assert shown.returncode == 0, shown.stderr
    hub_line = next(line for line in shown.stderr.splitlines() if line.startswith("  hub:"))
    assert " downloaded (each shard deleted once converted), " in hub_line and hub_line.endswith(" uploaded")
    time_line = next(line for line in shown.stderr.splitlines() if line.startswith("  time:"))
    assert " s converting, " in time_line and " s waiting on the Hub; " in time_line, time_line
    result = json.loads(_fp8q(tmp_path / "2", hub, *args, "--overwrite", *LAYOUTS["block-fp8"], "--json").stdout)
    sizes = sum(len(hub.read("me/out", name)) for name in _tree(hub, "me/out"))
    assert result["bytes_uploaded"] == sizes  # every file of the output, shards as they finished, the rest committed
    # Downloads at 1 MB/s: most of the run is waiting, and the rate is the conversion's, not the link's.
    assert 0.5 * result["seconds"] < result["seconds_waiting"] < result["seconds"], result
    converting = result["seconds"] - result["seconds_waiting"]
    assert result["gb_per_s"] == pytest.approx(result["bytes_in"] / converting / 1e9, rel=0.01, abs=0.001)
    assert result["bytes_downloaded"] / result["seconds"] / 1e9 < result["gb_per_s"]
