"""The three threads of a run and the buffers between them: the reader, the quantization loop (on the
caller's thread) and the writer, with the copy and per-shard hash/flush threads the writer starts.

Imports: torch, checkpoint, plan, quantizer, tensor_io, writer, manifest. `run_plan` runs a plan into
`OUT.partial/`; the engine (pipeline.py) decides what to run and finishes the output around it.

    reader thread    shard by shard, tensor by tensor: read a tensor into a pooled (pinned) buffer,
                     and an FP8 weight's scale from whichever shard holds it
    caller's thread  dequantize it (CPU), quantize it (CPU chunks on worker threads, or CUDA streams)
    writer thread    pwrite weight + scale at planned offsets; once a shard is written, delete
                     its source if it was streamed
    copy thread      shard after shard, up to COPY_AHEAD shards ahead of the writer: copy the tensors kept
                     whole, file to file
    shard threads    flush each finished shard, hash it, record it for --resume

Memory: the buffer pools bound what is alive whatever the model size: three input buffers the
size of the largest weight (one being read, one queued, one being quantized) and a few output
buffers for quantized weights (one byte per element) on their way to disk.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fp8q.dtypes import ITEMSIZE, NAME_OF, TORCH_DTYPE
from fp8q.engine.devices import CHUNK_BYTES, CpuQuantizer, CudaQuantizer, dequantize_into, make_quantizer
from fp8q.engine.tensor_io import (
    BufferPool,
    ShardReader,
    Stopped,
    open_for_reading,
    read_ahead,
    read_tensor,
    typed_view,
)
from fp8q.errors import CheckpointError, UnsupportedTensorError, read_error, write_error
from fp8q.events import EventCallback, TensorDone
from fp8q.layouts import default, numerics
from fp8q.layouts.base import Layout
from fp8q.layouts.detect import QuantizedWeight, value_problem
from fp8q.layouts.numerics import FP8, NonFiniteWeight
from fp8q.output.manifest import FileHasher, Progress
from fp8q.output.writer import ShardFile
from fp8q.plan.planner import Action, Job, Plan
from fp8q.source.checkpoint import Shard, changed_since_read

# The reader keeps the kernel fetching this far ahead of it, so the disk works while it waits for a
# free buffer (measured on a cold cache: 256 MiB as fast as more).
READ_AHEAD = 256 << 20


class ShardFiles(Protocol):
    """Where the source shards are to read: the reader waits on `ready` before it opens a shard, and the writer
    tells `done` once a shard is written. A streamed Hub repo's downloads (streaming.ShardDownloads), or a
    folder's files (LocalShards)."""

    def ready(self, shard: Shard, stop: threading.Event) -> Path: ...

    def done(self, name: str) -> None: ...

    def close(self) -> None: ...


class LocalShards:
    """The shard files of a checkpoint on disk: always there, never deleted."""

    def ready(self, shard: Shard, stop: threading.Event) -> Path:
        return shard.path

    def done(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Item:
    """One tensor (or a shard's end) on its way from the reader through the quantization loop to the writer."""

    shard: int
    job: Job | None  # None marks the end of a shard
    data: Any = None
    buffer: torch.Tensor | None = None  # the pool buffer behind the input `data`, handed back once used
    pool: BufferPool | None = None  # where `buffer` goes back to (None: the input pool)
    out_buffers: list[torch.Tensor] = field(default_factory=list)  # pool buffers behind quantized outputs
    scale: torch.Tensor | None = None  # an FP8 source weight's scale


def run_plan(
    plan: Plan,
    partial: Path,
    device: torch.device,
    workers: int,
    emit: EventCallback,
    stop: threading.Event,
    progress: Progress,
    skip: set[str],
    files: ShardFiles,
    serve_check: bool = True,
) -> None:
    """Convert the plan's shards (but those in `skip`, finished by an earlier run) into `partial`, recording
    each once it is on disk. Raises the first failure of any thread, or Stopped once `stop` is set. `serve_check`:
    refuse a weight whose FP8 form its client would compute as inf (else it is recorded in its statistics).
    """
    # dequantize quantizes nothing: any layout will do for its quantizer, which only dequantizes.
    quantizer = make_quantizer(plan.layout or default(), device, workers)
    sizes = _pool_sizes(plan, quantizer.in_flight)
    pools = _Pools(*(BufferPool(capacity, count, quantizer.pin_memory) for capacity, count in sizes))
    to_quantize: queue.Queue[_Item | None] = queue.Queue(maxsize=1)
    to_write: queue.Queue[_Item | None] = queue.Queue(maxsize=1)
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
        target=guarded(lambda: _write(plan, partial, to_write, stop, emit, pools, progress, files, skip, serve_check)),
        name="fp8q-writer",
    )
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one torch thread per worker: our own threads use the cores
    reader.start()
    writer.start()
    try:
        _quantize_loop(quantizer, pools, to_quantize, to_write, stop, plan.dtype)
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


