"""A Hub repo not in the cache is converted as it downloads: planned from the shards' headers (range requests),
each shard downloaded while the one before converts and deleted once written. Against tests/support/hub_server.py, a
local stand-in for the Hub on 127.0.0.1, with `fp8q` run as a user runs it (a child process with HF_ENDPOINT and
HF_HOME set, as huggingface_hub reads them at import)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from fp8q import QuantizeOptions, quantize
from fp8q.output.manifest import Progress
from tests.engine.test_resume import _big_source, _hashes
from tests.support.hub_server import HubServer
from tests.support.hub_server import disk_bytes as _disk

ROOT = Path(__file__).resolve().parents[2]
REPO = "org/model"
SHARDS = [f"model-{i:05d}-of-00008.safetensors" for i in range(1, 9)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The 8-shard repo's folder (served by every test's hub) and its conversion from that local folder."""
    root = tmp_path_factory.mktemp("hub")
    _big_source(root / "repos" / REPO, shards=8)
    (root / "repos" / REPO / "README.md").write_text("---\nlicense: mit\n---\n# A model\n")
    quantize(root / "repos" / REPO, root / "local" / "out", QuantizeOptions(device="cpu"))
    return root / "repos", root / "local" / "out"


@pytest.fixture
def hub(reference):
    server = HubServer(reference[0])
    yield server
    server.close()


