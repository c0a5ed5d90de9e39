"""AutoRound's FP8 (`quant_method: auto-round`, `packing_format: auto_round:fp8`): F8_E4M3 weights with an F32
`weight_scale_inv` per `group_size` tile (128x128), read as vLLM reads it (its INC wrapper hands the layer to its
Fp8LinearMethod; FORMATS.md section 8, facts taken from vLLM's loader, not from an AutoRound release file). Read only:
the data is fp8 block's, so `convert` into fp8 block of the same tile copies it byte for byte.

Imports: torch, layouts (base, fp8_block, inputs), source.checkpoint (types).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fp8q.layouts.base import Layout
from fp8q.layouts.fp8_block import Fp8Block
from fp8q.layouts.inputs import InputLayout, register_input

if TYPE_CHECKING:
    from fp8q.source.checkpoint import TensorMeta


@register_input
class AutoRoundFp8(InputLayout, Fp8Block):
    key = "auto-round-fp8"
    words = "auto-round fp8 block"
    quant_method = "auto-round"
    packed_dtypes = ("F8_E4M3",)
    scale_dtypes = ("F32",)

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> AutoRoundFp8 | None:
        qc = quantization_config
        if qc.get("quant_method") != "auto-round" or qc.get("packing_format") != "auto_round:fp8":
            return None
        size = qc.get("group_size")
        block = tuple(size) if isinstance(size, list) and len(size) == 2 else (128, 128)
        return cls(block=block)

    def is_packed(self, meta: TensorMeta, tensors: Mapping[str, TensorMeta]) -> bool:
        suffix_ok = meta.name.endswith(".weight") and self.scale_name(meta.name) in tensors
        return suffix_ok and meta.dtype in self.packed_dtypes and len(meta.shape) == 2

    def scale_name(self, name: str) -> str:
        return name.rpartition(".")[0] + ".weight_scale_inv"

    def expected_scale(self, packed: tuple[int, ...]) -> tuple[int, ...] | None:
        return self.scale_shape(*packed)

    def client_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return Fp8Block.client_dtype(self, scale_dtype)

    def describe(self) -> str:
        return f"{self.words} {self.block[0]}x{self.block[1]}"

    def same_as(self, target: Layout) -> bool:
        return target == Fp8Block(block=self.block)

    def outlook(self, target: Layout) -> str:
        if self.same_as(target):
            return "exact: the layout it is in, copied byte for byte"
        return super().outlook(target)
