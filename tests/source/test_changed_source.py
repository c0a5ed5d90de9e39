"""A source changed while fp8q converts it: a shard written over (its modification time set back or not), removed,
or swapped for a link after planning, is caught, naming it; the shards finished before are kept for --resume."""

from __future__ import annotations

import os

import pytest

from fp8q import QuantizeOptions, quantize
from fp8q.errors import CheckpointError
from fp8q.output.manifest import Progress
from tests.support.runs import _fresh, _source, _tree, _without_manifest


def test_source_changed_while_converting_is_refused(tmp_path):
    src = _source(tmp_path / "src", shards=2)
    shard = src / "model-00001-of-00002.safetensors"
    changed = []

    def change_in_place(event):
        if getattr(event, "shard", None) == shard.name and not changed:
            with open(shard, "r+b") as f:  # the same file, written over: as a download resumed over it would
                f.seek(-2, 2)
                f.write(b"\x00\x3c")
            changed.append(event)

    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: changed while fp8q was converting"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", workers=1), on_event=change_in_place)
    assert changed and not (tmp_path / "out").exists()


def test_a_shard_changed_during_the_run_with_its_mtime_set_back_is_still_caught(tmp_path):
    """The status-change time catches a write that sets the modification time back (`touch -d`, `cp -p`)."""
    from fp8q.errors import CheckpointError

    src = _source(tmp_path / "src", shards=2)
    shard = src / "model-00001-of-00002.safetensors"
    before = shard.stat()
    changed = []

    def change_in_place(event):
        if getattr(event, "shard", None) == shard.name and not changed:
            with open(shard, "r+b") as f:
                f.seek(-2, 2)
                f.write(b"\x00\x3c")
            os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # as it was: only ctime tells
            changed.append(event)

    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: changed while fp8q was converting"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", workers=1), on_event=change_in_place)
    assert changed and shard.stat().st_mtime_ns == before.st_mtime_ns


def test_a_source_shard_removed_mid_run_keeps_the_finished_ones(tmp_path):
    src = _source(tmp_path / "src", shards=3)
    last = src / "model-00003-of-00003.safetensors"
    moved = tmp_path / "moved.safetensors"

    def remove_the_last(event):
        if getattr(event, "shard", "") == "model-00001-of-00003.safetensors" and last.exists():
            last.rename(moved)

    with pytest.raises(CheckpointError) as failed:
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", workers=1), on_event=remove_the_last)
    line = str(failed.value)
    assert f"{last}: cannot be opened (No such file or directory); it was moved, deleted" in line
    done = Progress(tmp_path / "out.partial", {}).done()
    assert done and f"{len(done)} finished shard(s) kept in" in line and "--resume" in line
    assert not (tmp_path / "out").exists()
    moved.rename(last)
    report = quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == len(done)
    assert _without_manifest(_tree(tmp_path / "out")) == _fresh(tmp_path, src)


@pytest.mark.parametrize("name", ["tokenizer.json", "model-00002-of-00002.safetensors"])
def test_a_file_swapped_for_a_link_after_planning_is_not_read(tmp_path, name):
    src = _source(tmp_path / "src")
    secret = tmp_path / "secret"
    original = (src / name).read_bytes()
    secret.write_bytes(b"HF_TOKEN=hf_secret".ljust(len(original), b"!"))  # the same size as what it replaces

    def swap(event):
        if type(event).__name__ == "PlanReady":
            (src / name).unlink()
            (src / name).symlink_to(secret)

    with pytest.raises(CheckpointError, match=f"{name}: is no longer the file fp8q planned to read"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", workers=1), on_event=swap)
    assert not (tmp_path / "out").exists()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret]
    leaked = [p for p in files if b"hf_secret" in p.read_bytes()]
    assert leaked == []
