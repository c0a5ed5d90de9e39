"""compressed-tensors per-tensor: one `weight_scale` `[1]` in the weight's dtype; activations quantized per token at
run time.

Imports: torch, layouts (base, clients, compressed_tensors, granularity, vocabulary).

Numerics (compressed-tensors): the whole tensor's amax, scale = amax / 448 and q = x / scale, in the weight's
dtype; a zero scale becomes that dtype's eps.
"""

from __future__ import annotations

from typing import Any

import torch

from fp8q.layouts.base import Band, Layout, register
from fp8q.layouts.clients import Cell, Evidence, Outcome
from fp8q.layouts.compressed_tensors import CompressedTensorsLayout, ct_scale, quant_args
from fp8q.layouts.granularity import PerTensor
from fp8q.layouts.vocabulary import Scheme


@register()
class CtTensor(PerTensor, CompressedTensorsLayout):
    key = "ct-tensor"
    scheme = Scheme.TENSOR
    detect_order = 10
    transformers = {False: Cell(Outcome.RUNS, Evidence.TEST), True: Cell(Outcome.RUNS, Evidence.TEST)}
    vllm = {
        False: Cell(Outcome.RUNS, Evidence.SOURCE),
        True: Cell(
            Outcome.REFUSES,
            Evidence.ENGINES,
            "its FP8 MoE method takes per-tensor weights only with static input scales",
        ),
    }

    def granularity(self) -> str:
        return "one per weight"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return (1,)  # compressed-tensors' is a 1-element vector

    def args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return quant_args("tensor", False), quant_args("token", True)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Layout | None:
        return cls() if args.get("strategy") == "tensor" else None

    def tensor_scale(self, amax: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if amax is None else ct_scale(amax.to(dtype))

    def _quantize_band(self, band: Band) -> None:
        assert band.tensor_scale is not None
        band.codes.copy_(band.rows / band.tensor_scale)
        if band.r0 == 0:
            band.scales.copy_(band.tensor_scale.reshape(band.scales.shape))
