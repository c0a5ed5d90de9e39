"""compressed-tensors NVFP4 (`nvfp4-pack-quantized`, llm-compressor's NVFP4 and NVFP4A16): `weight_packed` U8
[out, in/2], `weight_scale` F8_E4M3 [out, in/16], `weight_global_scale` F32 [1], which DIVIDES. Read only.

Imports: torch, layouts (ct_mxfp4, fp4, inputs). Decoding as compressed-tensors' `NVFP4PackedCompressor.decompress`
runs it: the E4M3 scale in bfloat16 (exact), divided by the global scale in float32 (a tensor division, correctly
rounded on every device), times the code in float32, rounded once to bfloat16. Not exact in general: the quotient has
24 significant bits.
"""

from __future__ import annotations

import torch

from fp8q.layouts.ct_mxfp4 import CtFp4
from fp8q.layouts.fp4 import e4m3_problem
from fp8q.layouts.inputs import register_input


@register_input
class CtNvfp4(CtFp4):
    key = "ct-nvfp4"
    words = "compressed-tensors nvfp4-pack-quantized"
    ct_format = "nvfp4-pack-quantized"
    group = 16
    strategies = ("tensor_group",)
    scale_dtypes = ("F8_E4M3",)
    second_suffix = "weight_global_scale"

    def group_values(self, scale: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        values = scale.to(torch.bfloat16).float()
        return values if second is None else values / second.float().reshape(1, 1)

    def scale_problem(self, scale: torch.Tensor) -> str | None:
        return e4m3_problem(scale)
