"""The writer thread of a run, and the threads it starts: tensors land at their planned offsets in each output shard;
tensors kept whole are copied file to file by a copy thread running up to COPY_AHEAD shards ahead; each finished
shard is flushed, hashed and recorded for --resume on a thread of its own.

Imports: errors, events, layouts, plan (types), output (shard files, hashing, records), engine.buffers, source
(changed_since_read).

    writer thread    pwrite weight + scale at planned offsets; once a shard is written, delete
                     its source if it was streamed
    copy thread      shard after shard, up to COPY_AHEAD shards ahead of the writer: copy the tensors kept
                     whole, file to file
    shard threads    flush each finished shard, hash it, record it for --resume (and, with --push-to-hub,
                     hand it to the upload thread, which holds the writer back while 2 shards wait on disk)
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fp8q.engine.buffers import (
    Item,
    Pools,
    far_from_source,
    get,
    non_finite,
    overflowing,
)
from fp8q.errors import CheckpointError, Stopped, write_error
from fp8q.events import EventCallback, TensorDone
from fp8q.layouts import numerics
from fp8q.layouts.base import Layout
from fp8q.layouts.kernels import NonFiniteWeight
from fp8q.output.destination import Destination
from fp8q.output.manifest import FileHasher, Progress
from fp8q.output.writer import ShardFile
from fp8q.plan.checks import MAX_REL_ERROR
from fp8q.plan.planner import Job, Plan
from fp8q.source.base import ShardFiles
from fp8q.source.checkpoint import changed_since_read
from fp8q.source.reader import open_shard


@dataclass
class Outlet:
    """Where finished shards go: recorded for --resume, then put to each destination (uploaded, for a Hub repo; its
    arrival recorded too, and told to `on_sent`). A destination that deletes each shard once it is up holds back the
    opening of a shard while too many wait on disk (`room`)."""

    progress: Progress
    destinations: list[Destination] = field(default_factory=list)
    on_sent: Callable[[str, int], None] = lambda name, nbytes: None  # from a destination's upload thread

    def room(self, stop: threading.Event) -> None:
        for destination in self.destinations:
            destination.room(stop)

    def lost(self) -> None:
        """A shard that could not be finished (its flush failed): its room is free again, so that the writer is not
        held and reaches the failure."""
        for destination in self.destinations:
            destination.lost()

    def finished(self, name: str, path: Path, sha256: str, stats: dict[str, Any]) -> None:
        self.progress.record(name, sha256, stats)
        for destination in self.destinations:
            destination.put(name, path, sha256, self._delivered)

    def _delivered(self, name: str, record: dict[str, Any]) -> None:
        self.progress.record_upload(name, record)
        self.on_sent(name, int(record["size"]))


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
    running ahead of it. They are opened in the order the writer goes (`order`): the outlet's room (--push-to-hub,
    no OUT) is taken shard after shard, so the copier can never hold it for later shards while the writer waits
    for the one it is on."""

    def __init__(self, plan: Plan, partial: Path, outlet: Outlet, stop: threading.Event, order: list[int]) -> None:
        self.plan = plan
        self.partial = partial
        self.outlet = outlet
        self.stop = stop
        self._order = order
        self._turn = 0  # the position in `order` of the next shard to open
        self._turned = threading.Condition()
        self._open: dict[int, _OutShard] = {}
        self._opening: dict[int, threading.Event] = {}
        self._failed: dict[int, BaseException] = {}  # why an opener could not open its shard (upload failed)
        self._lock = threading.Lock()
        self.syncers: list[ThreadPoolExecutor] = []

    def get(self, index: int) -> _OutShard:
        """Shard `index`, opened by the first thread to ask, once the outlet has room for it; a second thread
        asking meanwhile waits for that, and raises what stopped the opener (the outlet's failure) if it did. Raises
        Stopped once the run is stopped."""
        with self._lock:
            if index in self._open:
                return self._open[index]
            opening = self._opening.get(index)
            mine = opening is None
            if opening is None:
                opening = self._opening[index] = threading.Event()
        if not mine:
            while not opening.wait(0.1):
                if self.stop.is_set():
                    raise Stopped
            with self._lock:
                if index in self._failed:
                    raise self._failed[index]
                if index not in self._open:
                    raise Stopped  # its opener was stopped, and so is the run
                return self._open[index]
        try:
            self._wait_for_turn(index)
            self.outlet.room(self.stop)
            if self.stop.is_set():
                raise Stopped
            with self._lock:
                path = self.partial / self.plan.shards[index].name
                syncer = ThreadPoolExecutor(1, thread_name_prefix="fp8q-fsync")
                self.syncers.append(syncer)
                hasher = FileHasher(path)
                file = ShardFile(path, self.plan.shards[index], _hash_in_background(syncer, hasher))
                self._open[index] = _OutShard(file, hasher, syncer)
                return self._open[index]
        except Exception as e:
            with self._lock:
                self._failed[index] = e
            raise
        finally:
            with self._turned:
                self._turn += 1
                self._turned.notify_all()
            opening.set()

    def _wait_for_turn(self, index: int) -> None:
        """Until every shard before `index` in the writer's order is opened (or its opener gave up)."""
        position = self._order.index(index)
        with self._turned:
            while self._turn < position:
                if self.stop.is_set():
                    raise Stopped
                self._turned.wait(0.1)

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


