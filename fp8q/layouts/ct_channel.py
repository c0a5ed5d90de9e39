"""compressed-tensors per-channel (llm-compressor's FP8_DYNAMIC): one `weight_scale` per output row, `[out, 1]` in
the weight's dtype; activations quantized per token at run time.

Imports: torch, layouts (base, clients, compressed_tensors, kernels, vocabulary).

Numerics (llm-compressor `model_free_ptq`): per row amax, scale = amax / 448 and q = x / scale, all in the
weight's own dtype; a zero scale becomes that dtype's eps.
"""

from __future__ import annotations

from typing import Any

import torch

from fp8q.layouts.base import Band, Layout, register
from fp8q.layouts.clients import Cell, Evidence, Outcome
from fp8q.layouts.compressed_tensors import CompressedTensorsLayout, ct_scale, quant_args
from fp8q.layouts.kernels import abs_max, check_finite
from fp8q.layouts.vocabulary import Scheme


@register()
class CtChannel(CompressedTensorsLayout):
    key = "ct-channel"
    scheme = Scheme.CHANNEL
    detect_order = 20
    transformers = {False: Cell(Outcome.RUNS, Evidence.TEST), True: Cell(Outcome.RUNS, Evidence.TEST)}
    vllm = {False: Cell(Outcome.RUNS, Evidence.ENGINES), True: Cell(Outcome.RUNS, Evidence.SOURCE)}

    def granularity(self) -> str:
        return "one per output row"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return (rows, 1)

    def args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return quant_args("channel", False), quant_args("token", True)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Layout | None:
        return cls() if args.get("strategy") == "channel" else None

    def broadcast(self, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return scale.reshape(-1, 1)

    def _quantize_band(self, band: Band) -> None:
        amax = abs_max(band.rows, dim=1)
        check_finite(amax)
        scale = ct_scale(amax)
        band.codes.copy_(band.rows / scale)
        band.scales.copy_(scale)
