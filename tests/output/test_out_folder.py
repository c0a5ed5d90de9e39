"""What OUT may be (a new folder of its own, a link to an empty folder), what happens when it cannot be created,
and its neighbours, OUT.old among them, left alone."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fp8q import QuantizeOptions, quantize
from tests.support.runs import _cli, _refused, _source, _tree


@pytest.mark.parametrize("out", [".", "./", "/", "..", "../empty"])
def test_out_that_is_no_folder_of_its_own_is_a_usage_error(tmp_path, out):
    import subprocess
    import sys

    src = _source(tmp_path / "src")
    cwd = tmp_path / "empty"
    cwd.mkdir()
    before = _tree(tmp_path)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "fp8q", "quantize", str(src), out, "--device", "cpu"],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "the output must be a new folder of its own" in run.stderr, run.stderr
    assert _tree(tmp_path) == before


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    src = _source(tmp_path / "src")
    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "out.partial: cannot be created (Read-only")
    monkeypatch.setattr(Path, "mkdir", real)
    long = tmp_path / ("x" * 250)  # fits, but not with ".partial" added
    _refused(_cli("quantize", src, long, "--device", "cpu"), ".partial: cannot be created (File name too long)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_out_as_a_link_to_an_empty_folder(tmp_path):
    src = _source(tmp_path / "src")
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "-q")
    assert code == 0, lines
    assert (tmp_path / "out").is_symlink() and (tmp_path / "real" / "fp8q.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real", "src"]


def test_sibling_out_old_is_never_touched(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()  # exists and is empty: used as it is
    old = tmp_path / "out.old"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "data.txt").write_text("precious")
    before = _tree(old)
    assert _cli("quantize", src, out, "--device", "cpu", "-q")[0] == 0
    assert _tree(old) == before and (out / "fp8q.json").is_file()
    quantize(src, out, QuantizeOptions(device="cpu", overwrite=True))
    assert _tree(old) == before
