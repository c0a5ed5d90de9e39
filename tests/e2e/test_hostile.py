"""The second hostile probe: each class of defect it found, reproduced, with the exit code, the one line, and what
SRC, OUT, OUT.partial and their neighbours hold afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fp8q import QuantizeOptions, quantize
from fp8q.cli import app
from fp8q.errors import CheckpointError, OutputError
from fp8q.output.manifest import Progress
from fp8q.verification import verify
from tests.e2e.test_safety import CONFIG, _cli, _refused, _source, _tree
from tests.support.factories import write_shards

# ── 1. two output tensors with one name, or two scales for one weight, are refused ──


@pytest.mark.parametrize(
    "extra,args,expect",
    [
        (
            {"model.layers.0.mlp.up_proj.weight_scale": torch.ones(64, 1, dtype=torch.bfloat16)},
            [],
            "output tensor model.layers.0.mlp.up_proj.weight_scale would be written twice: the scale fp8q makes for "
            "model.layers.0.mlp.up_proj.weight in model-00001-of-00002.safetensors of the source and tensor "
            "model.layers.0.mlp.up_proj.weight_scale in model-00001-of-00002.safetensors of the source",
        ),
        (
            {"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)},
            ["--scheme", "block", "--format", "fp8", "--no-load-check"],
            "output tensor model.layers.0.mlp.up_proj.weight_scale_inv would be written twice",
        ),
        (
            {"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)},
            [],
            "tensor model.layers.0.mlp.up_proj.weight_scale_inv in model-00001-of-00002.safetensors of the source is "
            "a quantization tensor of model.layers.0.mlp.up_proj.weight, which fp8q quantizes with a scale of its "
            "own: the output would hold two scales for one weight",
        ),
    ],
    ids=["weight_scale beside a bf16 weight", "weight_scale_inv beside it, block fp8", "stray scale, channel"],
)
def test_an_output_name_clash_is_refused_naming_both_sources(tmp_path, extra, args, expect):
    src = _source(tmp_path / "src")
    shard = src / "model-00001-of-00002.safetensors"
    save_file({**load_file(shard), **extra}, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(extra, shard.name)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    before = _tree(tmp_path)
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu", *args), expect)
    assert _tree(tmp_path) == before  # nothing written, nothing beside it


def test_fused_experts_split_into_a_name_the_source_has_is_refused(tmp_path):
    E, H, I = 2, 64, 48  # noqa: E741
    shards = {
        "model-00001-of-00002.safetensors": {
            "model.layers.0.mlp.experts.gate_up_proj": (torch.randn(E, 2 * I, H) * 0.05).to(torch.bfloat16),
            "model.layers.0.mlp.experts.down_proj": (torch.randn(E, H, I) * 0.05).to(torch.bfloat16),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.0.mlp.experts.1.up_proj.weight": (torch.randn(I, H) * 0.05).to(torch.bfloat16),
        },
    }
    config = {"model_type": "qwen3_vl_moe", "hidden_size": H}
    src = write_shards(tmp_path / "src", shards, config=config)
    before = _tree(tmp_path)
    _refused(
        _cli("quantize", src, tmp_path / "out", "--device", "cpu"),
        "output tensor model.layers.0.mlp.experts.1.up_proj.weight would be written twice: split from expert 1 of "
        "model.layers.0.mlp.experts.gate_up_proj in model-00001-of-00002.safetensors of the source and tensor "
        "model.layers.0.mlp.experts.1.up_proj.weight in model-00002-of-00002.safetensors of the source",
    )
    assert _tree(tmp_path) == before


# ── 2. finished work survives every failure after it is recorded ──


def _fresh(tmp_path: Path, src: Path) -> dict[str, str]:
    """The files an uninterrupted run makes (the manifest aside: it records timings)."""
    quantize(src, tmp_path / "fresh" / "out", QuantizeOptions(device="cpu"))
    return _without_manifest(_tree(tmp_path / "fresh" / "out"))


def _without_manifest(tree: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in tree.items() if name != "fp8q.json"}


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


def test_a_source_shard_removed_mid_run_keeps_the_finished_ones(tmp_path):
    src = _source(tmp_path / "src", shards=3)
    last = src / "model-00003-of-00003.safetensors"
    moved = tmp_path / "moved.safetensors"

    def remove_the_last(event):
        if getattr(event, "shard", "") == "model-00001-of-00003.safetensors" and last.exists():
            last.rename(moved)

    with pytest.raises(CheckpointError) as failed:
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", workers=1), on_event=remove_the_last)
    line = str(failed.value)
    assert f"{last}: cannot be opened (No such file or directory); it was moved, deleted" in line
    done = Progress(tmp_path / "out.partial", {}).done()
    assert done and f"{len(done)} finished shard(s) kept in" in line and "--resume" in line
    assert not (tmp_path / "out").exists()
    moved.rename(last)
    report = quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == len(done)
    assert _without_manifest(_tree(tmp_path / "out")) == _fresh(tmp_path, src)


# ── 6. zero-size tensors are valid safetensors, in the input and in fp8q's own output ──


@pytest.mark.parametrize(
    "scheme,fmt", [("channel", "compressed-tensors"), ("block", "fp8"), ("tensor", "fp8"), ("mx", "compressed-tensors")]
)
def test_zero_size_tensors_go_through_quantize_verify_dequantize_and_convert(tmp_path, scheme, fmt):
    extra = {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(0, 128, dtype=torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 0, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.zeros(0, dtype=torch.bfloat16),
    }
    src = _source(tmp_path / "src", shards=1)
    shard = src / "model-00001-of-00001.safetensors"
    save_file({**load_file(shard), **extra}, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(extra, shard.name)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "fp8"
    code, lines = _cli("quantize", src, out, "--device", "cpu", "--scheme", scheme, "--format", fmt, "-q",
                       "--ignore", "v_proj", "--no-load-check")  # fmt: skip
    assert code == 0, lines
    written = load_file(out / shard.name)
    assert written["model.layers.0.self_attn.q_proj.weight"].shape == (0, 128)
    # The shard is what safetensors itself writes for these tensors, zero-size ones included.
    save_file(written, tmp_path / "again.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "again.safetensors").read_bytes() == (out / shard.name).read_bytes()
    assert _cli("verify", out, "--source", src, "-q") == (0, [])
    assert _cli("dequantize", out, tmp_path / "bf16", "-q")[0] == 0
    back = load_file(tmp_path / "bf16" / shard.name)
    assert back["model.layers.0.self_attn.k_proj.weight"].shape == (64, 0)
    target = ["--scheme", "channel"] if scheme != "channel" else ["--scheme", "tensor"]
    assert _cli("convert", out, tmp_path / "conv", "--device", "cpu", "-q", *target, "--no-load-check")[0] == 0


# ── 4. shard names in the index: plain file names of the folder, or refused; verify checks what the index says ──


@pytest.mark.parametrize(
    "rename,expect",
    [
        ({"model-00002-of-00002.safetensors": "sub/model-00002-of-00002.safetensors"}, "is a path, not a file name"),
        ({"model-00001-of-00002.safetensors": "./model-00001-of-00002.safetensors"}, "is a path, not a file name"),
        (
            {
                "model-00001-of-00002.safetensors": "a/x.safetensors",
                "model-00002-of-00002.safetensors": "b/x.safetensors",
            },
            "is a path, not a file name",
        ),
        ({"model-00001-of-00002.safetensors": "m" * 300 + ".safetensors"}, "is longer than a file name can be"),
    ],
    ids=["subfolder", "dot slash", "one basename in two folders", "300 characters"],
)
def test_shard_names_that_are_paths_are_refused(tmp_path, rename, expect):
    src = _source(tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for old, new in rename.items():
        if "/" in new and len(new) < 255:
            (src / new).parent.mkdir(exist_ok=True)
            (src / old).rename(src / new)
        index["weight_map"] = {t: new if shard == old else shard for t, shard in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    before = _tree(tmp_path)
    for command in (["quantize", src, tmp_path / "out", "--device", "cpu"], ["inspect", src]):
        _refused(_cli(*command), f"model.safetensors.index.json: shard name '{next(iter(rename.values()))}'")
        _refused(_cli(*command), expect)
    assert _tree(tmp_path) == before
    # verify of such a folder reports it as a problem (no internal error), exit 1.
    code, lines = _cli("verify", src, "-q")
    assert code == 1 and len(lines) == 1 and expect in lines[0], lines


@pytest.mark.parametrize("damage", ["index names a missing file", "index names a tensor the file lacks"])
def test_verify_fails_a_checkpoint_whose_index_promises_what_is_not_there(tmp_path, damage):
    src = _source(tmp_path / "src")
    quantize(src, tmp_path / "fp8", QuantizeOptions(device="cpu"))
    fp8 = tmp_path / "fp8"
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())
    if damage == "index names a missing file":
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00009-of-00009.safetensors"
        expect = "model-00009-of-00009.safetensors: shard is missing"
    else:
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
        expect = "tensor model.layers.9.mlp.up_proj.weight is listed in model.safetensors.index.json but not in this"
    (fp8 / "model.safetensors.index.json").write_text(json.dumps(index))
    code, lines = _cli("verify", fp8)
    assert code == 1 and lines[-1].startswith(f"error: {fp8}: 1 problem(s), first: ") and expect in lines[-1], lines


# ── 3. side files read with a bound, block sizes checked against the weights, workers capped ──


def _sparse(path: Path, nbytes: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(nbytes)  # a hole: no disk, but a file that many bytes long
    return path


@pytest.mark.parametrize("kind", ["/dev/zero", "a pipe", "a 150 MB file"])
def test_config_option_is_read_with_a_bound(tmp_path, kind):
    src = _source(tmp_path / "src")
    if kind == "/dev/zero":
        config, why = Path("/dev/zero"), "not a regular file"
    elif kind == "a pipe":
        config, why = tmp_path / "fifo", "not a regular file"
        os.mkfifo(config)
    else:
        config, why = _sparse(tmp_path / "big.json", 150_000_000), "more than 100 MB, which no such file holds"
    before = _tree(tmp_path)
    _refused(
        _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--config", config),
        f"{config}: cannot be read ({why})",
    )
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json", "README.md"])
def test_huge_side_files_are_not_read_whole(tmp_path, name):
    src = _source(tmp_path / "src")
    (src / name).unlink()
    _sparse(src / name, 150_000_000)
    before = _tree(tmp_path)
    _refused(
        _cli("quantize", src, tmp_path / "out", "--device", "cpu"), f"{src / name}: cannot be read (more than 100 MB"
    )
    assert _tree(tmp_path) == before  # refused before anything is written, the card's source too


def test_a_block_larger_than_every_weight_is_a_problem_and_the_kernel_never_pads_past_the_weight(tmp_path):
    import subprocess
    import sys

    src = _source(tmp_path / "src")
    for block in ("99999999x1", "1x99999999"):
        code, lines = _cli("inspect", src, "--scheme", "block", "--block-size", block, "--no-load-check")
        assert code == 1 and any(
            line.startswith("problem: --block-size") and "more than any weight has (the largest: 128)" in line
            for line in lines
        ), lines
        args = ("--scheme", "block", "--block-size", block, "--no-load-check", "--device", "cpu")
        _refused(_cli("quantize", src, tmp_path / "out", *args), f"--block-size {block}: 9999")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # The kernel itself, with 2 GB of address space (torch takes under 1 GB): a tile as tall as the block would be
    # 2 GB of zeros; the weight's own rows make the same scales and bytes.
    script = """
