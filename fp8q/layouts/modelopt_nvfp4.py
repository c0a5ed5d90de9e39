"""NVIDIA ModelOpt NVFP4 (`quant_method: modelopt`, `quant_algo: NVFP4`, in config.json or in ModelOpt's
hf_quant_config.json): `weight` U8 [out, in/2], `weight_scale` F8_E4M3 [out, in/16], `weight_scale_2` F32 [], which
MULTIPLIES (unlike compressed-tensors' global scale, a divisor), and `input_scale` F32 for FP4 activations. Read only.

Imports: torch, layouts (fp4, fp8, inputs). ModelOpt's FP8 (`quant_algo: FP8`, per tensor, `weight_scale` F32 []) and
`FP8_PB_WO` (128x128 blocks) are the fp8 layouts fp8q reads already, found by their scales' shapes.

Decoding: w = code * weight_scale * weight_scale_2, taken left to right in float32 (vLLM's modelopt.py applies the
product of the two scales to its FP4 GEMM's output; there is no library decoder to match, so the order is the one
FORMATS.md section 8 writes): code times an E4M3 scale is exact in float32, so the one rounding is the second product.
"""

from __future__ import annotations

from typing import Any

import torch

from fp8q.layouts.fp4 import Fp4Input, e4m3_problem, unpack_codes
from fp8q.layouts.fp8 import Fp8Layout
from fp8q.layouts.inputs import register_input


@register_input
class ModelOptNvfp4(Fp4Input, Fp8Layout):
    key = "modelopt-nvfp4"
    quant_method = "modelopt"  # ModelOpt's FP8 and FP8_PB_WO are then read as the fp8 family's layouts
    words = "modelopt nvfp4"
    group = 16
    weight_suffix = "weight"
    scale_dtypes = ("F8_E4M3",)
    second_suffix = "weight_scale_2"

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> ModelOptNvfp4 | None:
        qc = quantization_config
        method_ok = qc.get("quant_method") == "modelopt"
        return cls() if method_ok and qc.get("quant_algo") == "NVFP4" and qc.get("group_size", 16) == 16 else None

    def group_values(self, scale: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        values = scale.float()
        return values if second is None else values * second.float().reshape(1, 1)

    def dequantize(
        self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, second: torch.Tensor | None = None
    ) -> torch.Tensor:
        codes = unpack_codes(q)
        rows, cols = codes.shape
        grouped = codes.view(rows, cols // self.group, self.group) * scale.float().unsqueeze(-1)  # exact
        if second is not None:
            grouped = grouped * second.float().reshape(1, 1, 1)
        return grouped.view(rows, cols).to(dtype)

    def scale_problem(self, scale: torch.Tensor) -> str | None:
        return e4m3_problem(scale)
