"""Byte parity of every quantized tensor and scale with the reference tool of each layout."""

from __future__ import annotations

import pytest
import torch

from fp8q import QuantizeOptions, quantize
from fp8q.layouts import find
from fp8q.layouts.numerics import quantize as quantize_tensor
from tests.support.factories import as_bytes, assert_same_tensors, load_all, tiny_llama, tiny_qwen3_moe
from tests.support.references import ct_tensor_scheme, llmcompressor_quantize, vllm_per_block, vllm_per_tensor

llmcompressor = pytest.importorskip("llmcompressor", reason="llm-compressor is the reference for compressed-tensors")

SHAPES = [(80, 200), (256, 128), (300, 130), (1, 7), (129, 257)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _weight(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(shape) * 0.05
    w[0] *= 20  # an outlier row
    if shape[0] > 2:
        w[2] = 0  # an all-zero row: the scale must stay finite
    if shape[0] > 128:
        w[128:256] *= 1e-4  # block rows whose tiles' amax is under DeepGEMM's 1e-4 floor
    if shape[1] > 128:
        w[1:128, 128:256] = 0  # with row 0 zeroed below: an all-zero 128x128 tile
        w[0, 128:256] = 0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", ["channel", "block", "tensor"])
def test_compressed_tensors_matches_llmcompressor(shape, dtype, scheme):
    w = _weight(shape, dtype)
    preset = {"channel": "FP8_DYNAMIC", "block": "FP8_BLOCK", "tensor": ct_tensor_scheme()}[scheme]
    ref = llmcompressor_quantize({"layer.weight": w}, preset, [])
    q, s = quantize_tensor(w, find(scheme, "compressed-tensors"))
    assert torch.equal(as_bytes(q), as_bytes(ref["layer.weight"]))
    assert s.dtype == ref["layer.weight_scale"].dtype == dtype
    assert torch.equal(s, ref["layer.weight_scale"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_tensor_matches_vllm(shape, dtype):
    w = _weight(shape, dtype)
    q_ref, s_ref = vllm_per_tensor(w)
    q, s = quantize_tensor(w, find("tensor", "fp8"))
    assert s.shape == () and s.dtype == torch.float32
    assert torch.equal(as_bytes(q), as_bytes(q_ref))
    assert torch.equal(s.reshape(1), s_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_block_matches_deepgemm(shape, dtype):
    w = _weight(shape, dtype)
    q_ref, s_ref = vllm_per_block(w)
    q, s = quantize_tensor(w, find("block", "fp8"))
    if shape[0] > 128:  # the floor is reached, by the all-zero tile and by the tiny ones
        assert bool((s_ref == torch.tensor(1e-4) / 448.0).any())
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    assert torch.equal(as_bytes(q), as_bytes(q_ref))
    assert torch.equal(s, s_ref)


def _model_free_ptq(src, out, preset, ignore):
    from llmcompressor import model_free_ptq

    model_free_ptq(str(src), str(out), scheme=preset, ignore=ignore, device="cpu")


@pytest.mark.parametrize("scheme", ["channel", "tensor"])
def test_dense_checkpoint_matches_model_free_ptq(tmp_path, scheme):
    src = tiny_llama(tmp_path / "src")
    quantize(src, tmp_path / "fp8q", QuantizeOptions(scheme=scheme, device="cpu"))
    preset = "FP8_DYNAMIC" if scheme == "channel" else ct_tensor_scheme()
    _model_free_ptq(src, tmp_path / "ref", preset, ["lm_head", "model.embed_tokens"])
    assert_same_tensors(load_all(tmp_path / "fp8q"), load_all(tmp_path / "ref"))


def test_moe_checkpoint_matches_model_free_ptq(tmp_path):
    src = tiny_qwen3_moe(tmp_path / "src")
    quantize(src, tmp_path / "fp8q", QuantizeOptions(device="cpu"))
    _model_free_ptq(src, tmp_path / "ref", "FP8_DYNAMIC", ["lm_head", "model.embed_tokens", "re:.*mlp.gate$"])
    ours, ref = load_all(tmp_path / "fp8q"), load_all(tmp_path / "ref")
    assert any(".experts.3.down_proj.weight_scale" in k for k in ours)
    assert_same_tensors(ours, ref)


def test_aligned_block_checkpoint_matches_model_free_ptq(tmp_path):
    src = tiny_llama(tmp_path / "src", hidden=128, intermediate=256)
    quantize(src, tmp_path / "fp8q", QuantizeOptions(scheme="block", device="cpu", load_check=False))
    _model_free_ptq(src, tmp_path / "ref", "FP8_BLOCK", ["lm_head", "model.embed_tokens"])
    assert_same_tensors(load_all(tmp_path / "fp8q"), load_all(tmp_path / "ref"))


@pytest.mark.parametrize(
    "fmt_scheme", [("tensor", vllm_per_tensor), ("block", vllm_per_block)], ids=["tensor", "block"]
)
def test_moe_checkpoint_fp8_formats_match_vllm(tmp_path, fmt_scheme):
    scheme, reference = fmt_scheme
    src = tiny_qwen3_moe(tmp_path / "src")
    quantize(src, tmp_path / "out", QuantizeOptions(scheme=scheme, format="fp8", device="cpu", load_check=False))
    source, out = load_all(src), load_all(tmp_path / "out")
    suffix = "weight_scale_inv" if scheme == "block" else "weight_scale"
    checked = 0
    for name, w in source.items():
        if f"{name.removesuffix('weight')}{suffix}" not in out:
            continue
        q_ref, s_ref = reference(w)
        assert torch.equal(as_bytes(out[name]), as_bytes(q_ref)), name
        assert torch.equal(out[f"{name.removesuffix('weight')}{suffix}"].reshape(s_ref.shape), s_ref), name
        checked += 1
    assert checked == 2 * (4 + 4 * 3)  # two layers: q/k/v/o and three projections of four experts
