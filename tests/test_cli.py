"""The command line: inspect and --dry-run write nothing; --json goes to stdout, humans to stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fp8q import __version__
from fp8q.cli import app
from tests.factories import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def test_inspect_json_plan(tmp_path):
    src = tiny_llama(tmp_path / "src")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["inspect", str(src), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["tensors_quantized"] == 14 and plan["tensors_kept"] == 7
    assert plan["ignored_modules"] == ["lm_head"]
    assert plan["bytes_out"] < plan["bytes_in"]
    assert plan["estimated_peak_host_bytes"] > 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_dry_run_writes_nothing(tmp_path):
    src = tiny_llama(tmp_path / "src")
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--dry-run", "--scheme", "block"])
    assert result.exit_code == 0, result.output
    assert "14 quantized, 7 kept" in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_json_summary_on_stdout(tmp_path):
    src = tiny_llama(tmp_path / "src")
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors_quantized"] == 14 and summary["bytes_out"] > 0
    assert "done" in result.stderr


def test_console_script_and_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fp8q", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == f"fp8q {__version__}"
    missing = subprocess.run(
        [sys.executable, "-m", "fp8q", "quantize", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "no such file or folder" in missing.stderr
    usage = subprocess.run([sys.executable, "-m", "fp8q", "quantize"], capture_output=True, text=True, cwd=ROOT)
    assert usage.returncode == 2
