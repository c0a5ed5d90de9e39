"""What lands in OUT besides the tensors: shard names and headers, index, config, side files."""

from __future__ import annotations

import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8q import QuantizeOptions, quantize
from tests.support.factories import SIDE_FILES, load_all, tiny_llama


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def test_output_layout(tmp_path):
    src = tiny_llama(tmp_path / "src")
    report = quantize(src, tmp_path / "out", QuantizeOptions(device="cpu"))
    out = tmp_path / "out"
    src_shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(src_shards) > 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == src_shards
    assert not (tmp_path / "out.partial").exists()

    # Side files are copied byte for byte; README.md becomes the output's model card (tests/output/test_model_card.py),
    # with the source's card below it.
    for name in [*SIDE_FILES, "generation_config.json"]:
        if name != "README.md":
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert (out / "README.md").read_text().rstrip().endswith((src / "README.md").read_text().rstrip())

    # config.json: quantization_config added last, every other key unchanged and in order.
    before = json.loads((src / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    qc = after.pop("quantization_config")
    assert list(after.items()) == list(before.items())
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"

    # The index lists every tensor where it is, with the right total size.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = load_all(out)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, shard in index["weight_map"].items():
        assert name in _header(out / shard)
    assert report.tensors_quantized == 14 and report.tensors_kept == 7

    # Every shard carries format=pt metadata and is byte-identical to what save_file writes.
    for shard in src_shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            content = {k: f.get_tensor(k) for k in f.keys()}
        save_file(content, tmp_path / "resaved.safetensors", metadata={"format": "pt"})
        assert (tmp_path / "resaved.safetensors").read_bytes() == (out / shard).read_bytes(), shard

    # Scales sit in the shard of their weight.
    for name in tensors:
        if name.endswith(".weight_scale"):
            assert index["weight_map"][name] == index["weight_map"][name.removesuffix("_scale")]


def test_tied_embeddings(tmp_path):
    src = tiny_llama(tmp_path / "src", tie=True)
    quantize(src, tmp_path / "out", QuantizeOptions(device="cpu"))
    tensors = load_all(tmp_path / "out")
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]


def test_single_file_input(tmp_path):
    src = tmp_path / "one.safetensors"
    save_file({"proj.weight": torch.randn(40, 24, dtype=torch.bfloat16), "norm.weight": torch.ones(24)}, src)
    (tmp_path / "config.json").write_text('{"model_type": "x"}')  # beside the file: engines need it
    (tmp_path / "notes.txt").write_text("not part of it")  # other files beside it are not copied
    quantize(src, tmp_path / "out", QuantizeOptions(device="cpu"))
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["README.md", "config.json", "fp8q.json", "one.safetensors"]  # README.md: the model card
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "x" and config["quantization_config"]["ignore"] == []
    with safe_open(tmp_path / "out" / "one.safetensors", "pt") as f:
        assert f.get_tensor("proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("proj.weight_scale").shape == (40, 1)
        assert f.get_tensor("norm.weight").dtype == torch.float32
