"""--overwrite: it never removes a folder holding SRC nor anything fp8q did not write, is refused before any data
is read, and keeps the old output until the new one is complete."""

from __future__ import annotations

import hashlib

import pytest
from safetensors.torch import load_file, save_file

from fp8q import QuantizeOptions, quantize
from fp8q.errors import OutputError
from tests.support.runs import _cli, _refused, _source, _tree


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


def test_overwrite_refused_before_any_data_is_read(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    events: list[object] = []
    with pytest.raises(OutputError, match="not an fp8q output"):
        quantize(src, out, QuantizeOptions(device="cpu", overwrite=True), on_event=events.append)
    assert events == []  # refused from the headers, not after a whole conversion
