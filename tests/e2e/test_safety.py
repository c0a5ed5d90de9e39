"""Never destroy data, never leak a file, never exit 0 with an output its engine cannot serve.

Each case of the hostile-input review, reproduced: the exit code, the one line, and what SRC, OUT and their
neighbours hold afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fp8q import QuantizeOptions, quantize
from fp8q.cli import app
from fp8q.errors import CheckpointError, OutputError
from fp8q.output.writer import lock_partial
from fp8q.verification import verify
from tests.engine.test_resume import killed_after
from tests.support.factories import add_side_files, load_all, tiny_qwen3_moe, write_shards

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


# ── 1. --overwrite never removes a folder holding SRC, nor anything fp8q did not write ──


@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_overwrite_never_deletes_a_folder_holding_src(tmp_path, command):
    parent = tmp_path / "p"
    src = _source(parent / "models" / "llama")
    if command == "dequantize":
        quantize(src, parent / "models" / "llama-fp8", QuantizeOptions(device="cpu"))
        src = parent / "models" / "llama-fp8"
    (parent / "notes.txt").write_text("the user's")
    before = _tree(tmp_path)
    _refused(_cli(command, src, parent, "--overwrite"), "the output folder holds the source")
    _refused(_cli(command, src, parent / "models", "--overwrite"), "the output folder holds the source")
    assert _tree(tmp_path) == before


def test_overwrite_replaces_only_an_fp8q_output(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(_cli("quantize", src, out, "--device", "cpu"), "exists and is not empty; pass --overwrite")
    _refused(_cli("quantize", src, out, "--device", "cpu", "--overwrite"), "is not an fp8q output")
    assert _tree(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}

    (out / "keep.txt").unlink()
    assert _cli("quantize", src, out, "--device", "cpu", "-q")[0] == 0
    (out / "extra.bin").write_bytes(b"added by the user")  # fp8q.json does not list it
    _refused(_cli("quantize", src, out, "--device", "cpu", "--overwrite"), "holds extra.bin, which fp8q did not write")
    assert (out / "extra.bin").read_bytes() == b"added by the user"

    (out / "extra.bin").unlink()
    first = _tree(out)
    assert _cli("quantize", src, out, "--device", "cpu", "--overwrite", "-q")[0] == 0
    assert _tree(out).keys() == first.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing left beside it


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    src = _source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    quantize(src, out, QuantizeOptions(device="cpu"))
    before = _tree(out)
    shard = src / "model-00003-of-00003.safetensors"
    tensors = load_file(shard)
    good = tensors["model.layers.2.mlp.up_proj.weight"].clone()
    tensors["model.layers.2.mlp.up_proj.weight"][1, 1] = float("nan")  # the last shard fails
    save_file(tensors, shard, metadata={"format": "pt"})
    _refused(_cli("quantize", src, out, "--device", "cpu", "--overwrite"), "holds NaN or inf")
    assert _tree(out) == before
    # The two shards finished before the failure are kept for --resume, beside the old output it has not replaced.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial", "src"]
    tensors["model.layers.2.mlp.up_proj.weight"] = good
    save_file(tensors, shard, metadata={"format": "pt"})
    report = quantize(src, out, QuantizeOptions(device="cpu", overwrite=True, resume=True))
    assert report.resumed_shards == 2
    assert {k: v for k, v in _tree(out).items() if k != "fp8q.json"} == {
        k: v
        for k, v in before.items()
        if k != "fp8q.json"  # which shards were reused is recorded in it
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


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


def test_overwrite_refused_before_any_data_is_read(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    events: list[object] = []
    with pytest.raises(OutputError, match="not an fp8q output"):
        quantize(src, out, QuantizeOptions(device="cpu", overwrite=True), on_event=events.append)
    assert events == []  # refused from the headers, not after a whole conversion


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


# ── 2. a sibling named OUT.old is no business of fp8q's ──


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


# ── 3. no link is followed out of the source ──


def test_side_file_linking_out_is_not_copied_and_said_so(tmp_path):
    src = _source(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("HF_TOKEN=hf_abc")
    (src / "README.md").unlink()
    (src / "README.md").symlink_to(secret)
    (src / "environ.txt").symlink_to("/proc/self/environ")
    (src / "inside.md").symlink_to(src / "tokenizer.json")  # a link that stays inside is fine
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu")
    assert code == 0, lines
    notes = [line for line in lines if line.startswith("note: ")]
    assert any("README.md: a symbolic link to" in n and "outside the checkpoint folder: not copied" in n for n in notes)
    assert any("environ.txt: a symbolic link to /proc/" in n for n in notes)
    out = tmp_path / "out"
    assert not (out / "environ.txt").exists()
    assert "original model card" not in (out / "README.md").read_text()  # the card fp8q writes, alone
    assert (out / "inside.md").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not any(b"hf_abc" in p.read_bytes() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["model-00002-of-00002.safetensors", "config.json", "model.safetensors.index.json"])
def test_shard_config_or_index_linking_out_is_refused(tmp_path, name):
    src = _source(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere" / name
    elsewhere.parent.mkdir()
    (src / name).rename(elsewhere)
    (src / name).symlink_to(elsewhere)
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), f"{name}: a symbolic link to {elsewhere}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_hub_cache_snapshot_links_into_its_repo_are_followed(tmp_path):
    plain = _source(tmp_path / "plain")
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in plain.iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    quantize(snapshot, tmp_path / "a", QuantizeOptions(device="cpu"))
    quantize(plain, tmp_path / "b", QuantizeOptions(device="cpu"))
    files = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name not in ("fp8q.json", "README.md"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # The card names the repo the snapshot belongs to, at its commit, not the snapshot folder's hash.
    card = (tmp_path / "a" / "README.md").read_text()
    assert "base_model: org/name\n" in card and f"--revision {'a' * 40}" in card


# ── 4. --resume never reuses output made from data that has since changed ──


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["plain edit", "edit with mtime set back"])
def test_resume_redoes_a_shard_changed_in_place_under_the_same_header(tmp_path, restore_mtime):
    src = _source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    killed_after(src, out, 2)
    shard = src / "model-00001-of-00003.safetensors"  # finished before the kill (shards go in order)
    stat, header = shard.stat(), shard.read_bytes()[:4096]
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight"] = -tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})  # new values under the very same header and size
    assert shard.stat().st_size == stat.st_size and shard.read_bytes()[:4096] == header
    if restore_mtime:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    report = quantize(src, out, QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == 1  # only the untouched finished shard was reused
    quantize(src, tmp_path / "fresh", QuantizeOptions(device="cpu"))
    for name in ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


# ── 5. one run at a time per output ──


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


# ── 6. never exit 0 with an output whose config does not declare exactly what was quantized ──


@pytest.mark.parametrize(
    "args",
    [["--targets", "nomatch"], ["--ignore", ".*"]],
    ids=["targets match nothing", "ignore everything"],
)
def test_nothing_to_quantize_is_refused(tmp_path, args):
    src = _source(tmp_path / "src")
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu", *args), "nothing to quantize")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_only_non_2d_linear_names_is_refused(tmp_path):
    tensors = {
        "a.q_proj.weight": torch.ones(16, dtype=torch.bfloat16),
        "a.k_proj.weight": torch.ones((), dtype=torch.bfloat16),
        "a.conv.weight": torch.ones(2, 2, 2, 2, dtype=torch.bfloat16),
    }
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=CONFIG)
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "nothing to quantize: none of its 0")
    assert not (tmp_path / "out").exists()


def test_no_config_is_refused_and_config_option_or_neighbour_supplies_it(tmp_path):
    src = _source(tmp_path / "src")
    config = src / "config.json"
    config.rename(tmp_path / "elsewhere.json")
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "config.json: missing")
    assert not (tmp_path / "out").exists()
    assert _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--config", tmp_path / "elsewhere.json")[0] == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "llama" and written["quantization_config"]["quant_method"] == "compressed-tensors"

    lone = tmp_path / "lone"
    lone.mkdir()
    save_file({"x.up_proj.weight": torch.randn(32, 16, dtype=torch.bfloat16)}, lone / "w.safetensors")
    _refused(_cli("quantize", lone / "w.safetensors", tmp_path / "out2", "--device", "cpu"), "config.json: missing")
    (lone / "config.json").write_text(json.dumps(CONFIG))
    assert _cli("quantize", lone / "w.safetensors", tmp_path / "out2", "--device", "cpu", "-q")[0] == 0
    assert "quantization_config" in json.loads((tmp_path / "out2" / "config.json").read_text())


# ── 7. layouts an engine will not load ──


def test_block_layout_is_checked_at_tp_1_by_default(tmp_path):
    src = _source(tmp_path / "src", rows=192)  # up_proj of 192 rows: no whole 128-row tiles for gate_up_proj
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--scheme", "block")
    assert code == 1 and len(lines) == 1, lines
    assert "model.layers.0.mlp.up_proj: output size 192 of a part of a merged layer" in lines[0]
    assert "at --tp 1" in lines[0] and "--scheme channel" in lines[0] and "--no-load-check" in lines[0]
    assert "smaller --tp" not in lines[0]
    assert not (tmp_path / "out").exists()
    assert _cli("inspect", src, "--scheme", "block")[0] == 1
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--scheme", "block", "--no-load-check")
    assert code == 0, lines
    assert any("not multiples of 128x128" in line and "transformers cannot run them" in line for line in lines)
    assert _cli("quantize", src, tmp_path / "out2", "--device", "cpu", "--scheme", "block", "--tp", "2")[0] == 1


def test_layout_a_client_misloads_gets_a_note(tmp_path):
    src = _source(tmp_path / "src")
    code, lines = _cli(
        "quantize",
        src,
        tmp_path / "out",
        "--device",
        "cpu",
        "--scheme",
        "tensor",
        "--format",
        "fp8",
        "--base-model",
        "org/m",
    )
    assert code == 0
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and "transformers ignores its per-tensor weight_scale" in notes[0]


# ── 8. dequantize and verify trust no bad scale or weight ──


def _tampered(tmp_path: Path, change: str, fmt: str = "compressed-tensors", scheme: str = "channel") -> Path:
    src = _source(tmp_path / "src")
    fp8 = tmp_path / "fp8"
    quantize(src, fp8, QuantizeOptions(device="cpu", format=fmt, scheme=scheme))
    shard = fp8 / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    weight = "model.layers.0.mlp.up_proj.weight"
    scale = f"{weight}_scale"
    if change == "zero scale":
        tensors[scale] = tensors[scale].clone()
        tensors[scale][3] = 0
    elif change == "negative scale":
        tensors[scale] = -tensors[scale]
    elif change == "integer scale":
        tensors[scale] = torch.ones_like(tensors[scale], dtype=torch.int32)
    elif change == "NaN byte":
        codes = tensors[weight].view(torch.uint8).clone()
        codes[5, 7] = 0x7F
        tensors[weight] = codes.view(torch.float8_e4m3fn)
    elif change == "huge scale":
        tensors[scale] = torch.full_like(tensors[scale], 1e38)
    save_file(tensors, shard, metadata={"format": "pt"})
    return fp8


@pytest.mark.parametrize(
    "change,fmt,expect",
    [
        ("zero scale", "compressed-tensors", "has 1 zero of its 64 scale values"),
        ("negative scale", "compressed-tensors", "has 64 negative of its 64 scale values"),
        ("integer scale", "compressed-tensors", "has dtype int32, not a float"),
        ("NaN byte", "compressed-tensors", "holds 1 NaN code(s) (0x7f/0xff)"),
        ("huge scale", "fp8", "overflow to inf in the float32 its client computes in"),
    ],
)
def test_bad_values_are_refused_by_dequantize_and_flagged_by_verify(tmp_path, change, fmt, expect):
    scheme = "tensor" if fmt == "fp8" else "channel"
    fp8 = _tampered(tmp_path, change, fmt, scheme)
    report = verify(fp8)
    assert not report.ok and any("model.layers.0.mlp.up_proj.weight" in p and expect in p for p in report.problems), (
        report.problems
    )
    code, lines = _cli("dequantize", fp8, tmp_path / "bf16")
    assert code == 1 and len(lines) == 1 and "model.layers.0.mlp.up_proj" in lines[0], lines
    assert not (tmp_path / "bf16").exists() and not (tmp_path / "bf16.partial").exists()


def test_float16_extremes_dequantize_finite_and_verify_does_not_crash(tmp_path):
    w = (torch.randn(64, 128) * 0.05).to(torch.float16)
    w[0, 0] = 65504.0  # the scale 65504/448 rounds up in float16: 448 x scale overflows float16
    tensors = {"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.down_proj.weight": w.t().contiguous()}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=CONFIG)
    # Refused by default (no engine could serve it: tests/e2e/test_hostile.py); written here for what reads it.
    quantize(src, tmp_path / "fp8", QuantizeOptions(device="cpu", load_check=False))
    report = verify(tmp_path / "fp8", source=src)  # no "math domain error"
    assert any("overflow to inf in the float16 its client computes in" in p for p in report.problems)
    assert _cli("dequantize", tmp_path / "fp8", tmp_path / "bf16", "-q")[0] == 0
    back = load_all(tmp_path / "bf16")["model.layers.0.mlp.up_proj.weight"]
    assert back.dtype == torch.bfloat16 and bool(torch.isfinite(back).all()) and float(back[0, 0]) == 65536.0
    code, lines = _cli("dequantize", tmp_path / "fp8", tmp_path / "f16", "--dtype", "float16")
    assert code == 1 and "exceeds what F16 holds" in lines[0] and "--dtype bfloat16 or float32" in lines[0], lines


def test_a_scale_no_dtype_holds_gets_no_advice_to_dequantize_to_a_wider_one(tmp_path):
    """Dequantizing to bfloat16 a weight times a scale beyond any float: no advice of --dtype bfloat16 (what was
    asked) nor float32 (which cannot hold it either)."""
    src = write_shards(
        tmp_path / "src",
        {"model.safetensors": {"model.layers.0.mlp.up_proj.weight": torch.randn(128, 128).to(torch.bfloat16)}},
        index=False,
        config=CONFIG,
    )
    fp8 = tmp_path / "fp8"
    quantize(src, fp8, QuantizeOptions(device="cpu", scheme="block", format="fp8"))
    tensors = load_file(fp8 / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.full((1, 1), 1e37)
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    code, lines = _cli("dequantize", fp8, tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 1 and "exceeds what BF16 holds" in lines[0], lines
    assert "--dtype" not in lines[0] and lines[0].endswith("quantize it again"), lines


# ── 9. malformed input is named, not an internal error ──


def _raw(path: Path, header: dict) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)


@pytest.mark.parametrize(
    "entry,expect",
    [
        ({"dtype": ["BF16"], "shape": [4], "data_offsets": [0, 8]}, "has dtype ['BF16'], which fp8q does not know"),
        ({"dtype": "BF16", "shape": [True, 4], "data_offsets": [0, 8]}, "header entry for tensor x is malformed"),
    ],
)
def test_malformed_header_entries_are_named(tmp_path, entry, expect):
    src = tmp_path / "src"
    src.mkdir()
    _raw(src / "model.safetensors", {"x": entry})
    (src / "config.json").write_text(json.dumps(CONFIG))
    _refused(_cli("quantize", src, tmp_path / "out"), expect)


def test_deeply_nested_config_is_named(tmp_path):
    src = _source(tmp_path / "src")
    (src / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(_cli("quantize", src, tmp_path / "out"), "config.json: JSON nested too deep")


def test_odd_fused_gate_up_is_named(tmp_path):
    tensors = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 256, 511, dtype=torch.bfloat16)}
    config = {"model_type": "gpt_oss", "hidden_size": 256}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=config)
    _refused(_cli("quantize", src, tmp_path / "out"), "its fused gate+up dim 511 is odd")


def test_out_as_a_link_to_an_empty_folder(tmp_path):
    src = _source(tmp_path / "src")
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "-q")
    assert code == 0, lines
    assert (tmp_path / "out").is_symlink() and (tmp_path / "real" / "fp8q.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real", "src"]


def test_disk_full_writing_the_manifest_keeps_finished_shards(tmp_path, monkeypatch):
    import errno

    import fp8q.output.manifest as manifest

    src = _source(tmp_path / "src")
    real = manifest.atomic_write_json

    def full(path, data):
        if path.name == "fp8q.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(manifest, "atomic_write_json", full)
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu")
    assert code == 1 and len(lines) == 1 and "disk full" in lines[0] and "--resume" in lines[0], lines
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(manifest, "atomic_write_json", real)
    assert quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", resume=True)).resumed_shards == 2


def test_free_space_check_counts_index_config_and_manifest(tmp_path, monkeypatch):
    import shutil

    from fp8q import plan_conversion

    src = _source(tmp_path / "src")
    plan = plan_conversion(src, QuantizeOptions())
    side = sum((src / f).stat().st_size for f in plan.checkpoint.side_files)
    just_shards = plan.bytes_out + side + 10  # room for the shards and side files, not for the rest
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, just_shards))
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "are free on that disk")


# ── 10. verify on split experts, unlisted shards, Ctrl-C during start-up ──


def test_verify_source_understands_split_experts(tmp_path):
    E, H, I = 4, 64, 48  # noqa: E741
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": (torch.randn(E, H, 2 * I) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(E, 2 * I).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": (torch.randn(E, I, H) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.router.weight": torch.randn(E, H).to(torch.bfloat16),
    }
    config = {"model_type": "gpt_oss", "hidden_size": H}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=config)
    quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", load_check=False))  # no engine loads it: refused
    report = verify(tmp_path / "out", source=src)
    assert report.ok, report.problems
    assert report.tensors_checked == 3 * E and all(r.rel_error is not None and r.rel_error < 0.05 for r in report.rows)
    # One expert's part goes missing: named, as the part of the fused source tensor it was split from.
    shard = tmp_path / "out" / "model.safetensors"
    out = load_file(shard)
    del out["model.layers.0.mlp.experts.1.up_proj.weight"], out["model.layers.0.mlp.experts.1.up_proj.weight_scale"]
    save_file(out, shard, metadata={"format": "pt"})
    problems = verify(tmp_path / "out", source=src).problems
    assert problems[0].startswith("model.safetensors: its sha256 is ")  # the shard is not the one fp8q wrote
    assert problems[1:] == [
        "tensor model.layers.0.mlp.experts.1.up_proj.weight (split from model.layers.0.mlp.experts.gate_up_proj "
        "of the source) is missing"
    ]


def test_verify_source_passes_on_moe_output(tmp_path):
    src = tiny_qwen3_moe(tmp_path / "src")
    quantize(src, tmp_path / "out", QuantizeOptions(device="cpu"))
    report = verify(tmp_path / "out", source=src)
    assert report.ok, report.problems


def test_unlisted_shard_is_said(tmp_path):
    src = _source(tmp_path / "src")
    save_file({"stray.weight": torch.ones(4)}, src / "model-extra.safetensors")
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu")
    assert code == 0
    assert any(
        line.startswith("note: ") and "model-extra.safetensors: not listed in model.safetensors.index.json" in line
        for line in lines
    ), lines


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


# ── polish ──


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys; sys.argv = ['fp8q', '--help']\n"
        "from fp8q.__main__ import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stderr


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


def test_help_shows_flags_and_arguments_plainly():
    run = _fp8q_run("quantize", "--help", env={"COLUMNS": "200"})
    assert "quantize [OPTIONS] SRC [OUT]" in run.stdout
    assert "<bool>" not in run.stdout and "{src}" not in run.stdout.lower()


def test_dequantize_float32_says_so_in_config(tmp_path):
    src = _source(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    quantize(src, tmp_path / "fp8", QuantizeOptions(device="cpu"))
    assert _cli("dequantize", tmp_path / "fp8", tmp_path / "f32", "--dtype", "float32", "-q")[0] == 0
    written = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert written["dtype"] == "float32" and "quantization_config" not in written
    assert load_all(tmp_path / "f32")["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


def test_verify_without_source_shows_no_empty_error_columns(tmp_path):
    src = _source(tmp_path / "src")
    quantize(src, tmp_path / "fp8", QuantizeOptions(device="cpu"))
    code, lines = _cli("verify", tmp_path / "fp8")
    assert code == 0
    header = next(line for line in lines if "tensor" in line and "scale range" in line)
    assert "rel err" not in header and "SNR" not in header
    assert any("model.layers.0.mlp.down_proj.weight" in line for line in lines)  # whole, not folded


def test_summary_counts_reused_shards_and_whole_time(tmp_path):
    src = _source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    killed_after(src, out, 1)
    code, lines = _cli("quantize", src, out, "--device", "cpu", "--resume")
    assert code == 0
    text = "\n".join(lines)
    assert "1 finished shard(s) reused from the interrupted run" in text and "s in all (" in text
