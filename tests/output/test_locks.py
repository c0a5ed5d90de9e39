"""One run at a time per output: OUT.partial's lock refuses a second run, naming the first one's pid."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fp8q import QuantizeOptions, quantize
from fp8q.output.writer import lock_partial
from tests.engine.test_resume import killed_after
from tests.support.runs import ROOT, _cli, _fp8q_run, _refused, _source, _tree


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_on_a_locked_output_is_refused(tmp_path, resume):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    killed_after(src, out, 1)
    partial = tmp_path / "out.partial"
    before = _tree(partial)
    fd = lock_partial(partial)  # stands for another live run; the record names the run that made it
    try:
        args = ["quantize", src, out, "--device", "cpu", *(["--resume"] if resume else [])]
        _refused(_cli(*args), "out.partial: another fp8q run (pid ")
    finally:
        os.close(fd)
    assert _tree(partial) == before and not out.exists()
    assert quantize(src, out, QuantizeOptions(device="cpu", resume=True)).resumed_shards == 1


def test_two_real_runs_on_one_output(tmp_path):
    src = _source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stopped = ROOT / "tests" / "support" / "stopped_run.py"  # pauses holding the lock
    cmd = [sys.executable, str(stopped), "1:STOP", "quantize", str(src), str(out), "--device", "cpu", "--quiet"]
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    try:
        partial = tmp_path / "out.partial"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the first run has stopped itself, at a known point
            with open(f"/proc/{first.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            time.sleep(0.01)
        second = _fp8q_run("quantize", src, out, "--device", "cpu", "--resume")
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1 and "another fp8q run (pid " in second.stderr, second.stderr
        assert f"pid {first.pid} " in second.stderr
        os.kill(first.pid, 18)  # SIGCONT
        first.wait(timeout=120)
        assert first.returncode == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    assert not partial.exists()
    quantize(src, tmp_path / "fresh", QuantizeOptions(device="cpu"))
    for name in (p.name for p in src.glob("*.safetensors")):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
