"""--tp: block-quantized layers that vLLM could not shard are named before any data is read."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fp8q import QuantizeOptions, plan_conversion
from fp8q.cli import app
from tests.support.factories import write_shards
from tests.support.runs import _cli, _source

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (512, 256),
    "model.layers.0.self_attn.k_proj.weight": (128, 256),
    "model.layers.0.self_attn.o_proj.weight": (256, 512),
    "model.layers.0.self_attn.q_a_proj.weight": (100, 256),
    "model.layers.0.mlp.gate_proj.weight": (384, 256),
    "model.layers.0.mlp.down_proj.weight": (256, 384),
    "model.layers.1.mlp.experts.0.gate_proj.weight": (256, 256),
    "model.layers.1.mlp.experts.0.down_proj.weight": (256, 256),
}


@pytest.fixture
def src(tmp_path):
    tensors = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in SHAPES.items()}
    return write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config={"model_type": "x"})


def _failing(src, tp, scheme="block"):
    plan = plan_conversion(src, QuantizeOptions(scheme=scheme, tp=tp))
    return sorted(p.split(":")[0] for p in plan.problems)


def test_layers_that_do_not_shard_are_named(src):
    assert _failing(src, 1) == []
    assert _failing(src, 2) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.self_attn.k_proj",
    ]
    assert "model.layers.1.mlp.experts.0.gate_proj" in _failing(src, 4)
    assert "model.layers.0.self_attn.q_a_proj" not in _failing(src, 4)  # replicated in vLLM
    assert _failing(src, 8, scheme="channel") == []  # only block scales need whole tiles per shard


def test_cli_refuses_before_reading_and_inspect_lists_all(src, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--scheme", "block", "--tp", "2"])
    assert result.exit_code == 1
    assert "3 problems, first: " in result.stderr and "at --tp 2; vLLM cannot load" in result.stderr
    assert "--ignore" in result.stderr
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["inspect", str(src), "--scheme", "block", "--tp", "2", "--json", "--quiet"])
    assert result.exit_code == 1  # so that CI can gate on it
    assert len(json.loads(result.stdout)["problems"]) == 3


def test_ignore_and_targets_adjust_the_selection(src):
    plan = plan_conversion(src, QuantizeOptions(targets=(r"\.mlp\.",), ignore=(r"experts",)))
    quantized = sorted(j.input.name for j in plan.jobs if j.action.value == "quantize")
    assert quantized == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"]
    assert sorted(plan.ignored) == sorted(
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.self_attn.q_a_proj",
            "model.layers.1.mlp.experts.0.gate_proj",
            "model.layers.1.mlp.experts.0.down_proj",
        ]
    )
    assert plan.quantization_config["ignore"] == list(plan.ignored)


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


def test_block_moe_experts_that_are_not_whole_tiles_are_refused_at_tp_1(tmp_path):
    from fp8q import plan_conversion
    from tests.support.factories import tiny_qwen3_moe

    src = tiny_qwen3_moe(tmp_path / "src", intermediate=96)
    problems = plan_conversion(src, QuantizeOptions(scheme="block")).problems
    assert any("mlp.experts" in p and "at --tp 1" in p for p in problems), problems