import resource, torch
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from fp8q.layouts import numerics
from fp8q.layouts import find
w = (torch.randn(64, 128) * 0.05).to(torch.bfloat16)
for fmt in ("compressed-tensors", "fp8"):
    q, s = numerics.quantize(w, find("block", fmt, block=(1 << 23, 1)))
    q2, s2 = numerics.quantize(w, find("block", fmt, block=(64, 1)))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    back = numerics.dequantize(q, s, find("block", fmt, block=(1 << 23, 1)))
    assert torch.equal(back, numerics.dequantize(q2, s2, find("block", fmt, block=(64, 1))))
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_workers_are_capped_at_the_cores(tmp_path, monkeypatch):
    import fp8q.engine.stages as stages

    cores = len(os.sched_getaffinity(0))
    asked = []
    real = stages.make_quantizer

    def spy(layout, device, workers):
        asked.append(workers)
        return real(layout, device, workers)

    monkeypatch.setattr(stages, "make_quantizer", spy)
    src = _source(tmp_path / "src")
    assert _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--workers", "10000", "-q")[0] == 0
    assert asked == [cores]


# ── 7. names and paths from the input are printed as they are, never as markup ──


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


# ── 8. one line, not an internal error ──


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


def test_lone_surrogates_are_named(tmp_path):
    src = _source(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "name": "\ud800"}))
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "config.json: holds a \\ud800-style escape")
    (src / "config.json").write_text(json.dumps(config))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "\udc00.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "holds half a character (a lone surrogate)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_side_files_named_like_fp8qs_records(tmp_path):
    src = _source(tmp_path / "src")
    (src / "sub").mkdir()
    (src / "sub" / "fp8q.json").write_text('{"the model": "its own"}')
    (src / ".fp8q-done").write_text("a file where fp8q keeps a folder")
    (src / ".fp8q-run.json").write_text("{}")
    out = tmp_path / "out"
    code, lines = _cli("quantize", src, out, "--device", "cpu")
    assert code == 0, lines
    notes = [line for line in lines if line.startswith("note: ") and "named like fp8q's own records" in line]
    assert len(notes) == 2, lines
    assert (out / "sub" / "fp8q.json").read_text() == '{"the model": "its own"}'
    assert not (out / ".fp8q-done").exists() and not (out / ".fp8q-run.json").exists()
    assert "sub/fp8q.json" in json.loads((out / "fp8q.json").read_text())["files"]
    assert _cli("quantize", src, out, "--device", "cpu", "--overwrite", "-q")[0] == 0  # fp8q's own output, replaced


