"""Turn an FP8 checkpoint of any layout `layouts` recognizes back into a bf16 (or fp16/fp32) checkpoint.

Imports: errors, dtypes, checkpoint, layouts, plan, tensor_io, writer, pipeline's events. Streams like
`quantize`: every output shard header is planned with `build_header` before any data is read, then each FP8
weight is read with its scale (from whichever shard holds it), dequantized band by band straight into its
planned place in the output file, and every other tensor is copied file to file by the kernel. Memory stays at
one FP8 weight plus one band, whatever the model size. Output shards keep the input shard names (a shard left
with nothing but scales disappears), scales and the other quantization-only tensors are dropped, and
`quantization_config` leaves config.json. As with `quantize`, work happens in `OUT.partial/`, renamed to OUT
only once complete.

The arithmetic is each client's own, so the result equals what the client computes when it loads the FP8
checkpoint with dequantization on:
- compressed-tensors (`dequantize` in quantization/lifecycle/forward.py, used by transformers'
  `CompressedTensorsConfig(dequantize=True)`): `q.to(scale.dtype) * scale`, the scale broadcast over its row,
  tile or the tensor, then cast to the target dtype. The product is taken in the scale's dtype (bf16 for
  llm-compressor output), which for fp16 scales differs from a float32 product.
- fp8 (transformers `Fp8Dequantize._dequantize_one`, DeepSeek-V3 `weight_dequant`): `q.float() * scale.float()`,
  then cast.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fp8q import __version__, numerics
from fp8q.checkpoint import CONFIG_FILE, INDEX_FILE, Checkpoint, Shard, TensorMeta, read_checkpoint
from fp8q.dtypes import ITEMSIZE, NAME_OF
from fp8q.errors import CheckpointError, OutputError, UsageError, read_error, write_error
from fp8q.layouts import DetectedLayout, QuantizedWeight, describe, detect_layout
from fp8q.manifest import MANIFEST_FILE, fingerprint, write_manifest
from fp8q.numerics import row_bands
from fp8q.pipeline import TensorDone
from fp8q.plan import SHARD_METADATA, OutTensor, ShardPlan, build_header
from fp8q.tensor_io import read_tensor, write_at
from fp8q.writer import (
    ShardFile,
    check_free_space,
    check_output,
    copy_file,
    finalize,
    lock_partial,
    output_path,
    partial_dir,
    remove_tree,
    write_json,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Started:
    """Sent once before any data is read: how many tensors and source bytes the run will go through."""

    tensors: int
    nbytes: int


Event = Started | TensorDone
EventCallback = Callable[[Event], None]


@dataclass(frozen=True)
class DequantizeReport:
    """The outcome of `dequantize`, for the CLI summary and `--json`."""

    out: str
    dtype: str
    tensors_dequantized: int
    tensors_kept: int
    tensors_dropped: int
    bytes_in: int
    bytes_out: int
    seconds: float
    # Layout in words -> number of weights, e.g. {"compressed-tensors channel": 196}.
    layouts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Step:
    """One output tensor: copied from `source`, or dequantized from `weight` when it is set."""

    source: TensorMeta
    out: OutTensor
    weight: QuantizedWeight | None = None


@dataclass(frozen=True)
class _ShardJob:
    plan: ShardPlan
    steps: tuple[_Step, ...]


def dequantize(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    on_event: EventCallback | None = None,
) -> DequantizeReport:
    """Write the FP8 checkpoint at SRC as a `dtype` checkpoint at OUT that loads with no quantization library.

    Args:
        src: an FP8 checkpoint folder (or one `.safetensors` file), in any layout `fp8q.layouts` recognizes.
        out: the folder to create; it appears only once complete.
        dtype: "bfloat16", "float16" or "float32": the dtype of the dequantized weights. Other tensors keep
            theirs, and config.json is left as it is apart from `quantization_config`.
        overwrite: replace OUT if it is an fp8q output (its fp8q.json lists every file in it).
        on_event: called with `Started` once, then `TensorDone` per output tensor.

    Raises:
        Fp8qError: no FP8 weight in SRC, an FP8 weight without a usable scale (missing, of a shape that fits
            no layout, of an integer dtype, NaN, inf, zero or negative), NaN codes in a weight, a value its
            dtype cannot hold, an OUT that cannot be written; one line naming the file or tensor.
    """
    started = time.perf_counter()
    emit = on_event or (lambda event: None)
    src, out = Path(src), output_path(Path(out))
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    checkpoint = read_checkpoint(src)
    detected = _detect(checkpoint)
    jobs = _plan(checkpoint, detected, NAME_OF[DTYPES[dtype]])
    check_output(src, out, overwrite)
    partial = partial_dir(out)
    try:
        partial.mkdir(parents=True)
    except FileExistsError:
        os.close(lock_partial(partial))  # says so when another run is writing it
        raise OutputError(f"{partial}: left by an interrupted run; delete it to start over") from None
    lock = lock_partial(partial)
    try:
        side_files = [f for f in checkpoint.side_files if f != MANIFEST_FILE]  # fp8q.json describes the FP8 run
        bytes_out = sum(job.plan.size for job in jobs)
        side_bytes = sum((checkpoint.root / f).stat().st_size for f in side_files)
        check_free_space(out, bytes_out + side_bytes + 4096 + 200 * len(jobs) + 100 * len(checkpoint.tensors))
        steps = [step for job in jobs for step in job.steps]
        emit(Started(len(steps), sum(_source_bytes(step) for step in steps)))
        with ShardReader(checkpoint) as reader:
            for job in jobs:
                _write_shard(job, partial, reader, DTYPES[dtype], emit)
        try:
            _write_metadata(checkpoint, jobs, partial, side_files, dtype)
            record = fingerprint(checkpoint, {"command": "dequantize", "dtype": dtype}, __version__)
            write_manifest(partial, record, {}, {"seconds": round(time.perf_counter() - started, 3)})
            finalize(partial, out)
        except OSError as e:
            raise write_error(partial, e) from None
    except BaseException:
        remove_tree(partial)
        raise
    finally:
        os.close(lock)
    layouts: dict[str, int] = {}
    for qw in detected.weights:
        layouts[describe(qw.layout)] = layouts.get(describe(qw.layout), 0) + 1
    n_deq = len(detected.weights)
    return DequantizeReport(
        out=str(out),
        dtype=dtype,
        tensors_dequantized=n_deq,
        tensors_kept=len(steps) - n_deq,
        tensors_dropped=len(checkpoint.tensors) - len(steps),
        bytes_in=checkpoint.total_bytes,
        bytes_out=bytes_out,
        seconds=time.perf_counter() - started,
        layouts=layouts,
    )


def _detect(checkpoint: Checkpoint) -> DetectedLayout:
    """The checkpoint's FP8 weights, each with a scale it can be dequantized with.

    A scale an engine would refuse for its name or dtype still dequantizes (rescuing such checkpoints is one
    use of this command); a weight without one usable scale cannot.
    """
    try:
        detected = detect_layout(checkpoint.config, checkpoint.tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint.root / CONFIG_FILE}: {e}") from None
    if not detected.weights:
        raise CheckpointError(f"{checkpoint.root}: no FP8 tensors, nothing to dequantize")
    for qw in detected.weights:
        if qw.layout is None:
            raise CheckpointError(f"{checkpoint.root}: {qw.problem}")
    return detected


def _plan(checkpoint: Checkpoint, detected: DetectedLayout, dtype: str) -> list[_ShardJob]:
    """Every output shard's header and tensor offsets, before any data is read."""
    weights = {qw.weight.name: qw for qw in detected.weights}
    dropped = detected.dropped
    jobs = []
    for shard in checkpoint.shards:
        steps = []
        for meta in shard.tensors:
            if meta.name in dropped:
                continue
            qw = weights.get(meta.name)
            steps.append(_Step(meta, OutTensor(meta.name, dtype if qw else meta.dtype, meta.shape), qw))
        if steps:
            jobs.append(_shard_job(shard, steps))
    return jobs


