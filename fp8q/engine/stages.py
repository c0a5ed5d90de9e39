"""The three threads of a run: the reader, the quantization loop (on the
caller's thread) and the writer, with the copy and per-shard hash/flush threads the writer starts.

Imports: torch, dtypes, errors, events, layouts, plan (types), engine (devices, buffers, writing, stalls),
source. `run_plan` runs a plan into `OUT.partial/`; the engine (run.py) decides what to run and finishes the output
around it; the writer's threads are writing.py's.

    reader thread    shard by shard, tensor by tensor: read a tensor into a pooled (pinned) buffer,
                     and an FP8 weight's scale from whichever shard holds it
    caller's thread  dequantize it (CPU), quantize it (CPU chunks on worker threads, or CUDA streams)
    writer thread    pwrite weight + scale at planned offsets; once a shard is written, delete
                     its source if it was streamed
    copy thread      shard after shard, up to COPY_AHEAD shards ahead of the writer: copy the tensors kept
                     whole, file to file
    shard threads    flush each finished shard, hash it, record it for --resume

The buffers between them, and what bounds the memory a run holds, are buffers.py's.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fp8q.dtypes import NAME_OF, TORCH_DTYPE
from fp8q.engine.buffers import (
    BufferPool,
    Item,
    Pools,
    get,
    non_finite,
    pool_sizes,
    put,
    typed_view,
)
from fp8q.engine.devices import Quantizer, dequantize_into, make_quantizer
from fp8q.engine.stalls import Stalls
from fp8q.engine.writing import Outlet, write_shards
from fp8q.errors import CheckpointError, Stopped, read_error
from fp8q.events import EventCallback
from fp8q.layouts import default
from fp8q.layouts.detect import QuantizedWeight, value_problem
from fp8q.layouts.kernels import FP8, FP8_MAX, NonFiniteWeight
from fp8q.plan.planner import Action, Job, Plan
from fp8q.source.base import ShardFiles
from fp8q.source.reader import READ_AHEAD, ReadAhead, ShardReader, open_shard, read_tensor


def run_plan(
    plan: Plan,
    partial: Path,
    device: torch.device,
    workers: int,
    emit: EventCallback,
    stop: threading.Event,
    outlet: Outlet,
    skip: set[str],
    files: ShardFiles,
    serve_check: bool = True,
    stalls: Stalls | None = None,
) -> None:
    """Convert the plan's shards (but those in `skip`, finished by an earlier run) into `partial`, recording
    each once it is on disk. Raises the first failure of any thread, or Stopped once `stop` is set. `serve_check`:
    refuse a weight whose FP8 form its client would compute as inf (else it is recorded in its statistics);
    `stalls`: where the quantization loop records the moments it waited (for input, a buffer, the writer).
    """
    # dequantize quantizes nothing: any layout will do for its quantizer, which only dequantizes.
    quantizer = make_quantizer(plan.layout or default(), device, workers)
    sizes = pool_sizes(plan, quantizer.in_flight)
    pools = Pools(*(BufferPool(capacity, count, quantizer.pin_memory) for capacity, count in sizes))
    to_quantize: queue.Queue[Item | None] = queue.Queue(maxsize=1)
    to_write: queue.Queue[Item | None] = queue.Queue(maxsize=1)
    failures: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Stopped:
                pass
            except BaseException as e:  # handed to the main thread, which raises it
                failures.append(e)
                stop.set()

        return run

    reader = threading.Thread(
        target=guarded(lambda: _read(plan, to_quantize, stop, pools.inputs, skip, files)), name="fp8q-reader"
    )
    writer = threading.Thread(
        target=guarded(
            lambda: write_shards(plan, partial, to_write, stop, emit, pools, outlet, files, skip, serve_check)
        ),
        name="fp8q-writer",
    )
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one torch thread per worker: our own threads use the cores
    reader.start()
    writer.start()
    try:
        _quantize_loop(quantizer, pools, to_quantize, to_write, stop, plan.dtype, stalls or Stalls())
    except Stopped:
        pass
    except BaseException as e:
        failures.append(e)
        stop.set()
    finally:
        reader.join()
        writer.join()
        quantizer.close()
        torch.set_num_threads(threads_before)
    if failures:
        raise failures[0]
    if stop.is_set():
        raise Stopped


def _quantize_loop(
    quantizer: Quantizer,
    pools: Pools,
    inbox: queue.Queue[Item | None],
    outbox: queue.Queue[Item | None],
    stop: threading.Event,
    dtype: str | None,
    stalls: Stalls,
) -> None:
    pending: deque[Item] = deque()
    waiting = stalls.waiting
    in_flight = 0

    def finish_head() -> None:
        nonlocal in_flight
        item = pending.popleft()
        job = item.job
        if job is not None and job.action.quantizes:
            in_flight -= 1
            results = []
            for piece in job.pieces:
                with waiting():
                    out = pools.outputs.take(stop)
                item.out_buffers.append(out)
                try:
                    q = typed_view(out, FP8, piece.out.shape)
                    # A conversion's weights are compared value by value with their source: exact or not.
                    results.append(quantizer.start(item.data, q, piece.part, whole=job.action is Action.REQUANTIZE))
                except NonFiniteWeight:
                    raise non_finite(job) from None
            item.data = results
            if item.buffer is not None and all(r.ready for r in results):
                (item.pool or pools.inputs).give(item.buffer)  # done with the input (a GPU's once written)
                item.buffer = None
        elif job is not None and job.action is Action.KEEP and not job.is_copy:
            # The biases of split experts: small, cut on the spot.
            item.data = [p.part.take(item.data) if p.part else item.data for p in job.pieces]
        with waiting():
            put(outbox, item, stop)

    def next_item() -> Any:  # an Item, or None at the end
        with waiting():
            return get(inbox, stop)

    while (item := next_item()) is not None:
        job = item.job
        if job is not None and job.action.dequantizes:
            assert dtype is not None
            with waiting():
                into = pools.dequantized.take(stop)
            try:
                decoded = typed_view(into, TORCH_DTYPE[dtype], job.decoded_shape)
                item.data = _dequantized(job, item.data, item.scale, item.second, decoded, quantizer)
            finally:
                pools.inputs.give(item.buffer)  # the quantized bytes are done with
            item.buffer, item.pool, item.scale, item.second = into, pools.dequantized, None, None
            if job.action is Action.DEQUANTIZE:
                item.data = [item.data]  # written as it is
        if job is not None and job.action.quantizes:
            item.data = quantizer.submit(item.data)
            in_flight += 1
        pending.append(item)
        while pending and (
            in_flight > quantizer.lookahead or pending[0].job is None or not pending[0].job.action.quantizes
        ):
            finish_head()
    while pending:
        finish_head()
    put(outbox, None, stop)


def _dequantized(
    job: Job, q: torch.Tensor, scale: torch.Tensor, second: torch.Tensor | None, out: torch.Tensor, quantizer: Quantizer
) -> torch.Tensor:
    """An FP8 source weight in `out` (of the dtype asked for), as its format's client computes it (see
    numerics.dequantize).

    Raises:
        CheckpointError: a scale no client can use, NaN codes, or values `dtype` cannot hold; naming the tensor.
    """
    assert job.scale is not None and job.input_layout is not None
    weight = QuantizedWeight(job.input, job.scale, job.input_layout, second=job.second)
    problem = value_problem(weight, q, scale, second)
    if problem:
        # The client would spread it over a whole row, tile or tensor, silently; refuse instead.
        raise CheckpointError(f"{problem} (`fp8q verify` lists every such problem)")
    if not dequantize_into(q, scale, job.input_layout, out, quantizer.pool, second):
        # The largest value a code can dequantize to (scales decode monotonically: MX exponents too).
        ends = job.input_layout.decode_scale(torch.stack([scale.min(), scale.max()]).reshape(-1))
        largest = float(ends.double().abs().max()) * FP8_MAX
        wider = [
            str(dt).removeprefix("torch.") for dt in (torch.bfloat16, torch.float32) if torch.finfo(dt).max >= largest
        ]
        advice = f"dequantize it to a wider dtype (--dtype {' or '.join(wider)}), or " if wider else ""
        raise CheckpointError(
            f"tensor {job.input.name} in {job.input.shard} times its scale {job.scale.name} (up to "
            f"{float(scale.float().max()):.4g}) exceeds what {NAME_OF[out.dtype]} holds; {advice}quantize it again"
        )
    return out


def _read(
    plan: Plan,
    outbox: queue.Queue[Item | None],
    stop: threading.Event,
    pool: BufferPool,
    skip: set[str],
    files: ShardFiles,
) -> None:
    with ShardReader(plan.checkpoint) as scales:  # FP8 weights' scales, from whichever shard holds them
        for index, shard in enumerate(plan.shards):
            if shard.name in skip:
                continue
            path, fd = open_shard(files, shard.input, stop)  # a streamed shard: once downloaded
            scales.locate(shard.name, path)
            hints = ReadAhead(fd, READ_AHEAD)
            try:
                for job in shard.jobs:
                    hints.at(job.input.start)
                    item = Item(index, job)
                    if not job.is_copy:
                        item.buffer = pool.take(stop) if job.action is not Action.KEEP else None
                        try:
                            item.data = read_tensor(fd, job.input, item.buffer)
                        except OSError as e:
                            raise read_error(path, job.input.name, e) from None
                    if job.scale is not None:
                        item.scale = scales.read(job.scale)
                    if job.second is not None:
                        item.second = scales.read(job.second)
                    put(outbox, item, stop)
            finally:
                os.close(fd)
                scales.close_shard(shard.name)
            put(outbox, Item(index, None), stop)
    put(outbox, None, stop)


__all__ = ["READ_AHEAD", "run_plan"]