def _fp8q(
    tmp_path: Path, hub: HubServer, *args: str, stop_after: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    """fp8q in a child process, against the stand-in Hub; `stop_after` K:SIGNAL: stopped once K shards are recorded."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT), **env}
    cmd = [sys.executable, "-m", "fp8q", *args]
    if stop_after:
        cmd = [sys.executable, str(ROOT / "tests" / "support" / "stopped_run.py"), stop_after, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean, timeout=300)


def _downloads(hub: HubServer) -> list[str]:
    return sorted(r.file for r in hub.requests if r.downloads and r.file.endswith(".safetensors"))


def _cached_shards(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "hf" / "hub").rglob("*.safetensors"))


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_streamed_equals_local_and_holds_at_most_two_shards(reference, hub, tmp_path):
    repos, local = reference
    out = tmp_path / "streamed" / "out"
    cache = tmp_path / "hf"
    peak = [0, 0, 0]  # the cache and OUT's folder together, the downloads alone, the cache alone

    def measure(*_: object) -> None:
        # The cache's files (blobs, downloads in progress); its own bookkeeping (refs, tree listings) is a few kB.
        in_cache = _disk(*cache.glob("hub/*/blobs"))
        peak[0] = max(peak[0], in_cache + _disk(out.parent))
        peak[1] = max(peak[1], _disk(*out.parent.glob("out.partial/.fp8q-downloads-*")))
        peak[2] = max(peak[2], in_cache)

    hub.on_download = measure  # at the start and the end of every shard's download
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            measure()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "--quiet")
    finally:
        stop.set()
        sampler.join()
    assert result.returncode == 0, result.stderr
    assert _hashes(out) == _hashes(local)
    assert ModelCard.load(out / "README.md").data.base_model == REPO

    # Each shard downloaded once, and none left behind.
    assert _downloads(hub) == SHARDS
    assert _cached_shards(tmp_path) == []
    sizes = sorted(((repos / REPO / name).stat().st_size for name in SHARDS), reverse=True)
    side = _disk(repos / REPO) - sum(sizes)
    bound = _disk(out) + sizes[0] + sizes[1] + side
    assert _disk(out) < peak[0] <= bound, (peak[0], bound)
    # The run's own staging folder never held more than two shards (and held one: the sampling is not blind); the
    # shared cache, which other processes read, got the side files alone.
    metadata = 8 * 1024  # huggingface_hub's record of each download beside it: a few hundred bytes
    assert sizes[-1] < peak[1] <= sizes[0] + sizes[1] + metadata, (peak[1], sizes[:2])
    assert peak[2] <= side, (peak[2], side)


def test_plan_reads_headers_only(reference, hub, tmp_path):
    """inspect and --dry-run of a repo not in the cache fetch the side files and each shard's header: no weights."""
    result = _fp8q(tmp_path, hub, "inspect", REPO, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["tensors_quantized"] == 16
    commit = hub.repo(REPO)[0]
    assert plan["source"] == f"{REPO}@{commit}"  # the repo id a user gave, at the commit read; not the cache path
    assert plan["source_folder"].endswith(f"snapshots/{commit}")
    shown = _fp8q(tmp_path, hub, "inspect", REPO)
    assert f"fp8q plan for {REPO}@{commit}" in " ".join(shown.stderr.split()), shown.stderr
    assert _downloads(hub) == [] and _cached_shards(tmp_path) == []
    ranged = {r.file for r in hub.requests if r.method == "GET" and r.range and not r.range.endswith("-")}
    assert ranged == set(SHARDS)


def test_keep_download_then_the_cached_repo_needs_no_network(reference, hub, tmp_path):
    out = tmp_path / "a" / "out"
    result = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q", "--json", "--keep-download")
    assert result.returncode == 0, result.stderr
    assert _cached_shards(tmp_path) == SHARDS
    report = json.loads(result.stdout)
    assert report["bytes_downloaded"] == sum((reference[0] / REPO / name).stat().st_size for name in SHARDS)
    assert report["downloads_kept"] is True
    hub.requests.clear()
    again = tmp_path / "b" / "out"
    result = _fp8q(tmp_path, hub, "quantize", REPO, str(again), "--device", "cpu", "-q", "--json")
    assert result.returncode == 0, result.stderr
    assert hub.requests == [] and _cached_shards(tmp_path) == SHARDS  # as before streaming: the cache, untouched
    assert json.loads(result.stdout)["bytes_downloaded"] == 0
    assert _hashes(again, card=True) == _hashes(out, card=True)


def test_connection_dropped_mid_shard_then_resume(reference, hub, tmp_path):
    _, local = reference
    out = tmp_path / "run" / "out"
    hub.faults.drop.add(SHARDS[4])
    result = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q")
    line = _one_line(result)
    assert SHARDS[4] in line and "--resume" in line
    partial = out.with_name("out.partial")
    assert not out.exists() and partial.is_dir()
    done = set(Progress(partial, {}).done())
    assert done and done <= set(SHARDS[:4])
    assert _cached_shards(tmp_path) == [] and not list((tmp_path / "hf").rglob("*.incomplete"))

    hub.faults.drop.clear()
    hub.requests.clear()
    result = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q", "--resume")
    assert result.returncode == 0, result.stderr
    assert _hashes(out) == _hashes(local)
    assert _downloads(hub) == sorted(set(SHARDS) - done)  # only the shards still needed


def test_shard_gone_from_the_hub_then_resume(reference, hub, tmp_path):
    """The index lists a shard the Hub no longer serves: found while planning (nothing written) or while
    downloading (the finished shards kept)."""
    _, local = reference
    out = tmp_path / "run" / "out"
    hub.faults.gone_after_heads[SHARDS[2]] = 0
    line = _one_line(_fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q"))
    assert SHARDS[2] in line and "org/model" in line
    assert not out.exists() and not out.with_name("out.partial").exists()

    hub.faults.heads.clear()
    hub.faults.gone_after_heads[SHARDS[2]] = 1  # planning's request answered, the download's not
    line = _one_line(_fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q"))
    assert SHARDS[2] in line and "--resume" in line
    assert not out.exists() and set(Progress(out.with_name("out.partial"), {}).done()) <= set(SHARDS[:2])

    hub.faults.gone_after_heads.clear()
    result = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q", "--resume")
    assert result.returncode == 0, result.stderr
    assert _hashes(out) == _hashes(local)


def test_gated_repo_without_a_token(reference, tmp_path):
    server = HubServer(reference[0], gated={REPO: "hf_letmein"})
    try:
        out = tmp_path / "run" / "out"
        line = _one_line(_fp8q(tmp_path, server, "quantize", REPO, str(out), "--device", "cpu", "-q"))
        assert "gated" in line and "HF_TOKEN" in line
        assert not out.exists() and not out.with_name("out.partial").exists()
        args = ("quantize", REPO, str(out), "--device", "cpu", "-q", "--resume")
        run = _fp8q(tmp_path, server, *args, HF_TOKEN="hf_letmein")
        assert run.returncode == 0, run.stderr
        assert _hashes(out) == _hashes(reference[1])
        assert all(r.auth for r in server.requests if r.repo == REPO and r.status < 400)
    finally:
        server.close()


def test_download_events_and_revision(reference, hub, tmp_path):
    """The library reports the download beside the conversion (the CLI's progress bar draws both): DownloadStarted
    with every byte to fetch, then Downloaded events adding up to it; a revision (here the commit) is honoured."""
    commit = hub.repo(REPO)[0]
    script = f"""
import json, sys
from fp8q import QuantizeOptions, quantize
events = []
quantize({REPO!r}, sys.argv[1], QuantizeOptions(device="cpu", revision={commit!r}), on_event=events.append)
started = [e for e in events if type(e).__name__ == "DownloadStarted"]
got = {{}}
for e in events:
    if type(e).__name__ == "Downloaded":
        got[e.shard] = got.get(e.shard, 0) + e.nbytes
print(json.dumps({{"started": [[e.nbytes, e.shards] for e in started], "downloaded": got}}))
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env = clean | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run" / "out"
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    sizes = {name: (reference[0] / REPO / name).stat().st_size for name in SHARDS}
    assert report["started"] == [[sum(sizes.values()), 8]]
    assert report["downloaded"] == sizes
    assert {r.revision for r in hub.requests if r.repo} == {commit}
    assert _hashes(out) == _hashes(reference[1])


def test_fp8_repo_streamed_through_dequantize(reference, tmp_path):
    """dequantize (and so convert, the same engine) streams an FP8 repo too: the same bytes as from the folder."""
    repos = tmp_path / "repos"
    quantize(reference[0] / REPO, repos / "org" / "model-fp8", QuantizeOptions(device="cpu", scheme="block"))
    from fp8q.engine.api import dequantize

    dequantize(repos / "org" / "model-fp8", tmp_path / "local" / "out")
    server = HubServer(repos)
    try:
        out = tmp_path / "streamed" / "out"
        result = _fp8q(tmp_path, server, "dequantize", "org/model-fp8", str(out), "--device", "cpu", "-q")
        assert result.returncode == 0, result.stderr
        assert _hashes(out) == _hashes(tmp_path / "local" / "out")
        assert _downloads(server) == SHARDS and _cached_shards(tmp_path) == []
    finally:
        server.close()


def test_hostile_index_refused_before_any_shard_request(reference, tmp_path):
    repos = tmp_path / "repos"
    src = _big_source(repos / "org" / "evil", shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../../outside.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    server = HubServer(repos)
    try:
        line = _one_line(_fp8q(tmp_path, server, "quantize", "org/evil", str(tmp_path / "out"), "--device", "cpu"))
        assert "../../../outside.safetensors" in line and "inside the checkpoint folder" in line
        assert not [r for r in server.requests if r.file.endswith(".safetensors")]
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    finally:
        server.close()


# ── the shared cache is never fp8q's to delete from (second hostile probe, class 5) ──


def test_a_shard_another_process_puts_in_the_cache_meanwhile_is_left_alone(reference, hub, tmp_path):
    """Another process (snapshot_download, a second fp8q) fills the shared cache while this run streams: fp8q
    downloads into a folder of its own and deletes nothing in the cache, that process's files included."""
    repos, local = reference
    commit = hub.repo(REPO)[0]
    repo_cache = tmp_path / "hf" / "hub" / "models--org--model"
    theirs = SHARDS[5]

    def another_process(file: str, phase: str) -> None:
        if file == SHARDS[0] and phase == "end" and not (repo_cache / "snapshots" / commit / theirs).exists():
            data = (repos / REPO / theirs).read_bytes()
            blob = repo_cache / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            (repo_cache / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
            (repo_cache / "snapshots" / commit / theirs).symlink_to(
                os.path.relpath(blob, repo_cache / "snapshots" / commit)
            )

    hub.on_download = another_process
    out = tmp_path / "run" / "out"
    result = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q")
    assert result.returncode == 0, result.stderr
    assert _hashes(out) == _hashes(local)
    assert _cached_shards(tmp_path) == [theirs]  # theirs, whole; none of fp8q's
    link = repo_cache / "snapshots" / commit / theirs
    assert link.is_symlink() and link.read_bytes() == (repos / REPO / theirs).read_bytes()
    assert not list(out.parent.glob("out.partial*")) and not list(out.rglob(".fp8q*"))


def test_downloads_a_killed_run_left_are_cleaned_by_resume(reference, hub, tmp_path):
    _, local = reference
    out = tmp_path / "run" / "out"
    killed = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q", stop_after="2:KILL")
    assert killed.returncode == -9, killed.stderr
    assert _cached_shards(tmp_path) == []  # whatever it had downloaded is in its own folder in out.partial/
    result = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q", "--resume")
    assert result.returncode == 0, result.stderr
    assert _hashes(out) == _hashes(local)
    assert _cached_shards(tmp_path) == [] and not list((tmp_path / "hf").rglob("*.incomplete"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"] and not list(out.rglob(".fp8q*"))


def test_shards_cached_before_the_run_are_read_in_place_and_kept(reference, hub, tmp_path):
    _, local = reference
    cached = SHARDS[1:4]
    script = "import sys\nfrom huggingface_hub import hf_hub_download\nfor name in sys.argv[1:]:\n"
    script += f"    hf_hub_download({REPO!r}, name)\n"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env = clean | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    subprocess.run([sys.executable, "-c", script, *cached], check=True, env=env, capture_output=True)
    assert _cached_shards(tmp_path) == cached
    hub.requests.clear()
    out = tmp_path / "run" / "out"
    result = _fp8q(tmp_path, hub, "quantize", REPO, str(out), "--device", "cpu", "-q")
    assert result.returncode == 0, result.stderr
    assert _hashes(out) == _hashes(local)
    assert _downloads(hub) == sorted(set(SHARDS) - set(cached))  # the cached ones read where they are
    assert _cached_shards(tmp_path) == cached  # and left there