def test_free_space_is_counted_in_filesystem_blocks(tmp_path, monkeypatch):
    import shutil

    from fp8q import plan_conversion

    src = _source(tmp_path / "src")
    for i in range(1000):
        (src / f"vocab-{i}.txt").write_text("x")  # 1 byte each, a 4 KiB block each on disk
    plan = plan_conversion(src, QuantizeOptions())
    side = sum((src / f).stat().st_size for f in plan.checkpoint.side_files)
    # Room for every byte, the index, config and manifest, but not for a thousand files' blocks.
    free = plan.bytes_out + side + 1_000_000
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, free))
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "are free on that disk")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ── 9. what fp8q's own verify would flag is said by quantize: a note, or a problem where no engine could serve it ──


def test_weights_that_all_quantize_to_zero_are_refused_or_noted(tmp_path):
    """float32 weights too small for FP8 (1e-44: all become 0, relative error 1.0): what `verify --source` flags
    stops the run naming the tensor, as a client overflow does; --no-load-check writes it, with a note."""
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.full((64, 128), 1e-44, dtype=torch.float32),
        "model.layers.0.mlp.down_proj.weight": torch.randn(128, 64) * 0.05,
    }
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=CONFIG)
    _refused(
        _cli("quantize", src, tmp_path / "out", "--device", "cpu"),
        "tensor model.layers.0.mlp.up_proj.weight in model.safetensors: its FP8 form is far from it (relative error "
        "1.0000",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    result = CliRunner().invoke(
        app,
        ["quantize", str(src), str(tmp_path / "out"), "--device", "cpu", "--json", "--base-model", "org/m"]
        + ["--no-load-check"],
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "1 quantized weight(s) far from their source" in notes[0], notes
    assert "worst: model.layers.0.mlp.up_proj.weight (1.0000)" in notes[0]
    assert json.loads(result.stdout)["findings"] == [notes[0].removeprefix("note: ")]
    flagged = [p for p in verify(tmp_path / "out", source=src).problems if "far from the source" in p]
    assert len(flagged) == 1 and "model.layers.0.mlp.up_proj.weight" in flagged[0]


def test_a_weight_whose_client_overflows_is_refused_or_noted(tmp_path):
    w = torch.full((64, 128), 65500.0, dtype=torch.float16)  # scale 65500/448 rounds up: 448 x scale > 65504
    tensors = {"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.down_proj.weight": w.t().contiguous()}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=CONFIG)
    _refused(
        _cli("quantize", src, tmp_path / "out", "--device", "cpu"),
        "tensor model.layers.0.mlp.down_proj.weight in model.safetensors: its FP8 form overflows to inf in the float16",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # --format fp8: its clients compute in float32, no overflow.
    assert (
        _cli("quantize", src, tmp_path / "fp8", "--device", "cpu", "--scheme", "tensor", "--format", "fp8", "-q")[0]
        == 0
    )
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--no-load-check")
    assert code == 0, lines
    assert any(line.startswith("note: 2 quantized weight(s) overflow to inf") for line in lines), lines
    assert sum("overflow to inf" in p for p in verify(tmp_path / "out").problems) == 2


# ── 5. a file swapped for a link after planning is not followed ──


@pytest.mark.parametrize("name", ["tokenizer.json", "model-00002-of-00002.safetensors"])
def test_a_file_swapped_for_a_link_after_planning_is_not_read(tmp_path, name):
    src = _source(tmp_path / "src")
    secret = tmp_path / "secret"
    original = (src / name).read_bytes()
    secret.write_bytes(b"HF_TOKEN=hf_secret".ljust(len(original), b"!"))  # the same size as what it replaces

    def swap(event):
        if type(event).__name__ == "PlanReady":
            (src / name).unlink()
            (src / name).symlink_to(secret)

    with pytest.raises(CheckpointError, match=f"{name}: is no longer the file fp8q planned to read"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", workers=1), on_event=swap)
    assert not (tmp_path / "out").exists()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret]
    leaked = [p for p in files if b"hf_secret" in p.read_bytes()]
    assert leaked == []


# ── 11. a new user's rough edges ──


def test_a_typo_of_a_local_folder_says_so_before_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["quantize", "lama", "out"], ["verify", "lama"]):
        _refused(_cli(*command), "error: lama: no such file or folder here, and as a Hub repo: Hub repo lama is not in")
    _refused(_cli("verify", "org/lama"), "Hub repo org/lama is not in the local Hugging Face cache")
    _refused(_cli("verify", "org/lama"), "(and no file or folder 'org/lama' here)")


def test_a_misspelled_command_points_at_the_commands():
    from tests.e2e.test_safety import _fp8q_run

    run = _fp8q_run("quantise", "a", "b")
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "Did you mean 'quantize'" in run.stderr and "(see `fp8q --help`)" in run.stderr, run.stderr


def test_an_fp8_input_points_at_verify_convert_and_dequantize(tmp_path):
    src = _source(tmp_path / "src")
    quantize(src, tmp_path / "fp8", QuantizeOptions(device="cpu"))
    for command in (["inspect", tmp_path / "fp8"], ["quantize", tmp_path / "fp8", tmp_path / "out"]):
        _refused(_cli(*command), "the input is already quantized; `fp8q verify` checks it, `fp8q convert` writes it")


def test_verify_of_a_plain_folder_says_its_problem_once(tmp_path):
    src = _source(tmp_path / "src")
    code, lines = _cli("verify", src)
    assert code == 1 and sum("no FP8 weights" in line for line in lines) == 1, lines
    assert lines[-1] == f"error: {src}: 1 problem(s), first: {src}: no FP8 weights; this is not an FP8 checkpoint"
    fp8 = tmp_path / "fp8"  # four problems: each listed once, the last line counts them
    quantize(src, fp8, QuantizeOptions(device="cpu"))
    (fp8 / "config.json").unlink()
    shard = fp8 / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = -tensors["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, shard, metadata={"format": "pt"})
    code, lines = _cli("verify", fp8)
    problems = [line for line in lines if line.startswith("problem: ")]
    # The two files fp8q.json lists that changed (config.json gone, the shard's sha256), the config, the scale.
    assert code == 1 and len(problems) == 4 and lines[-1] == f"error: {fp8}: 4 problem(s), listed above", lines
    assert not any(problems[0].removeprefix("problem: ") in line for line in lines if line not in problems)
    code, lines = _cli("verify", src, "-q")
    assert code == 1 and lines == [
        f"error: {src}: 1 problem(s), first: {src}: no FP8 weights; this is not an FP8 checkpoint"
    ]


def test_resume_with_changed_options_says_which(tmp_path):
    from tests.engine.test_resume import killed_after

    src = _source(tmp_path / "src", shards=3)
    killed_after(src, tmp_path / "out", 1)
    args = ("--device", "cpu", "--resume", "--scheme", "block", "--block-size", "64x64", "--no-load-check")
    _refused(
        _cli("quantize", src, tmp_path / "out", *args),
        "cannot resume: the options changed since the interrupted run (--block-size 128x128 -> 64x64, --scheme "
        "channel -> block)",
    )


def test_the_plan_names_lm_head_once(tmp_path):
    from tests.support.factories import tiny_llama

    src = tiny_llama(tmp_path / "src")
    code, lines = _cli("inspect", src)
    assert code == 0 and sum("lm_head" in line for line in lines if line.startswith("│")) == 1, lines


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


def test_every_option_is_in_the_readme_and_scheme_help_names_mx():
    import re

    from typer.main import get_command

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = get_command(app).commands["quantize"]  # type: ignore[attr-defined]
    flags = {flag for param in command.params for flag in param.opts if flag.startswith("--") and flag != "--help"}
    missing = sorted(flag for flag in flags if not re.search(rf"`{re.escape(flag)}[` ]", readme))
    assert missing == [], missing
    assert "`--scheme channel|block|tensor|mx`" in readme.replace("\\|", "|")
    help_text = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"}).stdout
    assert "or MXFP8 (mx: per 32 inputs)" in " ".join(help_text.replace("│", " ").split())


# ── 10. what fp8q says a client loads is what the tests measured (each layout's cells), dense and MoE ──


def _moe(tmp_path: Path) -> Path:
    from tests.support.factories import tiny_qwen3_moe

    return tiny_qwen3_moe(tmp_path / "moe", hidden=128, intermediate=128)


def test_per_tensor_compressed_tensors_on_a_moe_model_is_refused(tmp_path):
    src = _moe(tmp_path)
    args = ("--device", "cpu", "--scheme", "tensor")
    _refused(
        _cli("quantize", src, tmp_path / "out", *args),
        "--scheme tensor --format compressed-tensors on a MoE model: vLLM refuses it (its FP8 MoE method takes "
        "per-tensor weights only with static input scales",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    code, lines = _cli("quantize", src, tmp_path / "out", *args, "--no-load-check")
    assert code == 0 and any(
        line.startswith("note: written anyway (--no-load-check): --scheme tensor") for line in lines
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "vLLM and SGLang refuse this layout for this model" in card and "vllm serve" not in card
    # --format fp8 per-tensor is vLLM's own MoE layout: no problem.
    assert _cli("inspect", src, "--scheme", "tensor", "--format", "fp8")[0] == 0


def test_gpt_oss_is_refused_before_writing_and_its_card_says_why(tmp_path):
    E, H, I = 2, 64, 64  # noqa: E741 - square, as gpt-oss-20b's experts are
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": (torch.randn(E, H, 2 * I) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": (torch.randn(E, I, H) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.router.weight": torch.randn(E, H).to(torch.bfloat16),
    }
    config = {"model_type": "gpt_oss", "hidden_size": H}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=config)
    for scheme, fmt in (("channel", "compressed-tensors"), ("block", "fp8")):
        _refused(
            _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--scheme", scheme, "--format", fmt),
            "gpt_oss: no engine loads gpt-oss with FP8 experts as fp8q writes them",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--no-load-check")
    assert code == 0 and any("written anyway (--no-load-check): gpt_oss: no engine" in line for line in lines)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No engine loads this output: gpt_oss: no engine loads gpt-oss" in card and "vllm serve" not in card


@pytest.mark.parametrize("scheme,fmt", [("block", "compressed-tensors"), ("mx", "compressed-tensors")])
def test_a_moe_layout_transformers_cannot_load_is_said_in_the_note_and_the_card(tmp_path, scheme, fmt):
    src = _moe(tmp_path)
    args = ("--device", "cpu", "--scheme", scheme, "--format", fmt, "--no-load-check")  # tiny heads: no whole tiles
    code, lines = _cli("quantize", src, tmp_path / "out", *args)
    assert code == 0, lines
    notes = [line for line in lines if line.startswith("note: ")]
    assert any(f"--scheme {scheme} --format {fmt} on a MoE model: transformers 5.17 cannot load it" in n for n in notes)
    # What the run writes that vLLM refuses (block tiles it cannot split) is said, from the check that refuses it
    # without --no-load-check; no note says vLLM loads it.
    refused = _cli("inspect", src, "--scheme", scheme, "--format", fmt)[1]
    problems = [line.removeprefix("problem: ") for line in refused if line.startswith("problem: ")]
    written = [n.removeprefix("note: written anyway (--no-load-check): ") for n in notes if "written anyway" in n]
    assert [p.removesuffix(" (--no-load-check writes it anyway)") for p in problems] == written, (problems, notes)
    if written:
        assert not any("vLLM and SGLang load it" in n or "vLLM and SGLang can" in n for n in notes), notes
    card = (tmp_path / "out" / "README.md").read_text()
    assert "transformers cannot run this layout for a MoE model" in card and "from_pretrained" not in card


def test_a_dense_model_without_a_tokenizer_gets_no_tokenizer_snippet(tmp_path):
    src = _source(tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    assert _cli("quantize", src, tmp_path / "out", "--device", "cpu", "-q")[0] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card and "AutoTokenizer" not in card


def test_the_readme_table_is_the_clients_table():
    from fp8q.layouts import clients, layouts

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert render_client_table() in readme, render_client_table()
    cells = [cell for layout in layouts() for table in (layout.vllm, layout.transformers) for cell in table.values()]
    assert all(c.evidence is not clients.Evidence.NONE or c.outcome is clients.Outcome.NOT_CHECKED for c in cells)


def render_client_table() -> str:
    """The README's layout x engine table, from each layout's cells (print it to update the README)."""
    from fp8q.layouts import clients, layouts

    marks = {clients.Evidence.TEST: "[t]", clients.Evidence.ENGINES: "[e]", clients.Evidence.SOURCE: "[s]"}

    def cell(c: clients.Cell) -> str:
        why = f": {c.why}" if c.why else ""
        return f"{c.outcome.value}{why} {marks.get(c.evidence, '')}".strip()

    rows = ["| layout | vLLM, dense | vLLM, MoE | transformers, dense | transformers, MoE |", "|---|---|---|---|---|"]
    for layout in layouts():
        cells = [layout.vllm[False], layout.vllm[True], layout.transformers[False], layout.transformers[True]]
        rows.append(f"| {layout.name} | " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(rows)
