"""Where a run starts: SRC's conversion planned (SRC opened as a Source: source.opening), reading no tensor data; the
plan as data; the one line that refuses a plan with problems.

Imports: cores, dtypes, errors, layouts (base, detect), plan (checks, fp8_source, planner), source (base, checkpoint,
files, opening), engine (options; buffers, for the memory estimate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from fp8q.cores import usable_cores
from fp8q.dtypes import FP8_NAMES
from fp8q.engine.options import Mode, Options
from fp8q.errors import CheckpointError
from fp8q.layouts.base import Layout
from fp8q.layouts.detect import quantization_config
from fp8q.plan.checks import plan_notes, plan_problems
from fp8q.plan.fp8_source import check_convertible, detect_fp8, output_dtype
from fp8q.plan.planner import Plan, as_data, make_plan
from fp8q.source.base import Source
from fp8q.source.checkpoint import Checkpoint, Shard
from fp8q.source.files import read_config
from fp8q.source.opening import open_source


def plan_conversion(src: str | Path | Source, options: Options, mode: Mode | None = Mode.QUANTIZE) -> Plan:
    """Read and validate SRC and plan the conversion, reading no tensor data (of a Hub repo not in the local
    cache, only the side files and the shards' headers are fetched). `plan.problems` lists why the output could
    not be served (a run refuses them), `plan.notes` what else to know. `mode` None (`inspect`): decided by SRC,
    the conversion of a quantized one into the layout asked for (unless it is in that layout already: then
    quantize's refusal, which says what to do with it), else its quantization."""
    source = open_source(src, options.revision)
    checkpoint = source.read()
    if options.config is not None:
        checkpoint = replace(checkpoint, config=read_config(Path(options.config)))
    if mode is None:
        mode = Mode.CONVERT if _convertible(checkpoint, options.layout) else Mode.QUANTIZE
    if mode is Mode.QUANTIZE:
        plan = make_plan(checkpoint, options.layout, options.ignore, options.targets)
    else:
        fp8 = detect_fp8(checkpoint)
        dtype = output_dtype(options.dtype, checkpoint.config)
        layout = options.layout if mode is Mode.CONVERT else None
        if mode is Mode.CONVERT:
            check_convertible(checkpoint, fp8, options.layout)
        plan = make_plan(checkpoint, layout, options.ignore, options.targets, detected=fp8, dtype=dtype)
    if source.remote:
        _check_streamable(plan, source.remote)
    problems = plan_problems(plan, options.tp, options.load_check)
    notes = tuple(plan_notes(plan, options.load_check, options.tp))
    return replace(plan, problems=tuple(problems), notes=notes, source=source.label)


def _convertible(checkpoint: Checkpoint, layout: Layout) -> bool:
    """Whether a checkpoint holds weights fp8q reads as quantized, not all of them already in `layout`."""
    if not quantization_config(checkpoint.config) and not any(
        m.dtype in FP8_NAMES for m in checkpoint.tensors.values()
    ):
        return False
    try:
        detected = detect_fp8(checkpoint)
    except CheckpointError:
        return False  # quantize's refusal says what the input is and what to do
    return not all(qw.layout == layout for qw in detected.weights)


def _check_streamable(plan: Plan, remote: Mapping[str, Shard]) -> None:
    """A streamed run reads one shard at a time: an FP8 weight whose scale lives in another shard cannot be."""
    for job in plan.jobs:
        if job.scale is not None and job.scale.shard != job.input.shard and job.scale.shard in remote:
            raise CheckpointError(
                f"tensor {job.input.name} in {job.input.shard} has its scale {job.scale.name} in "
                f"{job.scale.shard}, and a Hub repo is streamed one shard at a time: download it first "
                "(`hf download REPO`), then convert it"
            )


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan as data (what `inspect --json` prints), with the memory a run of it would take at most."""
    from fp8q.engine.buffers import memory_estimate

    data = as_data(plan)
    data["estimated_peak_host_bytes"], data["estimated_peak_gpu_bytes"] = memory_estimate(plan, usable_cores())
    return data


def refusal(problems: tuple[str, ...]) -> str:
    """The one line that refuses a plan with problems."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems, first: {problems[0]} (`fp8q inspect` with the same options lists them all)"


__all__ = ["plan_conversion", "plan_summary", "refusal"]
