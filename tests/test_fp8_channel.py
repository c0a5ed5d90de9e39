"""The fp8 per-channel layout: its bytes against the per-row form of vLLM's per-tensor arithmetic, written into a
checkpoint, read back, verified and dequantized."""

from __future__ import annotations

import json

import pytest
import torch

from fp8q import QuantizeOptions, dequantize, quantize, verify
from fp8q.layouts import find
from fp8q.layouts.numerics import quantize as quantize_tensor
from tests.factories import as_bytes, load_all, tiny_llama

FP8 = torch.float8_e4m3fn


def _per_row_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.float().abs().amax(dim=1, keepdim=True)
    scale = amax / torch.tensor(448.0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (w.float() * torch.reciprocal(scale)).clamp(-448, 448).to(FP8), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(80, 200), (1, 7), (300, 130)])
def test_bytes_match_the_per_row_reference(shape, dtype):
    w = (torch.randn(shape) * 0.05).to(dtype)
    w[0] = 0  # an all-zero row keeps a finite scale
    q_ref, s_ref = _per_row_reference(w)
    q, s = quantize_tensor(w, find("channel", "fp8"))
    assert s.shape == (shape[0], 1) and s.dtype == torch.float32
    assert torch.equal(as_bytes(q), as_bytes(q_ref))
    assert torch.equal(s, s_ref)


def test_checkpoint_round_trip(tmp_path):
    src = tiny_llama(tmp_path / "src")
    out = tmp_path / "out"
    quantize(src, out, QuantizeOptions(scheme="channel", format="fp8", device="cpu", load_check=False))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_granularity"] == "channel"
    tensors, source = load_all(out), load_all(src)
    name = "model.layers.0.mlp.down_proj.weight"
    q_ref, s_ref = _per_row_reference(source[name])
    assert torch.equal(as_bytes(tensors[name]), as_bytes(q_ref))
    assert torch.equal(tensors[name.replace("weight", "weight_scale")], s_ref)
    assert not verify(out, source=src).problems
    dequantize(out, tmp_path / "bf16")
    back = load_all(tmp_path / "bf16")[name]
    assert torch.equal(back, (q_ref.float() * s_ref).to(torch.bfloat16))
