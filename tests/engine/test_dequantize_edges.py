"""`fp8q dequantize` at the edges of the dtypes: float16 extremes come back finite, a product no dtype holds is
refused without advice of a wider one, and a float32 output says so in its config."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from fp8q import QuantizeOptions, quantize
from fp8q.verification import verify
from tests.support.factories import load_all, write_shards
from tests.support.runs import CONFIG, _cli, _source


def test_float16_extremes_dequantize_finite_and_verify_does_not_crash(tmp_path):
    w = (torch.randn(64, 128) * 0.05).to(torch.float16)
    w[0, 0] = 65504.0  # the scale 65504/448 rounds up in float16: 448 x scale overflows float16
    tensors = {"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.down_proj.weight": w.t().contiguous()}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=CONFIG)
    # Refused by default (no engine could serve it: tests/plan/test_load_check.py); written here for what reads it.
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


def test_dequantize_float32_says_so_in_config(tmp_path):
    src = _source(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    quantize(src, tmp_path / "fp8", QuantizeOptions(device="cpu"))
    assert _cli("dequantize", tmp_path / "fp8", tmp_path / "f32", "--dtype", "float32", "-q")[0] == 0
    written = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert written["dtype"] == "float32" and "quantization_config" not in written
    assert load_all(tmp_path / "f32")["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
