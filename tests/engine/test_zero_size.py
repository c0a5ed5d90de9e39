"""Zero-size tensors are valid safetensors: they go through quantize, verify, dequantize and convert, and the
shards fp8q writes with them are what safetensors itself writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.runs import _cli, _source


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
