"""DeepSeek-V4 as released, in its own tensor names (`layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`):
its linears and shared experts F8_E4M3 with an F8_E8M0 `.scale` per 128x128 tile, its routed experts FP4 pairs in I8
[out, in/2] with an F8_E8M0 `.scale` per 32 inputs; `quant_method: fp8` with `scale_fmt: ue8m0`, and a top-level
`expert_dtype` (`fp4`; vLLM reads a missing one as fp4 too). Read only.

Imports: torch, layouts (base, fp4, fp8, inputs), source.checkpoint (types). Decoding, as vLLM's deepseek_v4 loader and
DeepSeek's own inference code compute it (FORMATS.md section 8): an FP8 weight times 2^(byte - 127) of its tile, an
FP4 code times 2^(byte - 127) of its group, both exact in float32 (and in bfloat16 short of under- and overflow). Its
bf16 form keeps the release's names, which transformers' DeepseekV4ForCausalLM loads through its conversion mapping
(per-expert w1/w3 merged into gate_up_proj, w2 into down_proj). An FP8 output says `expert_dtype: fp8`: vLLM takes
the experts for FP4 without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import torch

from fp8q.layouts.base import Layout
from fp8q.layouts.fp4 import Fp4Input, e8m0_problem, e8m0_values, mxfp4_outlook
from fp8q.layouts.fp8 import Fp8Layout
from fp8q.layouts.inputs import InputLayout, register_input

if TYPE_CHECKING:
    from fp8q.source.checkpoint import TensorMeta

TILE = 128


def _claims(quantization_config: dict[str, Any]) -> bool:
    qc = quantization_config
    return qc.get("quant_method") == "fp8" and qc.get("scale_fmt") == "ue8m0"


def _has_e8m0_scale(meta: TensorMeta, tensors: Mapping[str, TensorMeta]) -> bool:
    scale = tensors.get(f"{meta.module}.scale")
    return meta.name.endswith(".weight") and len(meta.shape) == 2 and scale is not None and scale.dtype == "F8_E8M0"


class DeepseekV4Tensors(InputLayout):
    """What both of its layouts share: a `.scale` beside the weight, in E8M0, and the config keys beside it."""

    scale_dtypes = ("F8_E8M0",)

    def scale_name(self, name: str) -> str:
        return name.rpartition(".")[0] + ".scale"

    def output_config(self, config: dict[str, Any], converted: bool) -> dict[str, Any]:
        without = {k: v for k, v in config.items() if k != "expert_dtype"}
        return {**without, "expert_dtype": "fp8"} if converted else without

    def scale_problem(self, scale: torch.Tensor) -> str | None:
        return e8m0_problem(scale)

    def decode_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return e8m0_values(scale)


@register_input
class DeepseekV4Fp8(DeepseekV4Tensors, Fp8Layout):
    key = "deepseek-v4-fp8"
    words = "deepseek-v4 fp8 block 128x128 e8m0"
    packed_dtypes = ("F8_E4M3",)

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> DeepseekV4Fp8 | None:
        return cls() if _claims(quantization_config) else None

    def is_packed(self, meta: TensorMeta, tensors: Mapping[str, TensorMeta]) -> bool:
        return meta.dtype in self.packed_dtypes and _has_e8m0_scale(meta, tensors)

    def expected_scale(self, packed: tuple[int, ...]) -> tuple[int, ...] | None:
        rows, cols = packed
        return math.ceil(rows / TILE), math.ceil(cols / TILE)

    @property
    def row_step(self) -> int:
        return TILE

    def scale_rows(self, r0: int, r1: int) -> slice | EllipsisType:
        return slice(r0 // TILE, math.ceil(r1 / TILE))

    def dequantize(
        self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, second: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows, cols = q.shape
        tiles = e8m0_values(scale).repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:rows, :cols]
        return (q.float() * tiles).to(dtype)

    def granularity(self) -> str:
        return f"one per {TILE}x{TILE} tile, a power of two in one byte (E8M0)"

    def outlook(self, target: Layout) -> str:
        if target.block == (TILE, TILE) and target.scale_format.value == "ue8m0":
            return "exact: the layout it is in (its power-of-two tile scales found again), each weight checked"
        return super().outlook(target)


@register_input
class DeepseekV4Fp4(DeepseekV4Tensors, Fp4Input, Fp8Layout):
    key = "deepseek-v4-fp4"
    words = "deepseek-v4 fp4 experts e8m0"
    group = 32
    packed_dtypes = ("I8",)

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> DeepseekV4Fp4 | None:
        return cls() if _claims(quantization_config) else None

    def is_packed(self, meta: TensorMeta, tensors: Mapping[str, TensorMeta]) -> bool:
        return meta.dtype in self.packed_dtypes and ".experts." in meta.name and _has_e8m0_scale(meta, tensors)

    def group_values(self, scale: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        return e8m0_values(scale)

    def outlook(self, target: Layout) -> str:
        return mxfp4_outlook(target)
