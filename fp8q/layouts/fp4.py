"""What every FP4 input codec shares: E2M1 codes two to a byte, one scale per group of inputs along a row, and how a
checkpoint in such a layout is read back and decoded. fp8q reads these layouts (dequantize, convert); it writes none
(inputs.py).

Imports: torch, layouts (base, inputs, kernels), source.checkpoint (types).

An E2M1 nibble is a sign bit and an index into 0, 0.5, 1, 1.5, 2, 3, 4, 6; the low nibble of a byte is the even
element along the input dimension (compressed-tensors' `unpack_fp4_from_uint8`, transformers'
`convert_moe_packed_tensors`, vLLM's loaders agree). A value is its code times its group's multiplier, which each
codec decodes from its scales as its own library does (`group_values`); the product is taken in float32, as the
libraries take it, and rounded once to the dtype asked for. Exact for bfloat16 output where the multiplier is a power
of two (MXFP4): a code has two significant bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from fp8q.layouts.inputs import InputLayout
from fp8q.layouts.kernels import pow2

if TYPE_CHECKING:
    from fp8q.layouts.base import Layout
    from fp8q.source.checkpoint import TensorMeta

# E2M1 nibble -> value (8..15: the same magnitudes negated; 8 is -0).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor([*_E2M1, *(-v for v in _E2M1)], dtype=torch.float32)
E8M0_NAN = 255  # the E8M0 byte that stands for NaN


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The FP4 values of a [rows, cols/2] uint8 (or int8) tensor as a [rows, cols] float32 tensor."""
    as_bytes = packed.view(torch.uint8)
    nibbles = torch.stack((as_bytes & 0x0F, as_bytes >> 4), dim=-1).reshape(packed.shape[0], -1)
    return E2M1_VALUES.to(packed.device)[nibbles.long()]


def e8m0_values(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8, or float8_e8m0fnu) as the float32 powers of two they stand for: 2^(byte - 127)."""
    return pow2(scale.view(torch.uint8).to(torch.int32) - 127)


def e8m0_problem(scale: torch.Tensor) -> str | None:
    """An E8M0 scale's NaN bytes (255) in words, or None: every value of their group would be NaN."""
    nans = int((scale.view(torch.uint8) == E8M0_NAN).sum())
    return f"{nans} NaN (byte 255) of its {scale.numel()} E8M0 scale values" if nans else None


def e4m3_problem(scale: torch.Tensor) -> str | None:
    """An NVFP4 group scale's unusable values (NaN, negative) in words, or None. A zero is a group of zeros."""
    values = scale.float()
    found = [(int(mask.sum()), what) for mask, what in ((torch.isnan(values), "NaN"), (values < 0, "negative"))]
    said = [f"{n} {what}" for n, what in found if n]
    return f"{', '.join(said)} of its {values.numel()} scale values" if said else None


def mxfp4_outlook(target: Layout) -> str:
    """What MXFP4 (E2M1 codes, power-of-two scales per 32 inputs) keeps in an FP8 layout (FORMATS.md section 8)."""
    if target.scheme.value == "mx":
        return "exact: every MXFP4 group fits an MXFP8 group of the same scale"
    if target.block is not None and target.scale_format.value == "ue8m0":
        return (
            "exact in tiles whose group scales lie within 2^14 of each other; beyond, only some codes are: each "
            "weight is checked"
        )
    return "not exact in general (a scale of amax / 448 is no power of two): each weight's error is measured"


class Fp4Input(InputLayout):
    """An FP4 layout: codes two to a byte, one scale per `group` inputs of a row."""

    group: ClassVar[int]

    def decoded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The weight's shape once decoded: two values a byte."""
        return *shape[:-1], shape[-1] * 2

    def expected_scale(self, packed: tuple[int, ...]) -> tuple[int, ...] | None:
        rows, cols = self.decoded_shape(packed)
        return (rows, cols // self.group) if cols % self.group == 0 else None

    def group_values(self, scale: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        """Each group's multiplier, [rows, groups] float32, as the format's own library computes it."""
        raise NotImplementedError

    def dequantize(
        self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, second: torch.Tensor | None = None
    ) -> torch.Tensor:
        codes = unpack_codes(q)
        rows, cols = codes.shape
        grouped = codes.view(rows, cols // self.group, self.group) * self.group_values(scale, second).unsqueeze(-1)
        return grouped.view(rows, cols).to(dtype)

    def decode_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return self.group_values(scale, None)

    def rule_problem(self, weight: TensorMeta, scale: TensorMeta) -> str | None:
        if weight.dtype not in self.packed_dtypes:
            return f"tensor {weight.name} in {weight.shard} is {weight.dtype}; {self.describe()} packs codes in U8"
        if scale.dtype not in self.scale_dtypes:
            want = " or ".join(self.scale_dtypes)
            return f"tensor {scale.name} in {scale.shard} is {scale.dtype}; {self.describe()} scales are {want}"
        return None

    def granularity(self) -> str:
        return f"one per {self.group} inputs of a row"


__all__ = ["E2M1_VALUES", "Fp4Input", "e4m3_problem", "e8m0_problem", "e8m0_values", "mxfp4_outlook", "unpack_codes"]
