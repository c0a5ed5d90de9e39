"""Will a block-quantized checkpoint load in vLLM at tensor-parallel size N? Checked from the plan.

Imports: plan types, formats. vLLM shards column-parallel layers (q/k/v, gate/up, ...) along the
output dim, row-parallel layers (o_proj, down_proj, ...) along the input dim, and MoE experts along
their intermediate dim; with block scales every shard must hold whole tiles
(`validate_fp8_block_shape` in vllm/model_executor/layers/quantization/utils/fp8_utils.py, and the
MoE `intermediate_size_per_partition` checks). That holds even at size 1 for the parts of a merged
layer (q/k/v into qkv_proj, gate/up into gate_up_proj: "is_merged_gemm") and for MoE experts. MLA's
low-rank `*_a_proj` layers are replicated, so they are not split.
"""

from __future__ import annotations

import re

from fp8q.layouts.formats import Layout, Scheme
from fp8q.plan.planner import Action, Job

_ROW_PARALLEL = re.compile(r"(^|\.)(o_proj|down_proj|w2|out_proj|dense_4h_to_h|wo|fc2|c_proj)$")
_REPLICATED = re.compile(r"(^|\.)(q_a_proj|kv_a_proj_with_mqa|[a-z_]*_a_proj)$")
# Parts vLLM merges into one layer (qkv_proj, gate_up_proj): checked even without tensor parallelism.
_MERGED = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)$")
_EXPERT = re.compile(r"\.experts\.\d+\.")


def tensor_parallel_problems(jobs: list[Job], layout: Layout, tp: int) -> list[str]:
    """One line per block-quantized layer that vLLM could not load at this TP size."""
    if layout.scheme is not Scheme.BLOCK or tp < 1:
        return []
    bn, bk = layout.block
    fix = "use --scheme channel" + (", a smaller --tp" if tp > 1 else "")
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
                    f"{module}: {problem} at --tp {tp}; vLLM cannot load it block-quantized: {fix}, "
                    f"or --ignore '^{re.escape(module)}$' (--no-load-check writes it anyway)"
                )
    return problems


def _problem(module: str, rows: int, cols: int, tp: int, bn: int, bk: int) -> str | None:
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
