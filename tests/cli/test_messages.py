"""What the command line says: usage errors and failures in one line with their exit codes, nothing with
--quiet, the traceback with FP8Q_DEBUG, Ctrl-C in one line, the resumed run's summary, the verify table, and
names from the input printed as they are, never as markup."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fp8q import QuantizeOptions, quantize
from fp8q.cli import app
from tests.engine.test_resume import killed_after
from tests.support.runs import ROOT, _cli, _fp8q_run, _source, _tree


def test_debug_prints_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "fp8q", "quantize", str(tmp_path / "nope"), str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env)
    loud = subprocess.run(cmd, capture_output=True, text=True, env={**env, "FP8Q_DEBUG": "1"})
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr and quiet.stderr.count("\n") == 1
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr
    assert "CheckpointError: " in loud.stderr and "no such file or folder" in loud.stderr


@pytest.mark.parametrize(
    "args,expect",
    [
        (["quantize", "a", "b", "--scheme", "bogus"], "error: Invalid value for '--scheme': 'bogus' is not one of"),
        (["quantize", "a", "b", "--workers", "-1"], "error: Invalid value for '--workers'"),
        (["quantize", "a"], "error: OUT is missing: give the output folder, or --push-to-hub ORG/NAME"),
    ],
)
def test_usage_errors_are_one_line(args, expect):
    run = _fp8q_run(*args)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith(expect), run.stderr
    assert "╭" not in run.stderr and "Value error" not in run.stderr


def test_a_misspelled_command_points_at_the_commands():
    run = _fp8q_run("quantise", "a", "b")
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "Did you mean 'quantize'" in run.stderr and "(see `fp8q --help`)" in run.stderr, run.stderr


def test_quiet_prints_nothing_on_success(tmp_path):
    src = _source(tmp_path / "src")
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0 and result.stderr == "" and result.stdout == ""


def test_ctrl_c_during_start_up_is_one_line():
    """A Ctrl-C while Python imports the command line (raised there by a stand-in import): one line, exit 130."""
    code = (
        "import builtins, sys\n"
        "real_import = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'fp8q.cli':\n"
        "        raise KeyboardInterrupt\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "sys.argv = ['fp8q', 'quantize', 'a', 'b']\n"
        "from fp8q.__main__ import main\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 130, out.stderr
    assert out.stderr == "interrupted: nothing was written\n"


def test_ctrl_c_before_the_run_says_an_earlier_out_partial_is_kept(tmp_path, monkeypatch):
    import fp8q.engine.run as pipeline
    from tests.engine.test_resume import killed_after

    src = _source(tmp_path / "src", shards=3)
    killed_after(src, tmp_path / "out", 1)
    before = _tree(tmp_path / "out.partial")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "open_source", interrupted)
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--resume")
    assert code == 130 and lines == [
        f"interrupted: nothing was written to the output folder; {tmp_path / 'out.partial'} (an earlier run's) is "
        "left as it was: --resume continues it"
    ], lines
    assert _tree(tmp_path / "out.partial") == before


def test_summary_counts_reused_shards_and_whole_time(tmp_path):
    src = _source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    killed_after(src, out, 1)
    code, lines = _cli("quantize", src, out, "--device", "cpu", "--resume")
    assert code == 0
    text = "\n".join(lines)
    assert "1 finished shard(s) reused from the interrupted run" in text and "s in all (" in text


def test_verify_without_source_shows_no_empty_error_columns(tmp_path):
    src = _source(tmp_path / "src")
    quantize(src, tmp_path / "fp8", QuantizeOptions(device="cpu"))
    code, lines = _cli("verify", tmp_path / "fp8")
    assert code == 0
    header = next(line for line in lines if "tensor" in line and "scale range" in line)
    assert "rel err" not in header and "SNR" not in header
    assert any("model.layers.0.mlp.down_proj.weight" in line for line in lines)  # whole, not folded


def test_names_with_brackets_are_printed_verbatim(tmp_path):
    weird = "model.layers.0.[bold]x[/bold].weight"
    closing = "model.layers.0.[/x].weight"
    src = _source(tmp_path / "m[red]y", shards=1)
    shard = src / "model-00001-of-00001.safetensors"
    extra = {weird: torch.randn(8, 8, dtype=torch.bfloat16), closing: torch.randn(8, 8, dtype=torch.bfloat16)}
    save_file({**load_file(shard), **extra}, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(extra, shard.name)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"stray.weight": torch.ones(4)}, src / "extra[bold].safetensors")  # a note names it
    out = tmp_path / "o[u]t"
    code, lines = _cli("inspect", src, "--ignore", r"\[bold\]")
    assert code == 0, lines
    text = "\n".join(lines)
    assert "fp8q plan for" in text and "m[red]y" in text and weird.removesuffix(".weight") in text
    assert any(line.startswith("note: ") and "extra[bold].safetensors: not listed" in line for line in lines), lines
    code, lines = _cli("quantize", src, out, "--device", "cpu")
    assert code == 0 and any(line == f"done: {out}" for line in lines), lines
    code, lines = _cli("verify", out, "--source", src)
    assert code == 0 and any(closing in line for line in lines) and any(weird in line for line in lines), lines
    # An error naming them, after OUT.partial exists, then --resume: the same, one line each.
    (out / "fp8q.json").unlink()
    code, lines = _cli("quantize", src, out, "--device", "cpu", "--overwrite")
    assert code == 1 and lines == [f"error: {out}: exists, is not empty and is not an fp8q output (no fp8q.json "
                                   "of fp8q's): fp8q deletes nothing it did not write; empty it yourself or choose "
                                   "another folder"], lines  # fmt: skip
