"""What moves between a run's threads, and the buffers that hold it: the items handed from stage to stage through
bounded queues, the reusable buffer pools (and what they cost: `memory_estimate`).

Imports: torch, dtypes, errors, layouts (numerics), plan (types), engine.devices. Memory: the pools bound what
is alive whatever the model size: three input buffers the size of the largest weight (one being read, one queued, one
being quantized), three more on a GPU for the weights it still works on, and a few output buffers for quantized weights
(one byte per element) on their way to disk, more on a GPU.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from fp8q.dtypes import ITEMSIZE
from fp8q.engine.devices import CHUNK_BYTES, CpuQuantizer, CudaQuantizer
from fp8q.errors import Stopped, UnsupportedTensorError
from fp8q.layouts import numerics
from fp8q.plan.planner import Job, Plan


class BufferPool:
    """A few reusable byte buffers, each as large as the largest tensor that will pass through.

    Taking blocks while all are in use, which bounds memory whatever the queues hold, and reusing
    buffers spares the page faults a fresh allocation costs (25 000 for a 100 MB tensor).
    """

    def __init__(self, capacity: int, count: int, pin: bool = False) -> None:
        self.capacity = max(1, capacity)
        self.pin = pin
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._unmade = count
        self._lock = threading.Lock()

    def take(self, stop: threading.Event) -> torch.Tensor:
        with self._lock:
            if self._free.empty() and self._unmade > 0:
                self._unmade -= 1
                return torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pin)
        while not stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise Stopped

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def typed_view(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The first bytes of a pool buffer seen as a tensor of this dtype and shape."""
    nbytes = math.prod(shape) * dtype.itemsize
    return buf[:nbytes].view(dtype).reshape(shape)


@dataclass
class Item:
    """One tensor (or a shard's end) on its way from the reader through the quantization loop to the writer."""

    shard: int
    job: Job | None  # None marks the end of a shard
    data: Any = None
    buffer: torch.Tensor | None = None  # the pool buffer behind the input `data`, handed back once used
    pool: BufferPool | None = None  # where `buffer` goes back to (None: the input pool)
    out_buffers: list[torch.Tensor] = field(default_factory=list)  # pool buffers behind quantized outputs
    scale: torch.Tensor | None = None  # a quantized source weight's scale
    second: torch.Tensor | None = None  # and its second scale (FP4's global scale), where it has one


def pool_sizes(plan: Plan, in_flight: int) -> list[tuple[int, int]]:
    """(bytes a buffer, buffers) of the three pools: source weights as read, quantized weights until written, FP8
    source weights in high precision. Three buffers each way: one being filled, one queued, one being used; a
    device that works on while the host goes on (`in_flight`) holds its weights' buffers longer."""
    quantized = [j for j in plan.jobs if j.action.quantizes]
    largest_weight = max((p.out.nbytes for j in quantized for p in j.pieces), default=0)
    pieces = max((len(j.pieces) for j in quantized), default=1)
    dequantized = max(
        (math.prod(j.decoded_shape) * ITEMSIZE[plan.dtype] for j in plan.jobs if j.action.dequantizes and plan.dtype),
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
    host_pools = sum(capacity * count for capacity, count in pool_sizes(plan, CpuQuantizer.in_flight))
    pinned = sum(capacity * count for capacity, count in pool_sizes(plan, CudaQuantizer.in_flight))
    layout, chunk, whole = plan.layout, 0, 0
    if layout is not None:
        for job in plan.jobs:
            if not job.action.quantizes:
                continue
            itemsize = ITEMSIZE[plan.dtype if job.action.dequantizes and plan.dtype else job.input.dtype]
            for piece in job.pieces:
                rows, cols = piece.out.shape
                step = layout.row_step
                chunk_rows = max(step, CHUNK_BYTES // max(1, cols * itemsize) // step * step)
                chunk = max(chunk, numerics.kernel_bytes(layout, min(rows, chunk_rows), cols, itemsize))
                whole = max(whole, numerics.kernel_bytes(layout, rows, cols, itemsize))
    # On the device: each weight in flight, as uploaded and quantized.
    largest_in, largest_out = pool_sizes(plan, 0)[0][0], pool_sizes(plan, 0)[1][0]
    device_weights = CudaQuantizer.in_flight * (largest_in + largest_out)
    return max(host_pools + max(1, workers) * chunk, pinned), device_weights + whole


@dataclass(frozen=True)
class Pools:
    inputs: BufferPool  # source weights, as read
    outputs: BufferPool  # quantized weights, until written
    dequantized: BufferPool  # FP8 source weights in high precision, until quantized or written


def non_finite(job: Job) -> UnsupportedTensorError:
    src = job.input
    return UnsupportedTensorError(
        f"tensor {src.name} in {src.shard} holds NaN or inf values; fix the source checkpoint, "
        f"or keep it unquantized with --ignore '^{re.escape(src.module)}$'"
    )


def overflowing(name: str, job: Job, client: torch.dtype) -> UnsupportedTensorError:
    dtype = str(client).removeprefix("torch.")
    module = name.removesuffix(".weight")
    src = job.input
    where = f"tensor {name} in {src.shard}" if name == src.name else f"tensor {name} (from {src.name} in {src.shard})"
    return UnsupportedTensorError(
        f"{where}: its FP8 form overflows to inf in the {dtype} "
        f"its client multiplies it by its scale in (values near the largest {dtype}), so no engine could serve it: "
        f"keep it in high precision with --ignore '^{re.escape(module)}$', or use --format fp8, whose clients "
        "compute in float32 (--no-load-check writes it anyway)"
    )


def far_from_source(name: str, job: Job, rel_error: float) -> UnsupportedTensorError:
    module = name.removesuffix(".weight")
    src = job.input
    where = f"tensor {name} in {src.shard}" if name == src.name else f"tensor {name} (from {src.name} in {src.shard})"
    return UnsupportedTensorError(
        f"{where}: its FP8 form is far from it (relative error {rel_error:.4f} in the rows fp8q samples: values too "
        "small for FP8 at the smallest scale the layout allows become 0), so `fp8q verify --source` would flag it: "
        f"keep it in high precision with --ignore '^{re.escape(module)}$' (--no-load-check writes it anyway)"
    )


def put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise Stopped
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def get(q: queue.Queue[Any], stop: threading.Event) -> Any:
    while True:
        if stop.is_set():
            raise Stopped
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue


__all__ = [
    "BufferPool",
    "Item",
    "Pools",
    "get",
    "memory_estimate",
    "non_finite",
    "overflowing",
    "far_from_source",
    "pool_sizes",
    "put",
    "typed_view",
]
