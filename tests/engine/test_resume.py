"""Interruption and resume: SIGKILL, SIGINT and SIGTERM part-way, then `--resume`, must give the files
of an uninterrupted run, and must really skip what was finished; two runs give identical files; the
manifest records what was made.

Runs are stopped at a known point, not raced: tests/support/stopped_run.py makes the run send itself a signal as
soon as K shards are recorded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fp8q.engine.stages as stages
from fp8q import QuantizeOptions, quantize
from fp8q.errors import OutputError
from fp8q.output.manifest import DONE_DIR, Progress
from tests.support.factories import add_side_files, write_shards
from tests.support.runs import _cli, _refused, _source

ROOT = Path(__file__).resolve().parents[2]


def _big_source(folder: Path, shards: int = 4) -> Path:
    """A few MB a shard: real work per shard, small enough to run in a second."""
    layout = {}
    for i in range(shards):
        layout[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(768, 1024).to(torch.bfloat16),
            f"model.layers.{i}.mlp.down_proj.weight": torch.randn(1024, 768).to(torch.bfloat16),
            f"model.layers.{i}.input_layernorm.weight": torch.ones(1024, dtype=torch.bfloat16),
        }
    src = write_shards(folder, layout, config={"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False})
    add_side_files(src)
    return src


def _hashes(folder: Path, *, card: bool = False) -> dict[str, str]:
    """Every file's hash but the manifest's (which holds timings) and, unless `card`, the model card's (which names
    OUT: outputs compared under different names differ there)."""
    left_out = ("fp8q.json",) if card else ("fp8q.json", "README.md")
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in left_out
    }


def run_stopped(
    src: Path, out: Path, shards: int, signal: str, *extra: str, command: str = "quantize"
) -> subprocess.CompletedProcess[str]:
    """`fp8q quantize` (or `command`) in a child process that sends itself `signal` once `shards` shards are
    finished."""
    stopped = ROOT / "tests" / "support" / "stopped_run.py"
    cmd = [
        sys.executable,
        str(stopped),
        f"{shards}:{signal}",
        command,
        str(src),
        str(out),
        "--device",
        "cpu",
        "--quiet",
    ]
    cmd += extra
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def killed_after(src: Path, out: Path, shards: int, *extra: str, command: str = "quantize") -> None:
    """kill -9 once `shards` shards are finished: exactly those are recorded, and OUT does not exist."""
    run = run_stopped(src, out, shards, "KILL", *extra, command=command)
    assert run.returncode == -9, run.stderr
    assert len(list((out.with_name(out.name + ".partial") / DONE_DIR).glob("*.json"))) == shards
    assert not out.exists()


@pytest.fixture(scope="module")
def source_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    src = _big_source(root / "src")
    quantize(src, root / "reference", QuantizeOptions(device="cpu"))
    return src, _hashes(root / "reference")


def _reads(monkeypatch) -> list[str]:
    """Record the shard of every tensor the run reads from the source."""
    seen: list[str] = []
    real = stages.read_tensor

    def recording(fd, meta, buf=None):
        seen.append(meta.shard)
        return real(fd, meta, buf)

    monkeypatch.setattr(stages, "read_tensor", recording)
    return seen


def test_sigkill_then_resume_skips_finished_shards_and_is_byte_identical(tmp_path, source_and_reference, monkeypatch):
    src, expected = source_and_reference
    out = tmp_path / "out"
    killed_after(src, out, 2)
    partial = tmp_path / "out.partial"
    finished = sorted(Progress(partial, {}).done())
    kept = {name: (os.stat(partial / name).st_ino, os.stat(partial / name).st_mtime_ns) for name in finished}

    again = subprocess.run(
        [sys.executable, "-m", "fp8q", "quantize", str(src), str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert again.returncode == 1 and "pass --resume" in again.stderr and not out.exists()

    reads = _reads(monkeypatch)
    report = quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == 2
    assert not set(reads) & set(finished)  # the finished shards were not read again...
    assert sorted(set(reads)) == sorted({p.name for p in src.glob("*.safetensors")} - set(finished))
    for name, (inode, mtime) in kept.items():  # ...nor written again: the very same files
        assert (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) == (inode, mtime), name
    assert _hashes(out) == expected
    assert not partial.exists()
    shards = json.loads((out / "fp8q.json").read_text())["timings"]["shards"]
    assert sorted(n for n, s in shards.items() if s["reused"]) == finished


@pytest.mark.parametrize("sig,code", [("INT", 130), ("TERM", 143)])
def test_signal_stops_cleanly_and_resume_finishes(tmp_path, source_and_reference, sig, code):
    src, expected = source_and_reference
    out = tmp_path / "out"
    run = run_stopped(src, out, 1, sig, "--workers", "1")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == code, run.stderr
    assert len(lines) == 1 and f"interrupted by SIG{sig}" in lines[0] and "--resume" in lines[0], lines
    assert not out.exists()
    report = quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards >= 1
    assert _hashes(out) == expected


@pytest.mark.parametrize(
    "changed",
    [{"scheme": "tensor"}, {"targets": ("mlp",)}, {"ignore": ("down_proj",)}, {"block_size": (64, 64)}],
    ids=["scheme", "targets", "ignore", "block_size"],
)
def test_resume_refuses_changed_options(tmp_path, source_and_reference, changed):
    src, _ = source_and_reference
    out = tmp_path / "out"
    killed_after(src, out, 1)
    with pytest.raises(OutputError, match="cannot resume: the options changed"):
        quantize(src, out, QuantizeOptions(device="cpu", resume=True, **changed))
    assert len(Progress(tmp_path / "out.partial", {}).done()) == 1  # a refusal deletes nothing


def test_resume_refuses_a_header_changed_in_place(tmp_path):
    src = _big_source(tmp_path / "src", shards=2)
    out = tmp_path / "out"
    killed_after(src, out, 1)
    # The same sizes and names' lengths, another header: a tensor renamed in the shard not yet converted.
    shard = src / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    renamed = data.replace(b"input_layernorm", b"input_layernorX", 1)
    assert len(renamed) == len(data) and renamed != data
    shard.write_bytes(renamed)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.1.input_layernorm.weight"
    index["weight_map"][name.replace("layernorm", "layernorX")] = index["weight_map"].pop(name)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(OutputError, match="cannot resume: the source checkpoint changed"):
        quantize(src, out, QuantizeOptions(device="cpu", resume=True))


def test_resume_refuses_a_changed_source(tmp_path):
    src = _big_source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    killed_after(src, out, 1)
    # Another tensor in the last shard (not yet converted): the headers differ.
    extra = {"model.layers.2.mlp.gate_proj.weight": torch.randn(64, 1024).to(torch.bfloat16)}
    shard = src / "model-00003-of-00003.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({**load_file(shard), **extra}, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.2.mlp.gate_proj.weight"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(OutputError, match="cannot resume: the source checkpoint changed"):
        quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    index["weight_map"].pop("model.layers.2.mlp.gate_proj.weight")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: v for k, v in load_file(shard).items() if k not in extra}, shard, metadata={"format": "pt"})
    with pytest.raises(OutputError, match="cannot resume: the source config.json changed"):
        quantize(src, out, QuantizeOptions(device="cpu", resume=True))


def test_damaged_finished_shard_is_redone(tmp_path, source_and_reference):
    src, expected = source_and_reference
    out = tmp_path / "out"
    killed_after(src, out, 2)
    done = Progress(tmp_path / "out.partial", {}).done()
    damaged = sorted(done)[0]
    with open(tmp_path / "out.partial" / damaged, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\xff")
    report = quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == 1
    assert _hashes(out) == expected


def test_io_error_in_a_later_shard_keeps_the_finished_ones(tmp_path, source_and_reference, monkeypatch):
    src, expected = source_and_reference
    out = tmp_path / "out"
    real = os.pwrite

    def disk_full_in_shard_3(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("model-00003-of-00004.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", disk_full_in_shard_3)
    kept = r"disk full; .*2 finished shard\(s\) kept in .*out.partial: rerun with --resume"
    with pytest.raises(OutputError, match=kept):
        quantize(src, out, QuantizeOptions(device="cpu", workers=1))
    assert sorted(Progress(tmp_path / "out.partial", {}).done()) == [
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
    ]
    assert not out.exists()
    monkeypatch.setattr(os, "pwrite", real)
    assert quantize(src, out, QuantizeOptions(device="cpu", resume=True)).resumed_shards == 2
    assert _hashes(out) == expected


def test_two_runs_are_identical_and_manifest_is_complete(tmp_path):
    src = _big_source(tmp_path / "src", shards=2)
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"  # one name: the model card names OUT
    quantize(src, a, QuantizeOptions(device="cpu", workers=2))
    quantize(src, b, QuantizeOptions(device="cpu", workers=1))
    assert _hashes(a, card=True) == _hashes(b, card=True)

    manifest = json.loads((a / "fp8q.json").read_text())
    assert manifest["version"] and manifest["options"]["scheme"] == "channel"
    assert [s["file"] for s in manifest["source"]["shards"]] == sorted(p.name for p in src.glob("*.safetensors"))
    assert manifest["files"] == _hashes(a, card=True)
    stats = manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert stats["shape"] == [768, 1024] and 0 < stats["scale_min"] <= stats["scale_max"]
    assert 0 < stats["rel_error"] < 0.05 and stats["max_abs_error"] > 0
    assert "seconds" in manifest["timings"]


def test_resume_refuses_another_fp8q_version(tmp_path):
    from fp8q.errors import OutputError

    src = _source(tmp_path / "src", shards=3)
    killed_after(src, tmp_path / "out", 1)
    record = tmp_path / "out.partial" / ".fp8q-run.json"
    run = json.loads(record.read_text())
    run["fingerprint"]["version"] = "0.0.1"
    record.write_text(json.dumps(run))
    with pytest.raises(OutputError, match="cannot resume: the fp8q version changed since the interrupted run"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", resume=True))
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()


def test_resume_with_changed_options_says_which(tmp_path):
    src = _source(tmp_path / "src", shards=3)
    killed_after(src, tmp_path / "out", 1)
    args = ("--device", "cpu", "--resume", "--scheme", "block", "--block-size", "64x64", "--no-load-check")
    _refused(
        _cli("quantize", src, tmp_path / "out", *args),
        "cannot resume: the options changed since the interrupted run (--block-size 128x128 -> 64x64, --scheme "
        "channel -> block)",
    )


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["plain edit", "edit with mtime set back"])
def test_resume_redoes_a_shard_changed_in_place_under_the_same_header(tmp_path, restore_mtime):
    src = _source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    killed_after(src, out, 2)
    shard = src / "model-00001-of-00003.safetensors"  # finished before the kill (shards go in order)
    stat, header = shard.stat(), shard.read_bytes()[:4096]
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight"] = -tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})  # new values under the very same header and size
    assert shard.stat().st_size == stat.st_size and shard.read_bytes()[:4096] == header
    if restore_mtime:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    report = quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == 1  # only the untouched finished shard was reused
    quantize(src, tmp_path / "fresh", QuantizeOptions(device="cpu"))
    for name in ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_a_chmod_of_a_source_shard_makes_it_be_redone(tmp_path):
    src = _source(tmp_path / "src", shards=3)
    killed_after(src, tmp_path / "out", 2)
    (src / "model-00001-of-00003.safetensors").chmod(0o600)  # data unchanged, status-change time new
    report = quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == 1
    quantize(src, tmp_path / "fresh", QuantizeOptions(device="cpu"))
    for shard in src.glob("*.safetensors"):
        assert (tmp_path / "out" / shard.name).read_bytes() == (tmp_path / "fresh" / shard.name).read_bytes()
