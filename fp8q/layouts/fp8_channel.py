"""vLLM-style fp8 per-channel layout (throwaway: shows what adding a layout touches): one `weight_scale` per output
row, float32 `[out, 1]`, `weight_granularity: channel`; activations dynamic.

Imports: torch, layouts (base, clients, fp8, numerics, vocabulary).

Numerics as the fp8 per-tensor layout's, per row: float32 amax, scale = amax / 448, q = x * (1 / scale).
"""

from __future__ import annotations

from typing import Any

import torch

from fp8q.layouts.base import Layout, register
from fp8q.layouts.clients import Cell, Evidence, Outcome
from fp8q.layouts.fp8 import Fp8Layout
from fp8q.layouts.numerics import abs_max, check_finite, over_fp8_max
from fp8q.layouts.vocabulary import Scheme


@register()
class Fp8Channel(Fp8Layout):
    key = "fp8-channel"
    scheme = Scheme.CHANNEL
    detect_order = 5  # before fp8-tensor, whose config also says weight_block_size null
    transformers = {
        False: Cell(Outcome.GARBAGE, Evidence.TEST, "reads no per-channel weight_scale"),
        True: Cell(Outcome.REFUSES, Evidence.TEST, "its MoE forward pass meets the float8 expert weights as they are"),
    }
    vllm = {False: Cell(Outcome.NOT_CHECKED, Evidence.NONE), True: Cell(Outcome.NOT_CHECKED, Evidence.NONE)}

    def granularity(self) -> str:
        return "one per output row"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return (rows, 1)

    def config_keys(self) -> dict[str, Any]:
        return {"weight_block_size": None, "weight_granularity": "channel"}

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> Layout | None:
        return cls() if quantization_config.get("weight_granularity") == "channel" else None

    def broadcast(self, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return scale.reshape(-1, 1)

    def _quantize_band(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        s: torch.Tensor,
        r0: int,
        r1: int,
        tensor_scale: torch.Tensor | None,
    ) -> None:
        amax = abs_max(x, dim=1).float()
        check_finite(amax)
        scale = over_fp8_max(amax)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q.copy_(x.float() * torch.reciprocal(scale))
        s[r0:r1] = scale
