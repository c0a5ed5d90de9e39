"""Scale granularities several layouts share. Per tensor (compressed-tensors and fp8): one scale, from the amax of
every row. Per tile (compressed-tensors block, fp8 block): one scale per tile of rows x cols; how rows map to
scale rows, how a scale spreads over its tile; and what decides whether vLLM loads them: whole tiles in every
part of a merged layer, every MoE expert and every tensor-parallel shard.

Imports: torch, layouts (base, kernels). vLLM shards column-parallel layers (q/k/v, gate/up, ...) along the output dim,
row-parallel layers (o_proj, down_proj, ...) along the input dim, and MoE experts along their intermediate dim;
with block scales every shard must hold whole tiles (`validate_fp8_block_shape` in
vllm/model_executor/layers/quantization/utils/fp8_utils.py, and the MoE `intermediate_size_per_partition`
checks). That holds even at size 1 for the parts of a merged layer (q/k/v into qkv_proj, gate/up into
gate_up_proj: "is_merged_gemm") and for MoE experts. MLA's low-rank `*_a_proj` layers are replicated, so they
are not split.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import EllipsisType

import torch

from fp8q.layouts.base import Band, Layout
from fp8q.layouts.kernels import abs_max, check_finite, tile

_ROW_PARALLEL = re.compile(r"(^|\.)(o_proj|down_proj|w2|out_proj|dense_4h_to_h|wo|fc2|c_proj)$")
_REPLICATED = re.compile(r"(^|\.)(q_a_proj|kv_a_proj_with_mqa|[a-z_]*_a_proj)$")
# Parts vLLM merges into one layer (qkv_proj, gate_up_proj): checked even without tensor parallelism.
_MERGED = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)$")
_EXPERT = re.compile(r"\.experts\.\d+\.")
# The default block side; tiny models whose weights are all smaller still get it, as every reference tool does.
DEFAULT_BLOCK = (128, 128)


class PerTensor(Layout):
    """What the per-tensor layouts share: one scale, from the amax of every row (ranges combine with max)."""

    def tensor_amax(self, w: torch.Tensor, r0: int, r1: int) -> torch.Tensor | None:
        x = w[r0:r1]
        if x.numel() == 0:
            return torch.zeros((), dtype=w.dtype, device=w.device)
        amax = abs_max(x)
        check_finite(amax)
        return amax

    def scale_rows(self, r0: int, r1: int) -> slice | EllipsisType:
        return ...

    def broadcast(self, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return scale.reshape(())

    def fits_scale(self, shape: tuple[int, ...], rows: int, cols: int) -> bool:
        return shape in ((), (1,))  # vLLM and compressed-tensors load either

    def _empty_rows(self, band: Band) -> None:
        if band.tensor_scale is not None:
            band.scales.copy_(band.tensor_scale.reshape(band.scales.shape))


@dataclass(frozen=True)
class Tiled(Layout):
    """A layout with one scale per `block` tile (rows x cols), edge tiles cut short."""

    block: tuple[int, int] = DEFAULT_BLOCK

    @property
    def row_step(self) -> int:
        return self.block[0]

    @property
    def sample_step(self) -> int:
        return self.block[0]

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1])

    def scale_rows(self, r0: int, r1: int) -> slice | EllipsisType:
        return slice(r0 // self.block[0], math.ceil(r1 / self.block[0]))

    def broadcast(self, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        rows, cols = shape
        bh, bw = tile(self.block, rows, cols)
        return scale.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]

    def padded(self, rows: int, cols: int) -> tuple[int, int]:
        bh, bw = tile(self.block, rows, cols)
        return math.ceil(rows / bh) * bh, math.ceil(cols / bw) * bw

    def granularity(self) -> str:
        return f"one per {self.block[0]}x{self.block[1]} tile"

    def size_problems(self, shapes: list[tuple[int, int]]) -> list[str]:
        """A block side larger than every weight it tiles (and than the default 128): clients expand each scale to
        a whole tile when they load it (a 99999999-row block would be gigabytes per weight)."""
        if not shapes:
            return []
        problems = []
        bh, bw = self.block
        for side, largest, what in (
            (bh, max(r for r, _ in shapes), "rows"),
            (bw, max(c for _, c in shapes), "columns"),
        ):
            if side > max(largest, DEFAULT_BLOCK[0]):
                problems.append(
                    f"--block-size {bh}x{bw}: {side} {what}, more than any weight has (the largest: {largest}); "
                    f"clients expand every scale to a whole tile when they load it: use a block of at most "
                    f"{largest} {what}"
                )
        return problems

    def tp_problems(self, pieces: list[tuple[str, int, int]], tp: int) -> list[str]:
        """One line per block-quantized layer (module, rows, cols) that vLLM could not load at this TP size."""
        if tp < 1:
            return []
        bn, bk = self.block
        fix = "use --scheme channel" + (", a smaller --tp" if tp > 1 else "")
        problems = []
        for module, rows, cols in pieces:
            problem = _tp_problem(module, rows, cols, tp, bn, bk)
            if problem:
                problems.append(
                    f"{module}: {problem} at --tp {tp}; vLLM cannot load it block-quantized: {fix}, "
                    f"or --ignore '^{re.escape(module)}$' (--no-load-check writes it anyway)"
                )
        return problems

    def dims_note(self, pieces: list[tuple[str, tuple[int, int]]], vllm_refuses: bool = False) -> str | None:
        """Block weights whose dims are not whole tiles: transformers cannot run them."""
        bh, bw = self.block
        odd = [(name, shape) for name, shape in pieces if shape[0] % bh or shape[1] % bw]
        if not odd:
            return None
        name, shape = odd[0]
        return (
            f"{len(odd)} block-quantized weight(s) have dims that are not multiples of {bh}x{bw} "
            f"(first: {name} {list(shape)}): transformers cannot run them, "
            + ("and vLLM refuses some of them (each said)" if vllm_refuses else "vLLM and SGLang can")
        )


def _tp_problem(module: str, rows: int, cols: int, tp: int, bn: int, bk: int) -> str | None:
    if _REPLICATED.search(module):
        return None
    if _EXPERT.search(module):
        # Experts split their intermediate dim: gate/up rows, down columns, in whole tiles.
        inter = cols if _ROW_PARALLEL.search(module) else rows
        if inter % tp or (inter // tp) % bn or (tp > 1 and (inter // tp) % bk):
            return f"expert intermediate size {inter} / {tp} is not a multiple of {bn if tp == 1 else max(bn, bk)}"
        return None
    if _ROW_PARALLEL.search(module):
        if tp > 1 and (cols % tp or (cols // tp) % bk):
            return f"input size {cols} / {tp} is not a multiple of {bk}"
        return None
    if tp == 1:
        if _MERGED.search(module) and rows % bn:
            return f"output size {rows} of a part of a merged layer is not a multiple of {bn}"
        return None
    if rows % tp or (rows // tp) % bn:
        return f"output size {rows} / {tp} is not a multiple of {bn}"
    return None


__all__ = ["DEFAULT_BLOCK", "PerTensor", "Tiled"]
