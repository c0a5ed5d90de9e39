"""vLLM's fp8 per-tensor layout (AutoFP8): one `weight_scale`, a float32 scalar; activations dynamic.

Imports: torch, layouts (base, clients, fp8, granularity, kernels, vocabulary).

Numerics (vLLM's `scaled_fp8_quant`, what vLLM computes online at start-up): float32 amax, scale = amax / 448,
q = x * (1 / scale), stored float32: an offline checkpoint serves exactly the weights vLLM would make itself.
"""

from __future__ import annotations

from typing import Any

import torch

from fp8q.layouts.base import Band, Layout, register
from fp8q.layouts.clients import Cell, Evidence, Outcome
from fp8q.layouts.fp8 import Fp8Layout
from fp8q.layouts.granularity import PerTensor
from fp8q.layouts.kernels import over_fp8_max
from fp8q.layouts.vocabulary import Scheme


@register()
class Fp8Tensor(PerTensor, Fp8Layout):
    key = "fp8-tensor"
    scheme = Scheme.TENSOR
    detect_order = 10
    transformers = {
        False: Cell(Outcome.GARBAGE, Evidence.TEST, "ignores its per-tensor weight_scale"),
        True: Cell(Outcome.REFUSES, Evidence.TEST, "its MoE forward pass meets the float8 expert weights as they are"),
    }
    vllm = {False: Cell(Outcome.RUNS, Evidence.SOURCE), True: Cell(Outcome.RUNS, Evidence.SOURCE)}

    def granularity(self) -> str:
        return "one per weight"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return ()  # AutoFP8 writes a 0-d scale

    def config_keys(self) -> dict[str, Any]:
        return {"weight_block_size": None}  # transformers defaults a missing one to [128, 128]; null is per-tensor

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> Layout | None:
        qc = quantization_config
        return cls() if "weight_block_size" in qc and qc["weight_block_size"] is None else None

    def tensor_scale(self, amax: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if amax is None:
            return None
        scale = over_fp8_max(amax.float())
        # vLLM has no guard here (an all-zero weight would give NaN); any positive scale gives q = 0.
        return torch.where(scale == 0, torch.ones_like(scale), scale)

    def _quantize_band(self, band: Band) -> None:
        assert band.tensor_scale is not None
        band.codes.copy_(band.rows.float() * torch.reciprocal(band.tensor_scale))
        if band.r0 == 0:
            band.scales.copy_(band.tensor_scale.reshape(band.scales.shape))
