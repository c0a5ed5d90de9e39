"""Interruption and resume: SIGKILL, SIGINT and SIGTERM part-way, then `--resume`, must give the files
of an uninterrupted run; two runs give identical files; the manifest records what was made."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fp8q import QuantizeOptions, quantize
from fp8q.errors import OutputError
from fp8q.manifest import DONE_DIR, Progress
from tests.factories import add_side_files, write_shards

ROOT = Path(__file__).resolve().parents[1]


def _big_source(folder: Path, shards: int = 8) -> Path:
    """Enough data (about 24 MB a shard) that a run can be stopped part-way."""
    layout = {}
    for i in range(shards):
        layout[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(3000, 2048).to(torch.bfloat16),
            f"model.layers.{i}.mlp.down_proj.weight": torch.randn(2048, 3000).to(torch.bfloat16),
            f"model.layers.{i}.input_layernorm.weight": torch.ones(2048, dtype=torch.bfloat16),
        }
    src = write_shards(folder, layout, config={"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False})
    add_side_files(src)
    return src


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "fp8q.json"
    }


def _start(src: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fp8q", "quantize", str(src), str(out), "--device", "cpu", "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)


def _wait_for_finished_shards(partial: Path, proc: subprocess.Popen[bytes], count: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((partial / DONE_DIR).glob("*.json"))) >= count:
            return
        time.sleep(0.005)
    pytest.fail("the run finished or stalled before it could be interrupted")


@pytest.fixture(scope="module")
def source_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    src = _big_source(root / "src")
    quantize(src, root / "reference", QuantizeOptions(device="cpu"))
    return src, _hashes(root / "reference")


def test_sigkill_then_resume_is_byte_identical(tmp_path, source_and_reference):
    src, expected = source_and_reference
    out = tmp_path / "out"
    proc = _start(src, out, "--workers", "1")
    _wait_for_finished_shards(tmp_path / "out.partial", proc, 2)
    proc.kill()
    proc.wait()
    assert not out.exists()  # a killed run leaves nothing that looks finished

    again = _start(src, out)
    _, err = again.communicate()
    assert again.returncode == 1 and b"pass --resume" in err and not out.exists()

    report = quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards >= 2
    assert _hashes(out) == expected
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resume_finishes(tmp_path, source_and_reference, sig, code):
    src, expected = source_and_reference
    out = tmp_path / "out"
    proc = _start(src, out, "--workers", "1")
    _wait_for_finished_shards(tmp_path / "out.partial", proc, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == code, err
    assert len(lines) == 1 and "interrupted by" in lines[0] and "--resume" in lines[0], lines
    assert not out.exists()
    quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    assert _hashes(out) == expected


def test_resume_refuses_changed_options_or_source(tmp_path, source_and_reference):
    src, _ = source_and_reference
    out = tmp_path / "out"
    proc = _start(src, out, "--workers", "1")
    _wait_for_finished_shards(tmp_path / "out.partial", proc, 1)
    proc.kill()
    proc.wait()
    with pytest.raises(OutputError, match="cannot resume: the options changed"):
        quantize(src, out, QuantizeOptions(device="cpu", resume=True, scheme="block", load_check=False))
    # A finished shard whose bytes were damaged is redone, not trusted.
    done = Progress(tmp_path / "out.partial", {}).done()
    damaged = next(iter(done))
    with open(tmp_path / "out.partial" / damaged, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\xff")
    report = quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == len(done) - 1


def test_two_runs_are_identical_and_manifest_is_complete(tmp_path):
    src = _big_source(tmp_path / "src", shards=2)
    quantize(src, tmp_path / "a", QuantizeOptions(device="cpu", workers=2))
    quantize(src, tmp_path / "b", QuantizeOptions(device="cpu", workers=1))
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")

    manifest = json.loads((tmp_path / "a" / "fp8q.json").read_text())
    assert manifest["version"] and manifest["options"]["scheme"] == "channel"
    assert [s["file"] for s in manifest["source"]["shards"]] == sorted(p.name for p in src.glob("*.safetensors"))
    assert manifest["files"] == _hashes(tmp_path / "a")
    stats = manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert stats["shape"] == [3000, 2048] and 0 < stats["scale_min"] <= stats["scale_max"]
    assert 0 < stats["rel_error"] < 0.05 and stats["max_abs_error"] > 0
    assert "seconds" in manifest["timings"]
