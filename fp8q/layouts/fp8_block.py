"""vLLM's fp8 block layout (DeepSeek-V3): one `weight_scale_inv` per tile, float32 `[ceil(out/bh), ceil(in/bw)]`,
`weight_block_size: [bh, bw]`; activations dynamic. With `--scale-format ue8m0` the scales are powers of two
(DeepSeek-V3.1, DeepGEMM on Blackwell), said by `scale_fmt: ue8m0`.

Imports: torch, layouts (base, clients, fp8, granularity, kernels, numerics, vocabulary).

Numerics (vLLM's copy of DeepGEMM's `per_block_cast_to_fp8`): float32 amax per zero-padded tile, clamped at
1e-4, sf = amax / 448, q = x * (1 / sf), stored float32; with ue8m0 (`use_ue8m0=True`) sf is first rounded up
to a power of two, 2^ceil(log2(sf)) with vLLM's float32 log2. Older DeepGEMM copies compute q = x * (448 / amax),
which can differ in the last bit; fp8q follows vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fp8q.layouts.base import Band, Layout, register
from fp8q.layouts.clients import Cell, Evidence, Outcome
from fp8q.layouts.fp8 import Fp8Layout, pair_of_ints
from fp8q.layouts.granularity import DEFAULT_BLOCK, Tiled
from fp8q.layouts.kernels import abs_max, check_finite, over_fp8_max, pow2, tiles
from fp8q.layouts.numerics import float_scale_problem
from fp8q.layouts.vocabulary import ScaleFormat, Scheme

# DeepGEMM's amax floor for block scales.
DEEPGEMM_AMAX_FLOOR = 1e-4
_WHOLE_DIMS = "dims that are multiples of the block only"
_WHOLE_TILES = "whole tiles only (--tp)"


def ceil_pow2_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """vLLM's `_ceil_to_ue8m0`: 2^ceil(log2(scale)) with log2 in float32. float32's log2 is taken as the
    correctly rounded one, from a float64 log2 (exact to far below float32's rounding), so that every device
    gives the same bits; at most a couple of float32 ulps above a power of two it rounds down to it, as
    vLLM's does."""
    exponent = torch.ceil(torch.log2(scale.double()).float()).to(torch.int32)
    return pow2(exponent)


@register(ScaleFormat.FLOAT, ScaleFormat.UE8M0)
@dataclass(frozen=True)
class Fp8Block(Tiled, Fp8Layout):
    key = "fp8-block"
    scheme = Scheme.BLOCK
    # DeepSeek-V3 named the block scale `weight_scale_inv` although it multiplies, like every other.
    scale_suffix = "weight_scale_inv"
    detect_order = 30
    transformers = {
        False: Cell(Outcome.RUNS, Evidence.TEST, _WHOLE_DIMS),
        True: Cell(Outcome.RUNS, Evidence.TEST, _WHOLE_DIMS),
    }
    vllm = {
        False: Cell(Outcome.RUNS, Evidence.ENGINES, _WHOLE_TILES),
        True: Cell(Outcome.RUNS, Evidence.ENGINES, _WHOLE_TILES),
    }

    scale_format: ScaleFormat = ScaleFormat.FLOAT

    @classmethod
    def make(cls, block: tuple[int, int], scale_format: ScaleFormat) -> Layout:
        return cls(block=block, scale_format=scale_format)

    def config_keys(self) -> dict[str, Any]:
        keys: dict[str, Any] = {"fmt": "e4m3"}
        if self.scale_format is ScaleFormat.UE8M0:
            keys["scale_fmt"] = "ue8m0"  # as DeepSeek-V3.1's config says it
        return {**keys, "weight_block_size": list(self.block)}

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> Layout | None:
        block = quantization_config.get("weight_block_size")
        if block is None or not pair_of_ints(block):
            return None
        # DeepSeek-V3.1's power-of-two scales: `scale_fmt: ue8m0` (transformers' FineGrainedFP8Config too).
        ue8m0 = quantization_config.get("scale_fmt") == "ue8m0"
        return cls(block=tuple(block), scale_format=ScaleFormat.UE8M0 if ue8m0 else ScaleFormat.FLOAT)

    @classmethod
    def shape_candidates(cls, expected: Layout | None) -> list[Layout]:
        blocks = [expected.block] if isinstance(expected, Fp8Block) else []
        return [cls(block=b) for b in [*blocks, DEFAULT_BLOCK]]

    def rule_problem(self, weight: Any, scale: Any) -> str | None:
        if scale.name.rpartition(".")[2] != "weight_scale_inv":
            return (
                f"tensor {scale.name} in {scale.shard}: fp8 block scales are named {weight.module}.weight_scale_inv "
                "(vLLM, transformers)"
            )
        return super().rule_problem(weight, scale)

    def scale_problem(self, scale: torch.Tensor) -> str | None:
        if self.scale_format is not ScaleFormat.UE8M0 or not scale.dtype.is_floating_point:
            return super().scale_problem(scale)
        values = scale.float()
        mantissa, _ = torch.frexp(values)
        not_pow2 = torch.isfinite(values) & (values > 0) & (mantissa != 0.5)
        return float_scale_problem(scale, [(not_pow2, "not-a-power-of-two (ue8m0)")])

    def scales_text(self) -> str:
        powers = ", powers of two (UE8M0)" if self.scale_format is ScaleFormat.UE8M0 else ""
        return f"{super().scales_text()}{powers}"

    def _quantize_band(self, band: Band) -> None:
        rows, cols = band.rows.shape
        cut, (bh, bw) = tiles(band.rows, self.block)
        amax = abs_max(cut, dim=(1, 3)).float()  # exact: the max of the float32 values is the same number
        check_finite(amax)
        scale = over_fp8_max(amax.clamp(min=DEEPGEMM_AMAX_FLOOR))
        if self.scale_format is ScaleFormat.UE8M0:
            scale = ceil_pow2_ue8m0(scale)
        quantized = cut.float() * torch.reciprocal(scale)
        nbr, nbc = cut.shape[0], cut.shape[2]
        band.codes.copy_(quantized.view(nbr * bh, nbc * bw)[:rows, :cols])
        band.scales.copy_(scale.view(nbr, nbc))
