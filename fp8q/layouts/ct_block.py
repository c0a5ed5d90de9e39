"""compressed-tensors block (llm-compressor's FP8_BLOCK): one `weight_scale` per tile, `[ceil(out/bh),
ceil(in/bw)]` in the weight's dtype; activations quantized per group of `bw` at run time.

Imports: layouts (base, clients, compressed_tensors, fp8, granularity, kernels, vocabulary).

Numerics (llm-compressor `model_free_ptq`): per zero-padded tile amax, scale = amax / 448 and q = x / scale, in
the weight's own dtype; a zero scale becomes that dtype's eps.
"""

from __future__ import annotations

from typing import Any

from fp8q.layouts.base import Band, Layout, register
from fp8q.layouts.clients import Cell, Evidence, Outcome
from fp8q.layouts.compressed_tensors import CompressedTensorsLayout, ct_scale, quant_args
from fp8q.layouts.fp8 import pair_of_ints
from fp8q.layouts.granularity import DEFAULT_BLOCK, Tiled
from fp8q.layouts.kernels import abs_max, check_finite, tiles
from fp8q.layouts.vocabulary import ScaleFormat, Scheme

_WHOLE_DIMS = "dims that are multiples of the block only"
_DECOMPRESS = "its expert decompression does not spread tile or group scales"
_WHOLE_TILES = "whole tiles only (--tp)"


@register()
class CtBlock(Tiled, CompressedTensorsLayout):
    key = "ct-block"
    scheme = Scheme.BLOCK
    detect_order = 30
    transformers = {
        False: Cell(Outcome.RUNS, Evidence.TEST, _WHOLE_DIMS),
        True: Cell(Outcome.REFUSES, Evidence.TEST, _DECOMPRESS),
    }
    vllm = {
        False: Cell(Outcome.RUNS, Evidence.ENGINES, _WHOLE_TILES),
        True: Cell(Outcome.RUNS, Evidence.ENGINES, _WHOLE_TILES),
    }

    @classmethod
    def make(cls, block: tuple[int, int], scale_format: ScaleFormat) -> Layout:
        return cls(block=block)

    def args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        weights = quant_args("block", False, block_structure=list(self.block))
        return weights, quant_args("group", True, group_size=self.block[1])

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Layout | None:
        if args.get("strategy") == "block" and pair_of_ints(args.get("block_structure")):
            return cls(block=tuple(args["block_structure"]))
        if args.get("strategy") == "group" and isinstance(args.get("group_size"), int) and args["group_size"] > 0:
            return cls(block=(1, args["group_size"]))  # a group is a block of one row
        return None

    @classmethod
    def shape_candidates(cls, expected: Layout | None) -> list[Layout]:
        blocks = [expected.block] if isinstance(expected, CtBlock) else []
        return [cls(block=b) for b in [*blocks, DEFAULT_BLOCK]]

    def _quantize_band(self, band: Band) -> None:
        rows, cols = band.rows.shape
        cut, (bh, bw) = tiles(band.rows, self.block)
        amax = abs_max(cut, dim=(1, 3))
        check_finite(amax)
        scale = ct_scale(amax)
        quantized = cut / scale
        nbr, nbc = cut.shape[0], cut.shape[2]
        band.codes.copy_(quantized.view(nbr * bh, nbc * bw)[:rows, :cols])
        band.scales.copy_(scale.view(nbr, nbc))