def _pool_sizes(plan: Plan, in_flight: int) -> list[tuple[int, int]]:
    """(bytes a buffer, buffers) of the three pools: source weights as read, quantized weights until written, FP8
    source weights in high precision. Three buffers each way: one being filled, one queued, one being used; a
    device that works on while the host goes on (`in_flight`) holds its weights' buffers longer."""
    quantized = [j for j in plan.jobs if j.action.quantizes]
    largest_weight = max((p.out.nbytes for j in quantized for p in j.pieces), default=0)
    pieces = max((len(j.pieces) for j in quantized), default=1)
    dequantized = max(
        (math.prod(j.source.shape) * ITEMSIZE[plan.dtype] for j in plan.jobs if j.action.dequantizes and plan.dtype),
        default=0,
    )
    return [
        (plan.largest_quantized, 3 + in_flight),
        (largest_weight, (2 + in_flight) * pieces + 1),
        (dequantized, 3 + in_flight),
    ]


def memory_estimate(plan: Plan, workers: int) -> tuple[int, int]:
    """What a run of the plan holds at its peak beyond torch itself, in bytes: on the host (the CPU path with
    `workers` threads, or the CUDA path's pinned buffers, whichever is more) and on a GPU. The buffer pools, and
    the kernel's temporaries: a chunk of rows per CPU thread, a whole weight on a GPU, its tiles padded out."""
    host_pools = sum(capacity * count for capacity, count in _pool_sizes(plan, CpuQuantizer.in_flight))
    pinned = sum(capacity * count for capacity, count in _pool_sizes(plan, CudaQuantizer.in_flight))
    layout, chunk, whole = plan.layout, 0, 0
    if layout is not None:
        for job in plan.jobs:
            if not job.action.quantizes:
                continue
            itemsize = ITEMSIZE[plan.dtype if job.action.dequantizes and plan.dtype else job.source.dtype]
            for piece in job.pieces:
                rows, cols = piece.out.shape
                step = layout.row_step
                chunk_rows = max(step, CHUNK_BYTES // max(1, cols * itemsize) // step * step)
                chunk = max(chunk, numerics.kernel_bytes(layout, min(rows, chunk_rows), cols, itemsize))
                whole = max(whole, numerics.kernel_bytes(layout, rows, cols, itemsize))
    # On the device: each weight in flight, as uploaded and quantized.
    largest_in, largest_out = _pool_sizes(plan, 0)[0][0], _pool_sizes(plan, 0)[1][0]
    device_weights = CudaQuantizer.in_flight * (largest_in + largest_out)
    return max(host_pools + max(1, workers) * chunk, pinned), device_weights + whole


@dataclass(frozen=True)
class _Pools:
    inputs: BufferPool  # source weights, as read
    outputs: BufferPool  # quantized weights, until written
    dequantized: BufferPool  # FP8 source weights in high precision, until quantized or written


def _quantize_loop(
    quantizer: Any,
    pools: _Pools,
    inbox: queue.Queue[_Item | None],
    outbox: queue.Queue[_Item | None],
    stop: threading.Event,
    dtype: str | None,
) -> None:
    pending: deque[_Item] = deque()
    in_flight = 0

    def finish_head() -> None:
        nonlocal in_flight
        item = pending.popleft()
        job = item.job
        if job is not None and job.action.quantizes:
            in_flight -= 1
            results = []
            for piece in job.pieces:
                out = pools.outputs.take(stop)
                item.out_buffers.append(out)
                try:
                    results.append(quantizer.start(item.data, typed_view(out, FP8, piece.out.shape), piece.part))
                except NonFiniteWeight:
                    raise _non_finite(job) from None
            item.data = results
            if item.buffer is not None and all(r.ready for r in results):
                (item.pool or pools.inputs).give(item.buffer)  # done with the input (a GPU's once written)
                item.buffer = None
        elif job is not None and job.action is Action.KEEP and not job.is_copy:
            # The biases of split experts: small, cut on the spot.
            item.data = [p.part.take(item.data) if p.part else item.data for p in job.pieces]
        _put(outbox, item, stop)

    while (item := _get(inbox, stop)) is not None:
        job = item.job
        if job is not None and job.action.dequantizes:
            assert dtype is not None
            into = pools.dequantized.take(stop)
            try:
                item.data = _dequantized(
                    job, item.data, item.scale, typed_view(into, TORCH_DTYPE[dtype], job.source.shape), quantizer
                )
            finally:
                pools.inputs.give(item.buffer)  # the FP8 bytes are done with
            item.buffer, item.pool, item.scale = into, pools.dequantized, None
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
    _put(outbox, None, stop)


def _dequantized(job: Job, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, quantizer: Any) -> torch.Tensor:
    """An FP8 source weight in `out` (of the dtype asked for), as its format's client computes it (see
    numerics.dequantize).

    Raises:
        CheckpointError: a scale no client can use, NaN codes, or values `dtype` cannot hold; naming the tensor.
    """
    assert job.scale is not None and job.source_layout is not None
    weight = QuantizedWeight(job.source, job.scale, job.source_layout)
    problem = value_problem(weight, q, scale)
    if problem:
        # The client would spread it over a whole row, tile or tensor, silently; refuse instead.
        raise CheckpointError(f"{problem} (`fp8q verify` lists every such problem)")
    if not dequantize_into(q, scale, job.source_layout, out, getattr(quantizer, "pool", None)):
        raise CheckpointError(
            f"tensor {job.source.name} in {job.source.shard} times its scale {job.scale.name} (up to "
            f"{float(scale.float().max()):.4g}) exceeds what {NAME_OF[out.dtype]} holds; dequantize it to a "
            "wider dtype (--dtype bfloat16 or float32), or quantize it again"
        )
    return out


def _non_finite(job: Job) -> UnsupportedTensorError:
    src = job.source
    return UnsupportedTensorError(
        f"tensor {src.name} in {src.shard} holds NaN or inf values; fix the source checkpoint, "
        f"or keep it unquantized with --ignore '^{re.escape(src.module)}$'"
    )


def _overflowing(name: str, job: Job, client: torch.dtype) -> UnsupportedTensorError:
    dtype = str(client).removeprefix("torch.")
    module = name.removesuffix(".weight")
    src = job.source
    where = f"tensor {name} in {src.shard}" if name == src.name else f"tensor {name} (from {src.name} in {src.shard})"
    return UnsupportedTensorError(
        f"{where}: its FP8 form overflows to inf in the {dtype} "
        f"its client multiplies it by its scale in (values near the largest {dtype}), so no engine could serve it: "
        f"keep it in high precision with --ignore '^{re.escape(module)}$', or use --format fp8, whose clients "
        "compute in float32 (--no-load-check writes it anyway)"
    )


def _read(
    plan: Plan,
    outbox: queue.Queue[_Item | None],
    stop: threading.Event,
    pool: BufferPool,
    skip: set[str],
    files: ShardFiles,
) -> None:
    with ShardReader(plan.checkpoint) as scales:  # FP8 weights' scales, from whichever shard holds them
        for index, shard in enumerate(plan.shards):
            if shard.name in skip:
                continue
            path, fd = _open_source(files, shard.source, stop)  # a streamed shard: once downloaded
            scales.locate(shard.name, path)
            hinted = 0  # the file is hinted for read-ahead up to here
            try:
                for job in shard.jobs:
                    if job.source.start + READ_AHEAD > hinted:
                        begin = max(hinted, job.source.start)
                        hinted = job.source.start + READ_AHEAD
                        read_ahead(fd, begin, hinted - begin)
                    item = _Item(index, job)
                    if not job.is_copy:
                        item.buffer = pool.take(stop) if job.action is not Action.KEEP else None
                        try:
                            item.data = read_tensor(fd, job.source, item.buffer)
                        except OSError as e:
                            raise read_error(path, job.source.name, e) from None
                    if job.scale is not None:
                        item.scale = scales.read(job.scale)
                    _put(outbox, item, stop)
            finally:
                os.close(fd)
                scales.close_shard(shard.name)
            _put(outbox, _Item(index, None), stop)
    _put(outbox, None, stop)


@dataclass
class _OutShard:
    """An output shard being written: its file, the hash that follows its bytes, and the thread of its own
    that hashes it as its bytes land and flushes it once finished (sha256 runs on one core per stream, so
    the hashing of a finished shard's last bytes goes on beside that of the next)."""

    file: ShardFile
    hasher: FileHasher
    syncer: ThreadPoolExecutor


class _OutShards:
    """The output shards open now, each opened by whichever thread needs it first: the writer, or the copier
    running ahead of it."""

    def __init__(self, plan: Plan, partial: Path) -> None:
        self.plan = plan
        self.partial = partial
        self._open: dict[int, _OutShard] = {}
        self._lock = threading.Lock()
        self.syncers: list[ThreadPoolExecutor] = []

    def get(self, index: int) -> _OutShard:
        with self._lock:
            if index not in self._open:
                path = self.partial / self.plan.shards[index].name
                syncer = ThreadPoolExecutor(1, thread_name_prefix="fp8q-fsync")
                self.syncers.append(syncer)
                hasher = FileHasher(path)
                file = ShardFile(path, self.plan.shards[index], _hash_in_background(syncer, hasher))
                self._open[index] = _OutShard(file, hasher, syncer)
            return self._open[index]

    def pop(self, index: int) -> _OutShard:
        with self._lock:
            return self._open.pop(index)

    def close(self) -> None:
        """At the run's end: wait for the hashing threads, then close whatever is still open: only after a
        failure is anything (a shard never recorded, so never kept for --resume)."""
        for syncer in self.syncers:
            syncer.shutdown(wait=True)
        with self._lock:
            for shard in self._open.values():
                shard.file.abort()
                shard.hasher.close()
            self._open.clear()


# The copier stays at most this many shards ahead of the writer: the output shards open at once (a file, a
# hash and a thread each) stay few however many shards the model has.
COPY_AHEAD = 2


class _Cursor:
    """The shard the writer is on, for the copier to keep within COPY_AHEAD of it."""

    def __init__(self, at: int) -> None:
        self.at = at
        self._moved = threading.Condition()

    def move_to(self, index: int) -> None:
        with self._moved:
            if index != self.at:
                self.at = index
                self._moved.notify_all()

    def wait_for(self, index: int, stop: threading.Event) -> None:
        """Return once the writer is on shard `index` or beyond. Raises Stopped once the run is stopped."""
        with self._moved:
            while self.at < index:
                if stop.is_set():
                    raise Stopped
                self._moved.wait(0.1)


def _open_source(files: ShardFiles, shard: Shard, stop: threading.Event) -> tuple[Path, int]:
    """Where a source shard is (once downloaded, for a streamed one), open for reading."""
    path = files.ready(shard, stop)
    return path, open_for_reading(path, shard.file_id)


def _copy_kept(
    plan: Plan, index: int, shards: _OutShards, files: ShardFiles, stop: threading.Event, writer_at: _Cursor
) -> None:
    """Copy the tensors shard `index` keeps whole, file to file, once the writer is near it (and a streamed
    shard is downloaded)."""
    writer_at.wait_for(index - COPY_AHEAD, stop)
    shard = plan.shards[index]
    _, src_fd = _open_source(files, shard.source, stop)
    out = shards.get(index).file
    try:
        for job in shard.jobs:
            if job.is_copy:
                out.copy(src_fd, job.source.start, job.pieces[0].out)
    finally:
        os.close(src_fd)


def _write(
    plan: Plan,
    partial: Path,
    inbox: queue.Queue[_Item | None],
    stop: threading.Event,
    emit: EventCallback,
    pools: _Pools,
    progress: Progress,
    files: ShardFiles,
    skip: set[str],
    serve_check: bool,
) -> None:
    shards = _OutShards(plan, partial)
    stats: dict[str, Any] = {}
    src_fd = -1
    flushed: list[Future[None]] = []
    # Tensors kept whole (an embedding, lm_head: 1 GB each in an 8B model) are copied file to file by a
    # thread of their own, shard after shard, up to COPY_AHEAD shards ahead of the writer, so the weights
    # never queue behind them and a last shard that holds only lm_head is not left to the end; a shard is
    # finished once its copies are in.
    todo = [index for index, shard in enumerate(plan.shards) if shard.name not in skip]
    writer_at = _Cursor(todo[0] if todo else 0)
    copier = ThreadPoolExecutor(1, thread_name_prefix="fp8q-copy")
    copies = {
        index: copier.submit(_copy_kept, plan, index, shards, files, stop, writer_at)
        for index in todo
        if any(job.is_copy for job in plan.shards[index].jobs)
    }
    try:
        while (item := _get(inbox, stop)) is not None:
            shard = plan.shards[item.shard]
            path = partial / shard.name
            writer_at.move_to(item.shard)
            try:
                current = shards.get(item.shard).file
                if src_fd < 0:
                    _, src_fd = _open_source(files, shard.source, stop)
                if item.job is None:
                    if item.shard in copies:
                        copies.pop(item.shard).result()  # an OSError of the copy's is raised here, and named below
                    if changed_since_read(shard.source, os.fstat(src_fd)):
                        raise CheckpointError(
                            f"{shard.source.path}: changed while fp8q was converting it; run again once nothing "
                            "writes to the source"
                        )
                    done = shards.pop(item.shard)
                    flushed.append(
                        done.syncer.submit(_finish_shard, done.file, done.hasher, shard.name, stats, progress)
                    )
                    stats = {}
                    os.close(src_fd)
                    src_fd = -1
                    files.done(shard.name)  # a streamed shard's download is deleted: everything is read from it
                    continue
                job = item.job
                if job.is_copy:
                    pass  # the copier's
                elif not job.action.quantizes:
                    for piece, t in zip(job.pieces, item.data, strict=True):
                        current.write(piece.out, t)
                    if item.buffer is not None:  # a dequantized weight's
                        (item.pool or pools.inputs).give(item.buffer)
                        item.data = item.buffer = None
                else:
                    assert plan.layout is not None
                    _write_quantized(current, job, item, stats, pools, plan.layout, serve_check)
            except OSError as e:
                raise write_error(path, e) from None
            emit(TensorDone(job.source.name, job.source.nbytes, shard.name))
        for future in flushed:
            try:
                future.result()
            except OSError as e:
                raise write_error(partial, e) from None
    except BaseException:
        stop.set()  # a copier waiting for a download gives up, instead of being waited for below
        raise
    finally:
        copier.shutdown(wait=True, cancel_futures=True)  # before the files it copies between close
        shards.close()
        if src_fd >= 0:
            os.close(src_fd)


def _write_quantized(
    shard: ShardFile, job: Job, item: _Item, stats: dict[str, Any], pools: _Pools, layout: Layout, serve_check: bool
) -> None:
    """Write a quantized weight and its scale once the device has them ready, and hand its buffers back.

    Raises:
        UnsupportedTensorError: NaN or inf in the weight; or (`serve_check`) its FP8 form overflows to inf in the
            dtype its client computes in, so no engine could serve it (without the check it is recorded instead).
    """
    for piece, done in zip(job.pieces, item.data, strict=True):
        assert piece.scale is not None
        try:
            done.wait()
        except NonFiniteWeight:
            raise _non_finite(job) from None
        overflows = numerics.client_overflows(done.q, done.s, layout)
        if overflows and serve_check:
            raise _overflowing(piece.out.name, job, layout.client_dtype(done.s.dtype))
        shard.write(piece.out, done.q)
        shard.write(piece.scale, done.s)
        stats[piece.out.name] = {"shape": list(piece.out.shape), **done.stats()}
        if overflows:
            stats[piece.out.name]["client_overflow"] = True
    item.data = None
    if item.buffer is not None:
        (item.pool or pools.inputs).give(item.buffer)
        item.buffer = None
    for buf in item.out_buffers:
        pools.outputs.give(buf)


def _hash_in_background(syncer: ThreadPoolExecutor, hasher: FileHasher) -> Callable[[int, int], None]:
    """What a shard file calls as each byte range lands: hash it on the fsync thread, in order."""

    def submit(start: int, end: int) -> None:
        syncer.submit(hasher.add, start, end)

    return submit


def _finish_shard(shard: ShardFile, hasher: FileHasher, name: str, stats: dict[str, Any], progress: Progress) -> None:
    """On the fsync thread: make the shard durable and finish its hash (at once: the disk flushes
    while the CPU hashes from the page cache), then record it for --resume."""
    failed: list[BaseException] = []

    def flush() -> None:
        try:
            shard.close()
        except BaseException as e:  # an fsync error (ENOSPC from delayed allocation, EIO) is raised below
            failed.append(e)

    flushing = threading.Thread(target=flush, name="fp8q-flush")
    flushing.start()
    try:
        digest = hasher.finish()
    finally:
        flushing.join()
    if failed:
        raise failed[0]
    progress.record(name, digest, stats)


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise Stopped
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue[Any], stop: threading.Event) -> Any:
    while True:
        if stop.is_set():
            raise Stopped
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
