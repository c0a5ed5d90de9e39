"""Bad input, fed as real broken files: exit 1 (2 for usage), one line naming the culprit, and
OUT neither created nor changed."""

from __future__ import annotations

import json
import struct
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8q.cli import app
from tests.support.factories import write_shards
from tests.support.runs import CONFIG, _cli, _refused, _source

Case = namedtuple("Case", "build expect")


def _good(folder: Path) -> Path:
    return write_shards(
        folder,
        {
            "model-00001-of-00002.safetensors": {"a.q_proj.weight": torch.randn(32, 16, dtype=torch.bfloat16)},
            "model-00002-of-00002.safetensors": {"a.norm.weight": torch.ones(16, dtype=torch.bfloat16)},
        },
        config={"architectures": ["X"], "model_type": "llama", "tie_word_embeddings": False},
    )


def _raw_shard(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def missing_src(d: Path) -> Path:
    return d / "nope"


def empty_folder(d: Path) -> Path:
    (d / "src").mkdir()
    return d / "src"


def not_a_checkpoint(d: Path) -> Path:
    (d / "src").mkdir()
    (d / "src" / "README.md").write_text("hi")
    return d / "src"


def missing_shard(d: Path) -> Path:
    src = _good(d / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    return src


def truncated_shard(d: Path) -> Path:
    src = _good(d / "src")
    p = src / "model-00001-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    return src


def tiny_file(d: Path) -> Path:
    src = _good(d / "src")
    (src / "model-00001-of-00002.safetensors").write_bytes(b"abc")
    return src


def oversized_header(d: Path) -> Path:
    src = _good(d / "src")
    (src / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    return src


def header_past_end(d: Path) -> Path:
    src = _good(d / "src")
    (src / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}" * 10)
    return src


def header_not_json(d: Path) -> Path:
    src = _good(d / "src")
    _raw_shard(src / "model-00001-of-00002.safetensors", b"{not json at all}")
    return src


def offsets_gap(d: Path) -> Path:
    src = _good(d / "src")
    header = {"a.q_proj.weight": {"dtype": "BF16", "shape": [32, 16], "data_offsets": [8, 1032]}}
    _raw_shard(src / "model-00001-of-00002.safetensors", json.dumps(header).encode(), b"\0" * 1032)
    return src


def trailing_bytes(d: Path) -> Path:
    src = _good(d / "src")
    p = src / "model-00001-of-00002.safetensors"
    p.write_bytes(p.read_bytes() + b"junk")
    return src


def index_lists_absent_tensor(d: Path) -> Path:
    src = _good(d / "src")
    _index(
        src,
        {
            "a.q_proj.weight": "model-00001-of-00002.safetensors",
            "a.norm.weight": "model-00002-of-00002.safetensors",
            "a.k_proj.weight": "model-00001-of-00002.safetensors",
        },
    )
    return src


def shard_has_unlisted_tensor(d: Path) -> Path:
    src = _good(d / "src")
    extra = {"a.norm.weight": torch.ones(16, dtype=torch.bfloat16), "x.weight": torch.ones(3)}
    write_shards(src, {"model-00002-of-00002.safetensors": extra}, index=False)
    return src


def _hostile(name: str):
    def build(d: Path) -> Path:
        src = _good(d / "src")
        _index(src, {"a.q_proj.weight": name, "a.norm.weight": "model-00002-of-00002.safetensors"})
        return src

    build.__name__ = f"index_shard_{name}"
    return build


def pickle_only(d: Path) -> Path:
    (d / "src").mkdir()
    torch.save({"w": torch.ones(2)}, d / "src" / "pytorch_model.bin")
    (d / "src" / "config.json").write_text("{}")
    return d / "src"


def already_fp8(d: Path) -> Path:
    return write_shards(
        d / "src", {"model.safetensors": {"a.q_proj.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}}, index=False
    )


def has_quantization_config(d: Path) -> Path:
    src = _good(d / "src")
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    return src


def config_not_json(d: Path) -> Path:
    src = _good(d / "src")
    (src / "config.json").write_text("{oops")
    return src


def f64_linear(d: Path) -> Path:
    return write_shards(
        d / "src", {"model.safetensors": {"a.q_proj.weight": torch.zeros(4, 4, dtype=torch.float64)}}, index=False
    )


def unknown_dtype(d: Path) -> Path:
    src = _good(d / "src")
    header = {"a.q_proj.weight": {"dtype": "F7", "shape": [2], "data_offsets": [0, 2]}}
    _raw_shard(src / "model-00001-of-00002.safetensors", json.dumps(header).encode(), b"\0\0")
    return src


def nan_weight(d: Path) -> Path:
    w = torch.randn(32, 16, dtype=torch.bfloat16)
    w[5, 5] = float("nan")
    tensors = {"layers.0.mlp.up_proj.weight": w}
    return write_shards(d / "src", {"model.safetensors": tensors}, index=False, config={"model_type": "llama"})


def one_shard_of_several(tmp: Path) -> Path:
    return _good(tmp / "src") / "model-00001-of-00002.safetensors"


CASES = [
    Case(missing_src, "no such file or folder"),
    Case(empty_folder, "not a safetensors checkpoint"),
    Case(not_a_checkpoint, "not a safetensors checkpoint"),
    Case(missing_shard, "model-00002-of-00002.safetensors: shard is missing"),
    Case(truncated_shard, "model-00001-of-00002.safetensors: the header's offsets cover"),
    Case(tiny_file, "model-00001-of-00002.safetensors: file is truncated"),
    Case(oversized_header, "exceeds the 100000000 byte limit"),
    Case(header_past_end, "runs past the end of the file"),
    Case(header_not_json, "header is not valid JSON"),
    Case(offsets_gap, "tensor a.q_proj.weight starts at byte 8"),
    Case(trailing_bytes, "has trailing bytes"),
    Case(index_lists_absent_tensor, "tensor a.k_proj.weight is listed in model.safetensors.index.json but not"),
    Case(shard_has_unlisted_tensor, "tensor x.weight is in this shard but model.safetensors.index.json does not list"),
    Case(
        _hostile("../evil.safetensors"), "'../evil.safetensors' for tensor a.q_proj.weight must be a .safetensors file"
    ),
    Case(_hostile("/etc/passwd.safetensors"), "'/etc/passwd.safetensors'"),
    Case(_hostile("C:\\x.safetensors"), "'C:\\\\x.safetensors'"),
    Case(_hostile("model.bin"), "'model.bin' for tensor a.q_proj.weight"),
    Case(pickle_only, "only pickle weights (pytorch_model.bin)"),
    Case(already_fp8, "tensor a.q_proj.weight in model.safetensors is already F8_E4M3"),
    Case(has_quantization_config, "has a quantization_config (fp8)"),
    Case(config_not_json, "config.json: not valid JSON"),
    Case(f64_linear, "tensor a.q_proj.weight in model.safetensors has dtype F64"),
    Case(unknown_dtype, "tensor a.q_proj.weight has dtype 'F7'"),
    Case(nan_weight, "tensor layers.0.mlp.up_proj.weight in model.safetensors holds NaN or inf"),
    Case(one_shard_of_several, "one of the 2 shards model.safetensors.index.json beside it lists, not a whole "),
]


def run_cli(*args: str, device: str = "cpu"):
    return CliRunner().invoke(app, ["quantize", *map(str, args), "--device", device])


@pytest.mark.parametrize("case", CASES, ids=[c.build.__name__ for c in CASES])
def test_bad_input(tmp_path, case):
    src = case.build(tmp_path)
    out = tmp_path / "out"
    result = run_cli(src, out)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and case.expect in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_out_equal_to_src(tmp_path):
    src = _good(tmp_path / "src")
    result = run_cli(src, src)
    assert result.exit_code == 1 and "must not be the source folder or inside it" in result.stderr
    result = run_cli(src, src / "sub")
    assert result.exit_code == 1 and "must not be the source folder or inside it" in result.stderr
    assert not (src / "sub").exists()


def test_out_not_empty_is_left_untouched(tmp_path):
    src = _good(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces only an fp8q output (tests/output/test_overwrite.py)
        result = run_cli(src, out, *extra)
        assert result.exit_code == 1 and ("pass --overwrite" if not extra else "not an fp8q output") in result.stderr
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_not_enough_disk(tmp_path, monkeypatch):
    import shutil

    src = _good(tmp_path / "src")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    result = run_cli(src, tmp_path / "out")
    assert result.exit_code == 1 and "but only 100 bytes are free" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--scheme", "channel", "--format", "fp8"], "vLLM's fp8 format has no per-channel weights"),
        (["--block-size", "12"], "--block-size '12': expected ROWSxCOLS"),
        (["--ignore", "(["], "--ignore '([': not a valid regular expression"),
        (["--scheme", "bogus"], "bogus"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, expect):
    src = _good(tmp_path / "src")
    result = run_cli(src, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert expect in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_device_exit_2(tmp_path):
    result = run_cli(_good(tmp_path / "src"), tmp_path / "out", device="tpu")
    assert result.exit_code == 2 and "--device tpu" in result.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8Q_DEBUG", "1")
    result = run_cli(tmp_path / "nope", tmp_path / "out")
    assert result.exit_code != 0
    assert "no such file or folder" in str(result.exception)


def _failing_syscall(monkeypatch, name: str, err: int, after: int = 0):
    """Make os.<name> fail with errno `err` after `after` successful calls, as a bad disk would."""
    import errno as errno_module  # noqa: F401 - documents where the codes come from
    import os as os_module

    real = getattr(os_module, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(err, os_module.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(os_module, name, failing)


def test_read_error_during_the_run(tmp_path, monkeypatch):
    import errno

    src = _good(tmp_path / "src")
    _failing_syscall(monkeypatch, "preadv", errno.EIO)
    result = run_cli(src, tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "read error in tensor a.q_proj.weight" in lines[0], result.stderr
    assert "model-00001-of-00002.safetensors" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_disk_full_during_the_run(tmp_path, monkeypatch):
    import errno

    src = _good(tmp_path / "src")
    _failing_syscall(monkeypatch, "pwrite", errno.ENOSPC)
    result = run_cli(src, tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk full" in lines[0] and "model-00001-of-00002.safetensors" in lines[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_disk_full_copying_a_kept_tensor(tmp_path, monkeypatch):
    """Kept tensors are copied on a thread of their own; its failure is the same one line."""
    import errno

    from fp8q.output import writer

    src = _good(tmp_path / "src")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "copy_range", full)
    result = run_cli(src, tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk full" in lines[0] and "model-00002-of-00002.safetensors" in lines[0], lines
    # The first shard (nothing copied) was finished and is kept: --resume redoes only the second.
    assert "--resume" in lines[0] and not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert run_cli(src, tmp_path / "out", "--resume").exit_code == 0
    assert run_cli(src, tmp_path / "clean").exit_code == 0
    for shard in src.glob("*.safetensors"):
        assert (tmp_path / "out" / shard.name).read_bytes() == (tmp_path / "clean" / shard.name).read_bytes()


def test_verify_of_one_shard_of_several_names_the_folder(tmp_path):
    src = _good(tmp_path / "src")
    out = tmp_path / "out"
    assert run_cli(src, out).exit_code == 0
    result = CliRunner().invoke(app, ["verify", str(out / "model-00001-of-00002.safetensors")])
    assert result.exit_code == 1
    assert f"give the folder instead: {out}" in result.stderr.strip().splitlines()[-1], result.stderr


def test_options_are_typed_and_a_word_that_names_nothing_is_one_line():
    """Options hold the vocabulary's enums, whatever string named them; a wrong word is refused as it is given."""
    from fp8q.engine.options import Options
    from fp8q.errors import UsageError
    from fp8q.layouts.vocabulary import Format, ScaleFormat, Scheme

    options = Options(scheme="block", format="fp8", scale_format="ue8m0")
    assert (options.scheme, options.format, options.scale_format) == (Scheme.BLOCK, Format.FP8, ScaleFormat.UE8M0)
    assert options.layout.describe() == "fp8 block 128x128 ue8m0"
    with pytest.raises(UsageError, match=r"^--scheme 'rows': choose from channel, block, tensor, mx$"):
        Options(scheme="rows")
    with pytest.raises(UsageError, match=r"^--scale-format 'e8m0': choose from float, ue8m0$"):
        Options(scale_format="e8m0")


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