def _copy_kept(
    plan: Plan, index: int, shards: _OutShards, files: ShardFiles, stop: threading.Event, writer_at: _Cursor
) -> None:
    """Copy the tensors shard `index` keeps whole, file to file, once the writer is near it (and a streamed
    shard is downloaded)."""
    writer_at.wait_for(index - COPY_AHEAD, stop)
    shard = plan.shards[index]
    _, src_fd = open_shard(files, shard.input, stop)
    out = shards.get(index).file
    try:
        for job in shard.jobs:
            if job.is_copy:
                out.copy(src_fd, job.input.start, job.pieces[0].out)
    finally:
        os.close(src_fd)


def write_shards(
    plan: Plan,
    partial: Path,
    inbox: queue.Queue[Item | None],
    stop: threading.Event,
    emit: EventCallback,
    pools: Pools,
    outlet: Outlet,
    files: ShardFiles,
    skip: set[str],
    serve_check: bool,
) -> None:
    todo = [index for index, shard in enumerate(plan.shards) if shard.name not in skip]
    shards = _OutShards(plan, partial, outlet, stop, todo)
    stats: dict[str, Any] = {}
    src_fd = -1
    flushed: list[Future[None]] = []
    # Tensors kept whole (an embedding, lm_head: 1 GB each in an 8B model) are copied file to file by a
    # thread of their own, shard after shard, up to COPY_AHEAD shards ahead of the writer, so the weights
    # never queue behind them and a last shard that holds only lm_head is not left to the end; a shard is
    # finished once its copies are in.
    writer_at = _Cursor(todo[0] if todo else 0)
    copier = ThreadPoolExecutor(1, thread_name_prefix="fp8q-copy")
    copies = {
        index: copier.submit(_copy_kept, plan, index, shards, files, stop, writer_at)
        for index in todo
        if any(job.is_copy for job in plan.shards[index].jobs)
    }
    try:
        while (item := get(inbox, stop)) is not None:
            shard = plan.shards[item.shard]
            path = partial / shard.name
            writer_at.move_to(item.shard)
            try:
                current = shards.get(item.shard).file
                if src_fd < 0:
                    _, src_fd = open_shard(files, shard.input, stop)
                if item.job is None:
                    if item.shard in copies:
                        copies.pop(item.shard).result()  # an OSError of the copy's is raised here, and named below
                    if changed_since_read(shard.input, os.fstat(src_fd)):
                        raise CheckpointError(
                            f"{shard.input.path}: changed while fp8q was converting it; run again once nothing "
                            "writes to the source"
                        )
                    _raise_flush_failure(flushed, partial)  # an earlier shard's, as soon as it is known
                    done = shards.pop(item.shard)
                    flushed.append(done.syncer.submit(_finish_shard, done.file, done.hasher, shard.name, stats, outlet))
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
            emit(TensorDone(job.input.name, job.input.nbytes, shard.name))
        for future in flushed:
            future.exception()  # wait for every flush
        _raise_flush_failure(flushed, partial)
    except BaseException:
        stop.set()  # a copier waiting for a download gives up, instead of being waited for below
        raise
    finally:
        copier.shutdown(wait=True, cancel_futures=True)  # before the files it copies between close
        shards.close()
        if src_fd >= 0:
            os.close(src_fd)


def _write_quantized(
    shard: ShardFile, job: Job, item: Item, stats: dict[str, Any], pools: Pools, layout: Layout, serve_check: bool
) -> None:
    """Write a quantized weight and its scale once the device has them ready, and hand its buffers back.

    Raises:
        UnsupportedTensorError: NaN or inf in the weight; or (`serve_check`) its FP8 form overflows to inf in the
            dtype its client computes in, so no engine could serve it, or is far from it in the rows sampled (values
            too small for FP8): without the check either is recorded instead.
    """
    for piece, done in zip(job.pieces, item.data, strict=True):
        assert piece.scale is not None
        try:
            done.wait()
        except NonFiniteWeight:
            raise non_finite(job) from None
        overflows = numerics.client_overflows(done.q, done.s, layout)
        if overflows and serve_check:
            raise overflowing(piece.out.name, job, layout.client_dtype(done.s.dtype))
        figures = done.stats()
        if serve_check and figures["rel_error"] > MAX_REL_ERROR:  # what verify --source flags (its SNR limit too)
            raise far_from_source(piece.out.name, job, figures["rel_error"])
        shard.write(piece.out, done.q)
        shard.write(piece.scale, done.s)
        stats[piece.out.name] = {"shape": list(piece.out.shape), **figures}
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


def _raise_flush_failure(flushed: list[Future[None]], partial: Path) -> None:
    """The first failure among the shard flushes done so far (an OSError said as one line naming OUT)."""
    for future in flushed:
        if future.done() and future.exception() is not None:
            try:
                future.result()
            except OSError as e:
                raise write_error(partial, e) from None


def _finish_shard(shard: ShardFile, hasher: FileHasher, name: str, stats: dict[str, Any], outlet: Outlet) -> None:
    """On the fsync thread: make the shard durable and finish its hash (at once: the disk flushes
    while the CPU hashes from the page cache), then record it for --resume (and upload it)."""
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
        outlet.lost()
        raise failed[0]
    outlet.finished(name, shard.path, digest, stats)


__all__ = ["COPY_AHEAD", "Outlet", "write_shards"]
