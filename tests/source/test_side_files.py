"""The files beside the shards: config.json (or --config) required and read with a bound, as every side file is;
other weight files neither copied nor opened; files named like fp8q's own records kept apart from them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fp8q.cli import app
from tests.support.runs import CONFIG, _cli, _refused, _source, _tree


def _sparse(path: Path, nbytes: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(nbytes)  # a hole: no disk, but a file that many bytes long
    return path


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


def test_other_weight_files_are_neither_copied_nor_opened(tmp_path):
    import pickle

    src = _source(tmp_path / "src")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling it would create the marker

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    (src / "consolidated.safetensors").write_bytes((src / "model-00001-of-00002.safetensors").read_bytes())
    code = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--device", "cpu", "-q"]).exit_code
    assert code == 0 and not marker.exists()
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert not (tmp_path / "out" / "consolidated.safetensors").exists()


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
