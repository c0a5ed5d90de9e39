"""torchrun: two CPU processes (gloo) split the shards and write exactly the single-process files;
one failing process fails the whole run, naming the shard, and leaves no OUT."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp8q import QuantizeOptions, quantize
from fp8q.output.manifest import Progress
from tests.engine.test_resume import _hashes, killed_after
from tests.support.factories import add_side_files, write_shards

ROOT = Path(__file__).resolve().parents[2]


def _source(folder: Path, nan_in: str | None = None) -> Path:
    shards = {}
    for i, rows in enumerate([900, 700, 500, 300]):  # unequal sizes: the split is by bytes
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        up = torch.randn(rows, 256).to(torch.bfloat16)
        if name == nan_in:
            up[3, 3] = float("nan")
        shards[name] = {
            f"model.layers.{i}.mlp.up_proj.weight": up,
            f"model.layers.{i}.mlp.down_proj.weight": torch.randn(256, rows).to(torch.bfloat16),
            f"model.layers.{i}.input_layernorm.weight": torch.ones(256, dtype=torch.bfloat16),
        }
    src = write_shards(folder, shards, config={"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False})
    add_side_files(src)
    return src


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "fp8q", "quantize", str(src), str(out), "--device", "cpu", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _manifest_without_timings(folder: Path) -> dict:
    manifest = json.loads((folder / "fp8q.json").read_text())
    manifest.pop("timings")
    return manifest


def test_two_processes_match_one(tmp_path):
    src = _source(tmp_path / "src")
    single, multi = tmp_path / "single" / "out", tmp_path / "multi" / "out"  # one name: the card names OUT
    quantize(src, single, QuantizeOptions(device="cpu"))
    result = _torchrun(src, multi)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _hashes(multi, card=True) == _hashes(single, card=True)
    assert _manifest_without_timings(multi) == _manifest_without_timings(single)
    assert not multi.with_name("out.partial").exists()
    # Each process made its own share, balanced by bytes: 900+300 rows to one, 700+500 to the other.
    made = json.loads((multi / "fp8q.json").read_text())["timings"]["shards"]
    by_rank = [sorted(name for name, shard in made.items() if shard["rank"] == rank) for rank in (0, 1)]
    names = sorted(p.name for p in src.glob("*.safetensors"))
    assert by_rank == [[names[0], names[3]], [names[1], names[2]]]


def test_failing_process_fails_the_run(tmp_path):
    bad = "model-00002-of-00004.safetensors"  # the second largest: the other process's share
    src = _source(tmp_path / "src", nan_in=bad)
    result = _torchrun(src, tmp_path / "out")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and bad in errors[0] and "NaN" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    # The shards the other process finished are kept for --resume, and the line says so; with none, nothing is left.
    partial = tmp_path / "out.partial"
    done = set(Progress(partial, {}).done()) if partial.exists() else set()
    assert partial.exists() == bool(done) and bad not in done
    assert ("finished shard(s) kept in" in errors[0]) == bool(done), errors[0]


def test_resume_with_another_process_count(tmp_path):
    src = _source(tmp_path / "src")
    quantize(src, tmp_path / "single", QuantizeOptions(device="cpu"))
    killed_after(src, tmp_path / "out", 1)
    result = _torchrun(src, tmp_path / "out", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _hashes(tmp_path / "out") == _hashes(tmp_path / "single")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                    found.append(int(entry))
            except (OSError, IndexError):
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("after", [0.3, 2.0])  # in the workers' start-up and rendezvous, and in the run
def test_no_worker_outlives_its_launcher(tmp_path, after):
    """torchrun's launcher killed (SIGKILL: it cannot pass anything on): every worker ends within 60 s (torch's own
    process-group timeout would hold them for days)."""
    import signal
    import time

    src = _source(tmp_path / "src")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "fp8q", "quantize", str(src), str(tmp_path / "out"), "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_children(launcher.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    time.sleep(after)
    launcher.kill()
    launcher.wait()
    died = time.monotonic()
    while any(_alive(w) for w in workers) and time.monotonic() - died < 60:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert left == [], f"workers still running 60 s after their launcher died: {left}"
