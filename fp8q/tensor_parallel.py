"""Will a block-quantized checkpoint load in vLLM at tensor-parallel size N? Checked from the plan.

Imports: plan types, formats. vLLM shards column-parallel layers (q/k/v, gate/up, ...) along the
output dim, row-parallel layers (o_proj, down_proj, ...) along the input dim, and MoE experts along
their intermediate dim; with block scales every shard must hold whole 128x128 tiles
(`validate_fp8_block_shape`, and the MoE `intermediate_size_per_partition` checks). MLA's low-rank
`*_a_proj` layers are replicated, so they are not split.
"""

from __future__ import annotations

import re

from fp8q.formats import Layout, Scheme
from fp8q.plan import Action, Job

_ROW_PARALLEL = re.compile(r"(^|\.)(o_proj|down_proj|w2|out_proj|dense_4h_to_h|wo|fc2|c_proj)$")
_REPLICATED = re.compile(r"(^|\.)(q_a_proj|kv_a_proj_with_mqa|[a-z_]*_a_proj)$")
_EXPERT = re.compile(r"\.experts\.\d+\.")


def tensor_parallel_problems(jobs: list[Job], layout: Layout, tp: int) -> list[str]:
    """One line per block-quantized layer that vLLM could not shard at this TP size."""
    if layout.scheme is not Scheme.BLOCK or tp < 1:
        return []
    bn, bk = layout.block
    problems = []
    for job in jobs:
        if job.action is not Action.QUANTIZE:
            continue
        for piece in job.pieces:
            module = piece.out.name.removesuffix(".weight")
            rows, cols = piece.out.shape
            problem = _problem(module, rows, cols, tp, bn, bk)
            if problem:
                problems.append(
                    f"{module}: {problem} at --tp {tp}; vLLM cannot load it block-quantized: use --scheme "
                    f"channel, a smaller --tp, or --ignore '^{re.escape(module)}$'"
                )
    return problems


def _problem(module: str, rows: int, cols: int, tp: int, bn: int, bk: int) -> str | None:
    if _REPLICATED.search(module):
        return None
    if _EXPERT.search(module):
        # Experts split their intermediate dim: gate/up rows, down columns, in whole tiles both ways.
        inter = cols if _ROW_PARALLEL.search(module) else rows
        if inter % tp or (inter // tp) % bn or (inter // tp) % bk:
            return f"expert intermediate size {inter} / {tp} is not a multiple of {max(bn, bk)}"
        return None
    if _ROW_PARALLEL.search(module):
        if tp > 1 and (cols % tp or (cols // tp) % bk):
            return f"input size {cols} / {tp} is not a multiple of {bk}"
        return None
    if rows % tp or (rows // tp) % bn:
        return f"output size {rows} / {tp} is not a multiple of {bn}"
    return None