def _shard_job(shard: Shard, steps: list[_Step]) -> _ShardJob:
    header, placed = build_header([s.out for s in steps], SHARD_METADATA)
    size = len(header) + sum(t.nbytes for t in placed.values())
    plan = ShardPlan(shard, shard.name, header, size, ())
    return _ShardJob(plan, tuple(_Step(s.source, placed[s.out.name], s.weight) for s in steps))


def _source_bytes(step: _Step) -> int:
    return step.source.nbytes + (step.weight.scale.nbytes if step.weight and step.weight.scale else 0)


class ShardReader:
    """Source shards opened on demand (a scale may live in another shard than its weight), closed together."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.paths = {s.name: s.path for s in checkpoint.shards}
        self.fds: dict[str, int] = {}

    def fd(self, shard: str) -> int:
        if shard not in self.fds:
            self.fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self.fds[shard]

    def read(self, meta: TensorMeta) -> torch.Tensor:
        try:
            return read_tensor(self.fd(meta.shard), meta)
        except OSError as e:
            raise read_error(self.paths[meta.shard], meta.name, e) from None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _write_shard(job: _ShardJob, partial: Path, reader: ShardReader, dtype: torch.dtype, emit: EventCallback) -> None:
    path = partial / job.plan.name
    try:
        shard = ShardFile(path, job.plan)
        try:
            for step in job.steps:
                if step.weight is None:
                    shard.copy(reader.fd(step.source.shard), step.source.start, step.out)
                else:
                    _write_dequantized(shard, step, reader, dtype)
                emit(TensorDone(step.source.name, _source_bytes(step)))
            shard.close()
        finally:
            shard.abort()
    except OSError as e:
        raise write_error(path, e) from None


def _write_dequantized(shard: ShardFile, step: _Step, reader: ShardReader, dtype: torch.dtype) -> None:
    """Dequantize one weight band by band, each band written where its rows go in the output tensor."""
    qw = step.weight
    assert qw is not None and qw.scale is not None and qw.layout is not None
    q = reader.read(qw.weight)
    scale = reader.read(qw.scale)
    problem = value_problem(qw, q, scale)
    if problem:
        # The client would spread it over a whole row, tile or tensor, silently; refuse instead.
        raise CheckpointError(f"{problem} (`fp8q verify` lists every such problem)")
    rows, cols = q.shape
    row_bytes = cols * ITEMSIZE[step.out.dtype]
    for r0, r1, scale_rows in row_bands(rows, cols, qw.layout):
        band = numerics.dequantize(q[r0:r1], scale[scale_rows], qw.layout, dtype)
        if not bool(torch.isfinite(band).all()):
            scale_values = scale[scale_rows].float()
            raise CheckpointError(
                f"tensor {qw.weight.name} in {qw.weight.shard} times its scale {qw.scale.name} (up to "
                f"{float(scale_values.max()):.4g}) exceeds what {step.out.dtype} holds; dequantize it to a wider "
                "dtype (--dtype bfloat16 or float32), or quantize it again"
            )
        write_at(shard.fd, step.out.start + r0 * row_bytes, band)


def value_problem(qw: QuantizedWeight, q: torch.Tensor, scale: torch.Tensor) -> str | None:
    """What makes an FP8 weight's values unusable, as one line naming the tensor, or None: a scale no
    client can use (integer, NaN, inf, zero or negative), or NaN codes in the weight itself."""
    assert qw.scale is not None
    assert qw.layout is not None
    bad_scale = numerics.scale_problem(scale, qw.layout)
    if bad_scale:
        return (
            f"tensor {qw.scale.name} in {qw.scale.shard} has {bad_scale}; {qw.weight.name} cannot be dequantized, "
            "quantize it again"
        )
    nans = numerics.nan_codes(q)
    if nans:
        return (
            f"tensor {qw.weight.name} in {qw.weight.shard} holds {nans} NaN code(s) (0x7f/0xff) among its "
            f"{q.numel()} FP8 values; the checkpoint is corrupt, quantize it again"
        )
    return None


def _write_metadata(
    checkpoint: Checkpoint, jobs: list[_ShardJob], partial: Path, side_files: list[str], dtype: str
) -> None:
    if checkpoint.has_index or len(jobs) > 1:
        weight_map = {s.out.name: job.plan.name for job in jobs for s in job.steps}
        total = sum(s.out.nbytes for job in jobs for s in job.steps)
        write_json(
            partial / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        )
    if checkpoint.config is not None:
        write_json(partial / CONFIG_FILE, _plain_config(checkpoint.config, dtype))
    for name in side_files:
        copy_file(checkpoint.root / name, partial / name)


def _plain_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json without its quantization section, saying the dtype the weights now have (under the key it
    already has: `dtype` in transformers 5, `torch_dtype` before); every other key keeps its place and value."""
    plain = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    for key in ("dtype", "torch_dtype"):
        if key in plain:
            plain[key] = dtype
    return plain


__all__ = ["DTYPES", "DequantizeReport", "ShardReader", "Started", "dequantize", "value_problem"]
