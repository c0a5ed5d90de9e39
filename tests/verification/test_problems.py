"""`fp8q verify` on damaged and unusual checkpoints: an index that promises what is not there, a plain folder,
bad scale and weight values (which dequantize refuses too), and, against the source, split experts and MoE
output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8q import QuantizeOptions, quantize
from fp8q.verification import verify
from tests.support.factories import tiny_qwen3_moe, write_shards
from tests.support.runs import _cli, _source


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
