"""What the tests that run fp8q on small checkpoints share: a sharded Llama-shaped source (`_source`, or `_layers`
of one layer a shard), the command run in-process (`_cli`, `_refused`) or as a user runs it (`_fp8q_run`), a
folder's files with their hashes (`_tree`), an uninterrupted run's files to compare with (`_fresh`), and a run's
peak memory (`_peak_rss_kib`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from fp8q import QuantizeOptions, quantize
from fp8q.cli import app
from tests.support.factories import add_side_files, write_shards

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}


def _source(folder: Path, shards: int = 2, rows: int = 64) -> Path:
    layout = {}
    for i in range(shards):
        layout[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = {
            f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(rows, 128) * 0.05).to(torch.bfloat16),
            f"model.layers.{i}.mlp.down_proj.weight": (torch.randn(128, rows) * 0.05).to(torch.bfloat16),
            f"model.layers.{i}.input_layernorm.weight": torch.ones(128, dtype=torch.bfloat16),
        }
    src = write_shards(folder, layout, config=CONFIG)
    add_side_files(src)
    return src


def _layers(folder: Path, layers: int, width: int = 512) -> Path:
    """`layers` shards of one layer each, every layer the same size: the model grows, its tensors do not."""
    shards = {}
    for i in range(layers):
        shards[f"model-{i + 1:05d}-of-{layers:05d}.safetensors"] = {
            f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(2 * width, width) * 0.05).to(torch.bfloat16),
            f"model.layers.{i}.mlp.down_proj.weight": (torch.randn(width, 2 * width) * 0.05).to(torch.bfloat16),
            f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(width, dtype=torch.bfloat16),
        }
    src = write_shards(folder, shards, config=CONFIG)
    add_side_files(src)
    return src


def _tree(folder: Path) -> dict[str, str]:
    """Every file under a folder (links as links), with its content hash: what a run must leave alone."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _cli(*args: object) -> tuple[int, list[str]]:
    """Run the command in-process; its exit code and its stderr lines."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stderr.strip().splitlines()


def _refused(code_lines: tuple[int, list[str]], expect: str, code: int = 1) -> None:
    code_got, lines = code_lines
    assert code_got == code, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines


def _fp8q_run(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fp8q", *map(str, args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    )


def _fresh(tmp_path: Path, src: Path) -> dict[str, str]:
    """The files an uninterrupted run makes (the manifest aside: it records timings)."""
    quantize(src, tmp_path / "fresh" / "out", QuantizeOptions(device="cpu"))
    return _without_manifest(_tree(tmp_path / "fresh" / "out"))


def _without_manifest(tree: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in tree.items() if name != "fp8q.json"}


_PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _peak_rss_kib(src: Path, out: Path, command: str = "quantize") -> int:
    cmd = [sys.executable, "-m", "fp8q", command, str(src), str(out), "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True, env=env, check=True)
    return int(run.stdout.split()[-1])
