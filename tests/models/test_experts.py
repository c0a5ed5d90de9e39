"""Fused 3-D expert tensors are split into per-expert 2-D weights with the standard names, each
quantized exactly as if it had been stored on its own; biases follow their weights."""

from __future__ import annotations

import pytest
import torch

from fp8q import QuantizeOptions, quantize
from fp8q.layouts import find
from fp8q.layouts.numerics import quantize as quantize_tensor
from tests.support.factories import as_bytes, load_all, write_shards
from tests.support.runs import _cli, _refused

E, H, I = 3, 40, 24  # noqa: E741


def _fused(tmp_path, model_type: str, transposed: bool, extra: dict[str, torch.Tensor] | None = None):
    gate_up = torch.randn(E, H, 2 * I) if transposed else torch.randn(E, 2 * I, H)
    down = torch.randn(E, I, H) if transposed else torch.randn(E, H, I)
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": gate_up.mul(0.05).to(torch.bfloat16),
        "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(E, 2 * I).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": down.mul(0.05).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj_bias": torch.randn(E, H).to(torch.bfloat16),
        "model.layers.0.mlp.router.weight": torch.randn(E, H).to(torch.bfloat16),
        **(extra or {}),
    }
    config = {"model_type": model_type, "hidden_size": H, "tie_word_embeddings": False}
    return write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=config), tensors


def _expected_parts(tensors, e: int, model_type: str, transposed: bool):
    gate_up = tensors["model.layers.0.mlp.experts.gate_up_proj"][e]
    down = tensors["model.layers.0.mlp.experts.down_proj"][e]
    bias = tensors["model.layers.0.mlp.experts.gate_up_proj_bias"][e]
    if transposed:
        gate_up, down = gate_up.t(), down.t()
    if model_type == "gpt_oss":
        gate, up, gate_b, up_b = gate_up[0::2], gate_up[1::2], bias[0::2], bias[1::2]
    else:
        gate, up, gate_b, up_b = gate_up[:I], gate_up[I:], bias[:I], bias[I:]
    return {"gate_proj": (gate, gate_b), "up_proj": (up, up_b), "down_proj": (down, None)}


@pytest.mark.parametrize(
    "model_type,transposed",
    [("gpt_oss", True), ("llama4_text", True), ("qwen3_moe", False)],
    ids=["gpt-oss interleaved [E,H,2I]", "llama4 concatenated [E,H,2I]", "linear-orientation [E,2I,H]"],
)
@pytest.mark.parametrize("scheme,fmt", [("channel", "compressed-tensors"), ("block", "fp8")])
def test_fused_experts_are_split_then_quantized(tmp_path, model_type, transposed, scheme, fmt):
    src, tensors = _fused(tmp_path, model_type, transposed)
    report = quantize(src, tmp_path / "out", QuantizeOptions(scheme=scheme, format=fmt, device="cpu", load_check=False))
    out = load_all(tmp_path / "out")
    layout = find(scheme, fmt)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in out
    assert report.tensors_quantized == 3 * E
    for e in range(E):
        for proj, (weight, bias) in _expected_parts(tensors, e, model_type, transposed).items():
            name = f"model.layers.0.mlp.experts.{e}.{proj}"
            q, s = quantize_tensor(weight.contiguous(), layout)
            assert out[f"{name}.weight"].shape == weight.shape == ((H, I) if proj == "down_proj" else (I, H))
            assert torch.equal(as_bytes(out[f"{name}.weight"]), as_bytes(q)), name
            assert torch.equal(out[f"{name}.{layout.scale_suffix}"], s), name
            if bias is not None:
                assert torch.equal(out[f"{name}.bias"], bias), name
        assert torch.equal(
            out[f"model.layers.0.mlp.experts.{e}.down_proj.bias"],
            tensors["model.layers.0.mlp.experts.down_proj_bias"][e],
        )
    assert out["model.layers.0.mlp.router.weight"].dtype == torch.bfloat16


def test_ignored_fused_experts_stay_fused(tmp_path):
    attention = {"model.layers.0.self_attn.o_proj.weight": torch.randn(H, H).to(torch.bfloat16)}
    src, tensors = _fused(tmp_path, "llama4_text", True, extra=attention)
    quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", ignore=("experts",)))
    out = load_all(tmp_path / "out")
    assert sorted(out) == sorted([*tensors, "model.layers.0.self_attn.o_proj.weight_scale"])
    assert out["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert all(torch.equal(out[k], tensors[k]) for k in tensors if "experts" in k)


def test_odd_fused_gate_up_is_named(tmp_path):
    tensors = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 256, 511, dtype=torch.bfloat16)}
    config = {"model_type": "gpt_oss", "hidden_size": 256}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=config)
    _refused(_cli("quantize", src, tmp_path / "out"), "its fused gate+up dim 511 is odd")
