"""compressed-tensors MXFP8 (`mxfp8-quantized`, llm-compressor's `model_free_ptq(scheme="MXFP8")`): groups of 32 along
the input dim, each scale a power of two stored as its E8M0 exponent in one byte (`weight_scale` `[out, in/32]`
uint8); activations in groups of 32 at run time.

Imports: torch, layouts (base, clients, compressed_tensors, kernels, vocabulary).

Numerics (compressed-tensors `calculate_qparams` with an E8M0 uint8 scale): per group, in the weight's dtype:
amax rounded to a power of two (up when its mantissa is at least 0.75), exponent - 8 (the e4m3 largest power of
two), biased by 127 and clamped to [0, 255]; the scale 2^(exponent - 127) in the weight's dtype (1 where that
underflows), q = x / scale.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from fp8q.layouts.base import Band, Layout, register
from fp8q.layouts.clients import Cell, Evidence, Outcome
from fp8q.layouts.compressed_tensors import CompressedTensorsLayout, quant_args
from fp8q.layouts.kernels import FP8_MAX, abs_max, check_finite, log2_of_pow2, pow2
from fp8q.layouts.vocabulary import Scheme

MX_GROUP = 32
_MX = {"group_size": MX_GROUP, "scale_dtype": "torch.uint8", "zp_dtype": None, "observer": None}
_DECOMPRESS = "its expert decompression does not spread tile or group scales"
# The mantissa and exponent widths of the dtypes MX amaxes come in; compressed-tensors rounds with their bits.
_BITS = {torch.bfloat16: (7, 8, torch.int16), torch.float16: (10, 5, torch.int16), torch.float32: (23, 8, torch.int32)}


def mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The biased E8M0 exponent of each group's scale, from its amax in the weight's dtype (int32 in [0, 255])."""
    mantissa, exponent_bits, int_dtype = _BITS[amax.dtype]
    bits = amax.view(int_dtype).to(torch.int64) & ((1 << (8 * amax.element_size())) - 1)
    # Round to a power of two: up when the mantissa's top two bits are set (its fraction is 0.75 or more).
    rounded = (bits + (1 << (mantissa - 2))) & (((1 << (exponent_bits + 1)) - 1) << mantissa)
    width = 8 * amax.element_size()
    signed = torch.where(rounded >= 1 << (width - 1), rounded - (1 << width), rounded).to(int_dtype)
    p2 = signed.view(amax.dtype).float()
    exponent = 127 + log2_of_pow2(p2) - 8  # 8: log2 of e4m3's largest power of two, 256 (448 = 1.75 x 256)
    exponent = torch.where(p2 == 0, torch.zeros_like(exponent), exponent)
    exponent = torch.where(torch.isinf(p2), torch.full_like(exponent, 255), exponent)
    return exponent.clamp(0, 255)


def mx_scale_values(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 uint8 exponents as the scales they stand for, in bfloat16 as compressed-tensors decodes them."""
    return pow2(scale.to(torch.int32) - 127).to(torch.bfloat16)


@register()
class CtMx(CompressedTensorsLayout):
    key = "ct-mx"
    scheme = Scheme.MX
    ct_format = "mxfp8-quantized"
    detect_order = 25  # before block: a group of 32 with uint8 scales is MXFP8, other groups are blocks
    transformers = {False: Cell(Outcome.RUNS, Evidence.TEST), True: Cell(Outcome.REFUSES, Evidence.TEST, _DECOMPRESS)}
    vllm = {
        False: Cell(Outcome.NOT_CHECKED, Evidence.NONE, "no MXFP8 kernel in the CPU build"),
        True: Cell(Outcome.NOT_CHECKED, Evidence.NONE, "no MXFP8 kernel in the CPU build"),
    }

    def granularity(self) -> str:
        return "one per 32 inputs of a row, a power-of-two exponent in one byte (E8M0)"

    def scale_dtype(self, weight_dtype: str) -> str:
        return "U8"

    def client_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16  # compressed-tensors decodes E8M0 to bfloat16, and multiplies in it

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return (rows, cols // MX_GROUP)

    def args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # `scale_dtype`, which only the releases that have MX know: the keys llm-compressor writes for it.
        return quant_args("group", False, **_MX), quant_args("group", True, **_MX)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Layout | None:
        uint8 = args.get("scale_dtype") in ("torch.uint8", "uint8")
        return cls() if args.get("strategy") == "group" and args.get("group_size") == MX_GROUP and uint8 else None

    @classmethod
    def shape_candidates(cls, expected: Layout | None) -> list[Layout]:
        return []  # its scale is told by its dtype (`claims`), not by its shape alone

    @classmethod
    def claims(cls, scale_dtype: str) -> bool:
        return scale_dtype == "U8"

    def broadcast(self, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return scale.repeat_interleave(MX_GROUP, 1)

    def decode_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return mx_scale_values(scale)

    def scale_problem(self, scale: torch.Tensor) -> str | None:
        if scale.dtype != torch.uint8:
            return f"dtype {str(scale.dtype).removeprefix('torch.')}, not uint8 E8M0 exponents"
        nans = int((scale == 255).sum())
        return f"{nans} NaN (E8M0 255) of its {scale.numel()} scale values" if nans else None

    def shape_problem(self, module: str, rows: int, cols: int) -> str | None:
        if cols % MX_GROUP == 0:
            return None
        return (
            f"{module}: input size {cols} is not a multiple of {MX_GROUP}, the MXFP8 group: use another --scheme, "
            f"or --ignore '^{re.escape(module)}$'"
        )

    def rule_problem(self, weight: Any, scale: Any) -> str | None:
        where = f"tensor {scale.name} in {scale.shard}"
        if scale.name.rpartition(".")[2] != "weight_scale":
            return f"{where}: compressed-tensors names the scale {weight.module}.weight_scale"
        return None if scale.dtype == "U8" else f"{where} is {scale.dtype}; MXFP8 scales are U8 E8M0 exponents"

    def tags(self) -> list[str]:
        tags = super().tags()
        return [*tags[:2], "mxfp8", *tags[2:]]

    def scales_text(self) -> str:
        return f"`{self.scale_suffix}`, {self.granularity()}"

    def _quantize_band(self, band: Band) -> None:
        groups = band.rows.unflatten(-1, (-1, MX_GROUP))
        amax = abs_max(groups, dim=-1, keepdim=False)
        check_finite(amax)
        scale = pow2(mx_exponent(amax) - 127).to(band.rows.dtype)
        # compressed-tensors' zero guard for uint8 scales is 1: only a float16 scale that underflowed meets it.
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        # Dividing by a power of two is exact; the clamp only bites where a guarded scale of 1 left big values.
        band.codes.copy_((groups / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).flatten(-2))
        band.scales.copy_((127 + log2_of_pow2(scale)).to(torch.uint8))
