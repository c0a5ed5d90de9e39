"""The command line: inspect and --dry-run write nothing; --json goes to stdout, humans to stderr."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fp8q import __version__
from fp8q.cli import app
from tests.support.factories import tiny_llama

ROOT = Path(__file__).resolve().parents[2]


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
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--dry-run", "--scheme", "tensor"])
    assert result.exit_code == 0, result.output
    assert "14 quantized, 7 kept" in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # A plan with problems (q/k/v of 80 rows are no whole 128-row tiles for vLLM's merged layers) exits 1.
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--dry-run", "--scheme", "block"])
    assert result.exit_code == 1, result.output
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 10 and any("model.layers.0.self_attn.q_proj: output size 80" in p for p in problems)
    assert result.stderr.strip().splitlines()[-1] == "error: 10 problem(s): quantize would refuse this plan"
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
    script = Path(sys.executable).with_name("fp8q")  # the console script pip installed beside python
    if script.exists():
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and out.stdout.strip() == f"fp8q {__version__}"


def test_import_fp8q_leaves_torch_to_first_use():
    code = (
        "import sys, fp8q; assert 'torch' not in sys.modules, 'imported early'; "
        "fp8q.QuantizeOptions; assert 'torch' in sys.modules; print(sorted(fp8q.__all__) == dir(fp8q))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_verify_and_dequantize_commands(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_llama(tmp_path / "src")
    runner = CliRunner()
    assert runner.invoke(app, ["quantize", str(src), str(tmp_path / "fp8"), "--device", "cpu", "-q"]).exit_code == 0
    good = runner.invoke(app, ["verify", str(tmp_path / "fp8"), "--source", str(src), "--json", "--quiet"])
    assert good.exit_code == 0, good.output
    report = json.loads(good.stdout)
    assert report["ok"] and report["tensors_checked"] == 14 and report["rows"][0]["rel_error"] < 0.05

    back = runner.invoke(app, ["dequantize", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--quiet"])
    assert back.exit_code == 0, back.output
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())

    # Break one scale: verify fails, naming the tensor.
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight_scale"
    shard = tmp_path / "fp8" / index[name]
    tensors = load_file(shard)
    tensors[name] = -tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    bad = runner.invoke(app, ["verify", str(tmp_path / "fp8")])
    assert bad.exit_code == 1
    # Two problems: the shard is not the one fp8q.json lists, and the scale, by name.
    assert bad.stderr.strip().splitlines()[-1].endswith("2 problem(s), listed above")
    assert any("model.layers.1.mlp.up_proj" in line for line in bad.stderr.splitlines() if "problem:" in line)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_json_success_object_for_ci(tmp_path):
    """What a CI job reads: ok, the version, the layout, counts, times, every output file with its sha256, and the
    notes (a shard the index does not list is said in the JSON even under --quiet)."""
    src = tiny_llama(tmp_path / "src")
    (src / "stray.safetensors").write_bytes(
        (src / sorted(p.name for p in src.glob("model*.safetensors"))[0]).read_bytes()
    )
    out = tmp_path / "out"
    args = ["quantize", str(src), str(out), "--json", "-q", "--device", "cpu", "--scheme", "tensor", "--format", "fp8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["exit_code"] == 0 and data["version"] == __version__
    assert data["command"] == "quantize"
    assert data["layout"] == {"scheme": "tensor", "format": "fp8", "scale_format": "float", "block_size": None}
    assert data["tensors_quantized"] == 14 and data["wall_seconds"] >= data["seconds"] > 0
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"fp8q.json"}
    assert set(data["files"]) == on_disk
    assert all(data["files"][name] == _sha256(out / name) for name in on_disk)
    assert any("stray.safetensors" in note and "not listed" in note for note in data["notes"]), data["notes"]


def test_json_failure_object_for_ci(tmp_path):
    """Every failure under --json: one object on stdout with the one line stderr says and the exit code."""
    src = tiny_llama(tmp_path / "src")
    runner = CliRunner()
    cases = [
        (["quantize", str(tmp_path / "nope"), str(tmp_path / "o1")], 1),  # no such source
        (["quantize", str(src), str(src / "inside")], 1),  # OUT inside SRC
        (["quantize", str(src), "/"], 2),  # usage: OUT the root
        (["dequantize", str(src), str(tmp_path / "o2")], 1),  # not an FP8 checkpoint
        (["verify", str(src)], 1),  # verify's own failure: its report, with the error
        (["inspect", str(src), "--scheme", "block", "--tp", "3"], 1),  # a plan with problems
    ]
    for args, code in cases:
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == code, (args, result.output)
        data = json.loads(result.stdout)  # exactly one object
        assert data["ok"] is False and data["exit_code"] == code, (args, data)
        if args[0] != "inspect":  # a plan's problems are listed in it; the others say their one line
            line = result.stderr.strip().splitlines()[-1]
            assert line == f"error: {data['error']}", (args, line, data)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2"))


def test_json_failure_for_a_usage_error_of_the_console_script(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fp8q", "quantize", str(tmp_path), "--json", "--scheme", "bogus"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["exit_code"] == 2 and "bogus" in data["error"]
    assert result.stderr.strip() == f"error: {data['error']}"


def test_fp8q_alone_shows_the_help_without_an_empty_error_and_h_is_help():
    alone = subprocess.run([sys.executable, "-m", "fp8q"], capture_output=True, text=True, cwd=ROOT)
    assert "Usage: python -m fp8q [OPTIONS] COMMAND" in alone.stdout + alone.stderr
    assert "error:" not in alone.stdout + alone.stderr, alone.stderr
    for args in (["-h"], ["quantize", "-h"], ["verify", "-h"]):
        shown = subprocess.run([sys.executable, "-m", "fp8q", *args], capture_output=True, text=True, cwd=ROOT)
        assert shown.returncode == 0 and "Usage: python -m fp8q" in shown.stdout, shown.stderr


def test_ctrl_c_during_verify_does_not_speak_of_an_output_folder(tmp_path):
    """verify writes nothing: a Ctrl-C at any point says it stopped, never that nothing was written to an output
    folder. SIGINT at its default in the child (Popen), as a terminal sends it."""
    import signal
    import time

    from fp8q import QuantizeOptions, quantize
    from tests.engine.test_resume import _big_source

    src = _big_source(tmp_path / "src", shards=6)
    quantize(src, tmp_path / "out", QuantizeOptions(device="cpu"))
    cmd = [sys.executable, "-m", "fp8q", "verify", str(tmp_path / "out"), "--source", str(src)]
    for delay in (0.1, 0.3, 0.5, 0.7, 0.9, 1.2, 1.6, 2.0, 2.5):  # imports, typer parsing, the checks
        child = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
        if child.returncode == 0:
            continue  # it finished first: nothing to say
        assert child.returncode == 130, stderr
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("interrupted: stopped before it") and "written" not in line, stderr


def test_the_ci_examples_pass_inputs_as_variables_and_install_fp8q_as_the_card_says():
    """A `${{ inputs.* }}` pasted into a `run:` script is code injection (a quote in an input ends the string): every
    workflow passes inputs as environment variables. fp8q is installed the way the model card points to (PyPI)."""
    import yaml

    card = (ROOT / "fp8q" / "output" / "model_card.py").read_text()
    assert "https://pypi.org/project/fp8q/" in card
    workflows = sorted((ROOT / "examples" / "ci").glob("*.yml"))
    assert workflows
    for path in workflows:
        flow = yaml.safe_load(path.read_text())
        runs = [step["run"] for job in flow["jobs"].values() for step in job["steps"] if "run" in step]
        assert runs and not [run for run in runs if "${{" in run], path.name
        assert any("pip install fp8q" in run for run in runs), path.name


def test_a_push_shows_its_uploads_and_its_last_steps_on_a_terminal(monkeypatch):
    """The uploads on a bar of their own; the last uploads and the commit, which have no bytes of this process's to
    count, each on a line of its own (the step before it done) rather than behind a bar at 100%."""
    from rich.console import Console

    from fp8q.cli import render
    from fp8q.events import ShardUploaded, Started, Step, TensorDone, UploadStarted

    monkeypatch.setattr(render, "err", Console(file=io.StringIO(), force_terminal=True, width=120))
    with render.ProgressView(quiet=False) as view:
        view.on_event(Started(1, 100))
        view.on_event(UploadStarted(60, 2))
        view.on_event(TensorDone("w", 100, "model-00001-of-00002.safetensors"))
        view.on_event(ShardUploaded("model-00001-of-00002.safetensors", 25))
        view.on_event(Step("uploading the last 1 shard(s) to me/out"))
        view.on_event(ShardUploaded("model-00002-of-00002.safetensors", 35))
        view.on_event(Step("committing 9 files to me/out (main)"))
        assert view.progress is not None
        tasks = {task.description: task for task in view.progress.tasks}
    assert tasks["uploaded model-00002-of-00002.safetensors"].completed == 60
    assert tasks["uploading the last 1 shard(s) to me/out"].finished
    assert (
        tasks["committing 9 files to me/out (main)"].total is None
        and not tasks["committing 9 files to me/out (main)"].finished
    )
