"""compressed-tensors MXFP4 (`mxfp4-pack-quantized`, as llm-compressor writes MXFP4 and Kimi-K3 ships its experts):
`weight_packed` U8 [out, in/2], `weight_scale` U8 [out, in/32] E8M0 exponents. Read only (dequantize, convert).

Imports: torch, layouts (base, compressed_tensors, fp4, inputs). Decoding as compressed-tensors'
`MXFP4PackedCompressor.decompress` runs it (transformers with `run_compressed=False`): codes in bfloat16, the scale
2^(byte - 127) in bfloat16, their product in bfloat16, which is exact short of under- and overflow: the same bits as
the float32 product rounded once.
"""

from __future__ import annotations

from typing import Any

import torch

from fp8q.layouts.base import Layout
from fp8q.layouts.compressed_tensors import CompressedTensorsLayout
from fp8q.layouts.fp4 import Fp4Input, e8m0_problem, e8m0_values, mxfp4_outlook
from fp8q.layouts.inputs import register_input


class CtFp4(Fp4Input, CompressedTensorsLayout):
    """What the compressed-tensors FP4 layouts share: their names, and a config group of 4-bit float weights."""

    weight_suffix = "weight_packed"
    ct_format = ""
    strategies: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> CtFp4 | None:
        if args.get("num_bits") == 4 and args.get("type") == "float" and args.get("group_size") == cls.group:
            if args.get("strategy") in cls.strategies:
                return cls()
        return None


@register_input
class CtMxfp4(CtFp4):
    key = "ct-mxfp4"
    words = "compressed-tensors mxfp4-pack-quantized"
    ct_format = "mxfp4-pack-quantized"
    group = 32
    strategies = ("group",)
    scale_dtypes = ("U8",)

    def group_values(self, scale: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        return e8m0_values(scale)

    def scale_problem(self, scale: torch.Tensor) -> str | None:
        return e8m0_problem(scale)

    def outlook(self, target: Layout) -> str:
        return mxfp4_outlook(target)
