"""The final rename of OUT.partial to OUT: when it fails, or OUT was filled by someone else meanwhile, the old
output stays whole and every finished shard is kept for --resume."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from fp8q import QuantizeOptions, quantize
from fp8q.errors import OutputError
from fp8q.output.manifest import Progress
from tests.support.runs import _cli, _fresh, _refused, _source, _tree, _without_manifest


@pytest.mark.parametrize("which", ["old OUT, a mount point (EBUSY)", "OUT.partial -> OUT (EIO)"])
def test_a_failed_final_rename_keeps_every_finished_shard(tmp_path, monkeypatch, which):
    import fp8q.output.writer as writer

    src = _source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder, as a mount point is: used as it is
    real = writer.os.rename

    def rename(a, b):
        if "EBUSY" in which and Path(a) == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if "EIO" in which and Path(a).name == "out.partial":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(a, b)

    monkeypatch.setattr(writer.os, "rename", rename)
    _refused(
        _cli("quantize", src, out, "--device", "cpu"),
        f"out.partial: write error ({os.strerror(errno.EBUSY if 'EBUSY' in which else errno.EIO)}); check the disk "
        "and run again; 3 finished shard(s) kept in",
    )
    assert out.is_dir() and not any(out.iterdir())
    assert len(Progress(tmp_path / "out.partial", {}).done()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial", "src"]  # no records left aside
    monkeypatch.setattr(writer.os, "rename", real)
    assert quantize(src, out, QuantizeOptions(device="cpu", resume=True)).resumed_shards == 3
    assert _without_manifest(_tree(out)) == _fresh(tmp_path, src)


def test_a_failed_final_rename_keeps_the_old_output(tmp_path, monkeypatch):
    import fp8q.output.writer as writer

    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    quantize(src, out, QuantizeOptions(device="cpu"))
    before = _tree(out)
    real = writer.os.rename

    def rename(a, b):
        if str(a).endswith("out.partial"):
            raise OSError(5, "Input/output error")
        real(a, b)

    monkeypatch.setattr(writer.os, "rename", rename)
    _refused(_cli("quantize", src, out, "--device", "cpu", "--overwrite", "--scheme", "tensor"), "write error")
    assert _tree(out) == before  # the old output is whole, moved back
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.replaced-")]


def test_out_filled_by_someone_else_during_the_run_keeps_the_work(tmp_path):
    src = _source(tmp_path / "src", shards=2)
    out = tmp_path / "out"

    def meanwhile(event):
        if type(event).__name__ == "TensorDone" and not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("another program's")

    with pytest.raises(OutputError, match=r"out: was filled by something else while fp8q was running.*2 finished"):
        quantize(src, out, QuantizeOptions(device="cpu"), on_event=meanwhile)
    assert _tree(out) == {"theirs.txt": hashlib.sha256(b"another program's").hexdigest()}
    assert len(Progress(tmp_path / "out.partial", {}).done()) == 2
    (out / "theirs.txt").rename(tmp_path / "theirs.txt")
    assert quantize(src, out, QuantizeOptions(device="cpu", resume=True)).resumed_shards == 2
    assert _without_manifest(_tree(out)) == _fresh(tmp_path, src)
