"""Two output tensors with one name, or two scales for one weight, are refused naming both sources."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.factories import write_shards
from tests.support.runs import _cli, _refused, _source, _tree


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
