"""Runs a conversion: read, quantize and write overlap in three threads with bounded queues.

Imports: everything below it; never prints. Lifecycle of `quantize(src, out, options)`:

    read_checkpoint(src)                 headers + index, validated; no tensor data
    make_plan(checkpoint, layout)        every output name, dtype, shape, offset, header, config
    check_output / check_free_space      nothing written yet
    OUT.partial/
        reader thread    shard by shard, tensor by tensor: read a weight into (pinned) memory
        main thread      quantize it (CPU chunks on worker threads, or CUDA streams)
        writer thread    pwrite weight + scale at planned offsets; copy kept tensors file to file
        index, config.json, side files
    rename OUT.partial -> OUT

Memory: the queues hold one item each, so at most about four tensors the size of the largest
weight are alive at once (one being read, one queued, one being quantized, its outputs queued and
being written), whatever the size of the model.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fp8q.checkpoint import CONFIG_FILE, INDEX_FILE, read_checkpoint
from fp8q.errors import CheckpointError, Fp8qError, OutputError, UnsupportedTensorError
from fp8q.formats import Format, Layout, Scheme
from fp8q.numerics import FP8, NonFiniteWeight
from fp8q.plan import Action, Job, Plan, make_plan
from fp8q.quantizer import make_quantizer, resolve_device
from fp8q.tensor_io import BufferPool, Stopped, read_tensor, typed_view
from fp8q.writer import (
    ShardFile,
    check_free_space,
    check_output,
    copy_file,
    finalize,
    partial_dir,
    remove_tree,
    write_json,
)


@dataclass(frozen=True)
class QuantizeOptions:
    """What to produce and how. `workers` 0 means one per CPU core."""

    scheme: Scheme = Scheme.CHANNEL
    format: Format = Format.COMPRESSED_TENSORS
    block_size: tuple[int, int] = (128, 128)
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    device: str = "auto"
    workers: int = 0
    overwrite: bool = False

    @property
    def layout(self) -> Layout:
        return Layout(Scheme(self.scheme), Format(self.format), tuple(self.block_size))  # type: ignore[arg-type]


@dataclass(frozen=True)
class PlanReady:
    plan: Plan


@dataclass(frozen=True)
class TensorDone:
    name: str
    nbytes: int


@dataclass(frozen=True)
class Report:
    """The outcome of a run, for the CLI summary and `--json`."""

    out: str
    device: str
    tensors_quantized: int
    tensors_kept: int
    bytes_in: int
    bytes_out: int
    seconds: float
    ignored_modules: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else 0.0


Event = PlanReady | TensorDone
EventCallback = Callable[[Event], None]


def plan_conversion(src: str | Path, options: QuantizeOptions) -> Plan:
    """Read and validate SRC and plan the conversion, reading no tensor data."""
    return make_plan(read_checkpoint(Path(src)), options.layout, options.ignore, options.targets)


def quantize(
    src: str | Path,
    out: str | Path,
    options: QuantizeOptions | None = None,
    on_event: EventCallback | None = None,
) -> Report:
    """Convert the checkpoint at SRC into an FP8 checkpoint at OUT.

    Args:
        src: a checkpoint folder or a single `.safetensors` file.
        out: the folder to create; it appears only once complete.
        options: scheme, format, device and the rest; defaults to per-channel compressed-tensors.
        on_event: called with `PlanReady` once, then `TensorDone` per tensor (from a worker thread).

    Raises:
        Fp8qError: any problem with the input, options or output, naming the file or tensor.
    """
    options = options or QuantizeOptions()
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    device = resolve_device(options.device)
    plan = plan_conversion(src, options)
    check_output(src, out, options.overwrite)
    side_bytes = sum((plan.checkpoint.root / f).stat().st_size for f in plan.checkpoint.side_files)
    check_free_space(out, plan.bytes_out + side_bytes)
    emit(PlanReady(plan))

    partial = partial_dir(out)
    if partial.exists():
        raise OutputError(f"{partial}: left by an earlier run that did not finish; delete it and run again")
    partial.mkdir(parents=True)
    try:
        _run_plan(plan, partial, device, options.workers or os.cpu_count() or 1, emit)
        _write_metadata_files(plan, partial)
        finalize(partial, out)
    except BaseException:
        remove_tree(partial)
        raise
    return Report(
        out=str(out),
        device=str(device),
        tensors_quantized=plan.n_quantized,
        tensors_kept=plan.n_kept,
        bytes_in=plan.bytes_in,
        bytes_out=plan.bytes_out,
        seconds=time.perf_counter() - started,
        ignored_modules=list(plan.ignored),
    )


def _write_metadata_files(plan: Plan, partial: Path) -> None:
    root = plan.checkpoint.root
    if plan.checkpoint.has_index or len(plan.shards) > 1:
        write_json(partial / INDEX_FILE, plan.index())
    if plan.config is not None:
        write_json(partial / CONFIG_FILE, plan.config)
    for name in plan.checkpoint.side_files:
        copy_file(root / name, partial / name)


@dataclass
class _Item:
    shard: int
    job: Job | None  # None marks the end of a shard
    data: Any = None
    buffer: torch.Tensor | None = None  # the pool buffer behind `data`, handed back once used


def _run_plan(plan: Plan, partial: Path, device: torch.device, workers: int, emit: EventCallback) -> None:
    quantizer = make_quantizer(plan.layout, device, workers)
    # Three buffers each way: one being filled, one queued, one being used; memory stays bounded.
    largest_weight = max((j.weight.nbytes for j in plan.jobs if j.weight is not None), default=0)
    pools = _Pools(
        BufferPool(plan.largest_quantized, 3, quantizer.pin_memory),
        BufferPool(largest_weight, 3, quantizer.pin_memory),
    )
    to_quantize: queue.Queue[_Item | None] = queue.Queue(maxsize=1)
    to_write: queue.Queue[_Item | None] = queue.Queue(maxsize=1)
    stop = threading.Event()
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

    reader = threading.Thread(target=guarded(lambda: _read(plan, to_quantize, stop, pools.inputs)), name="fp8q-reader")
    writer = threading.Thread(
        target=guarded(lambda: _write(plan, partial, to_write, stop, emit, pools.outputs)), name="fp8q-writer"
    )
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one torch thread per worker: our own threads use the cores
    reader.start()
    writer.start()
    try:
        _quantize_loop(quantizer, pools, to_quantize, to_write, stop)
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


@dataclass(frozen=True)
class _Pools:
    inputs: BufferPool  # source weights, as read
    outputs: BufferPool  # quantized weights, until written


def _quantize_loop(
    quantizer: Any,
    pools: _Pools,
    inbox: queue.Queue[_Item | None],
    outbox: queue.Queue[_Item | None],
    stop: threading.Event,
) -> None:
    pending: deque[_Item] = deque()
    in_flight = 0

    def finish_head() -> None:
        nonlocal in_flight
        item = pending.popleft()
        if item.job is not None and item.job.action is Action.QUANTIZE:
            in_flight -= 1
            job = item.job
            assert job.weight is not None
            out = pools.outputs.take(stop)
            try:
                item.data = quantizer.result(item.data, typed_view(out, FP8, job.weight.shape))
            except NonFiniteWeight:
                src = item.job.source
                raise UnsupportedTensorError(
                    f"tensor {src.name} in {src.shard} holds NaN or inf values; fix the source checkpoint, "
                    f"or keep it unquantized with --ignore '^{src.module}$'"
                ) from None
            if item.buffer is not None:
                pools.inputs.give(item.buffer)
            item.buffer = out
        _put(outbox, item, stop)

    while (item := _get(inbox, stop)) is not None:
        if item.job is not None and item.job.action is Action.QUANTIZE:
            item.data = quantizer.submit(item.data)
            in_flight += 1
        pending.append(item)
        while pending and (
            in_flight > quantizer.lookahead or pending[0].job is None or pending[0].job.action is Action.KEEP
        ):
            finish_head()
    while pending:
        finish_head()
    _put(outbox, None, stop)


def _read(plan: Plan, outbox: queue.Queue[_Item | None], stop: threading.Event, pool: BufferPool) -> None:
    for index, shard in enumerate(plan.shards):
        path = shard.source.path
        fd = os.open(path, os.O_RDONLY)
        try:
            for job in shard.jobs:
                data = buffer = None
                if job.action is Action.QUANTIZE:
                    buffer = pool.take(stop)
                    try:
                        data = read_tensor(fd, job.source, buffer)
                    except OSError as e:
                        raise CheckpointError(
                            f"{path}: read error in tensor {job.source.name} ({e.strerror or e}); "
                            "check the disk and the file, then run again"
                        ) from None
                _put(outbox, _Item(index, job, data, buffer), stop)
        finally:
            os.close(fd)
        _put(outbox, _Item(index, None), stop)
    _put(outbox, None, stop)


def _write(
    plan: Plan,
    partial: Path,
    inbox: queue.Queue[_Item | None],
    stop: threading.Event,
    emit: EventCallback,
    pool: BufferPool,
) -> None:
    current: ShardFile | None = None
    src_fd = -1
    # A finished shard is flushed to disk by a helper thread, so the writer never waits on the disk.
    syncer = ThreadPoolExecutor(1, thread_name_prefix="fp8q-fsync")
    flushed: list[Future[None]] = []
    try:
        while (item := _get(inbox, stop)) is not None:
            shard = plan.shards[item.shard]
            path = partial / shard.name
            try:
                if current is None:
                    current = ShardFile(path, shard)
                    src_fd = os.open(shard.source.path, os.O_RDONLY)
                if item.job is None:
                    flushed.append(syncer.submit(current.close))
                    current = None
                    os.close(src_fd)
                    src_fd = -1
                    continue
                job = item.job
                if job.action is Action.KEEP:
                    assert job.kept is not None
                    current.copy(src_fd, job.source.start, job.kept)
                else:
                    assert job.weight is not None and job.scale is not None
                    q, s = item.data
                    current.write(job.weight, q)
                    current.write(job.scale, s)
                    del q, s
                    if item.buffer is not None:
                        pool.give(item.buffer)
            except OSError as e:
                raise _write_error(path, e) from None
            emit(TensorDone(job.source.name, job.source.nbytes))
        for future in flushed:
            try:
                future.result()
            except OSError as e:
                raise _write_error(partial, e) from None
    finally:
        syncer.shutdown(wait=True)
        if current is not None:
            current.abort()
        if src_fd >= 0:
            os.close(src_fd)


def _write_error(path: Path, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full; free some space and run again")
    return OutputError(f"{path}: write error ({e.strerror or e}); check the disk and run again")


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


__all__ = ["Fp8qError", "PlanReady", "QuantizeOptions", "Report", "TensorDone", "plan_conversion", "quantize"]
