"""Reference implementations to compare fp8q against, bit for bit.

compressed-tensors layouts: llm-compressor's own `ModelFreePtqConverter` (the code `model_free_ptq`
runs per shard), imported from the installed library. vLLM layouts: vLLM is a CUDA-only install, so
its math is restated here from its source, step for step:
- per-tensor: vllm/_custom_ops.py `scaled_fp8_quant(w, scale=None)` -> csrc/quantization/w8a8/fp8/common.cu
  `segmented_max_reduction` (float32 |x| max, scale = max / 448) and `scaled_fp8_conversion`
  (x * (1 / scale), clamped to +-448, round to nearest even).
- block: vllm/utils/deep_gemm.py `per_block_cast_to_fp8` (zero-padded tiles, float32 amax
  clamped at 1e-4, sf = amax / 448, with `use_ue8m0` sf = 2^ceil(log2(sf)), q = x * (1.0 / sf)).
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn


def ct_tensor_scheme():
    """compressed-tensors per-tensor weights with dynamic per-token activations (`--scheme tensor`): no preset
    of llm-compressor's has it (FP8 needs calibrated activations), so the scheme is spelled out."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def args(strategy: str, dynamic: bool) -> QuantizationArgs:
        return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=dynamic)

    return QuantizationScheme(targets=["Linear"], weights=args("tensor", False), input_activations=args("token", True))


def llmcompressor_quantize(tensors: dict[str, torch.Tensor], scheme, ignore: list[str]) -> dict[str, torch.Tensor]:
    """Run llm-compressor's model-free converter on a {name: tensor} shard, as model_free_ptq does; `scheme` is a
    preset name or a compressed-tensors QuantizationScheme."""
    from llmcompressor.entrypoints.model_free.converter import ModelFreePtqConverter
    from llmcompressor.entrypoints.model_free.validate import validate_config

    config = validate_config(None, scheme, ignore)
    out = ModelFreePtqConverter(config).process(dict(tensors))
    # llm-compressor 0.14 crashes saving cropped edge tiles (non-contiguous); the values are what count.
    return {k: v.contiguous() for k, v in out.items()}


def vllm_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.float().abs().max()
    scale = (amax / 448.0).reshape(1)
    inv = 1.0 / scale
    q = (w.float() * inv).clamp(-448.0, 448.0).to(FP8)
    return q, scale


def vllm_ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """vllm/utils/deep_gemm.py `_ceil_to_ue8m0`: `torch.pow(2.0, torch.ceil(torch.log2(x.abs())))`."""
    return torch.pow(2.0, torch.ceil(torch.log2(x.abs())))


def vllm_per_block(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """vllm/utils/deep_gemm.py `per_block_cast_to_fp8(x, block_size, use_ue8m0)` (the e4m3fn branch)."""
    m, n = w.shape
    bm, bn = block
    padded = torch.zeros((math.ceil(m / bm) * bm, math.ceil(n / bn) * bn), dtype=w.dtype)
    padded[:m, :n] = w
    view = padded.view(-1, bm, padded.size(1) // bn, bn)
    amax = view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    sf = amax / 448.0
    sf = vllm_ceil_to_ue8m0(sf) if use_ue8m0 else sf
    q = (view * (1.0 / sf)).to(FP8)
    return q.view_as(padded)[:m, :n].contiguous(), sf.view(view.size(0), view.size(2))
