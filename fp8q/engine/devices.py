"""Runs the numerics on a device: CPU worker threads over cache-sized row chunks, or CUDA streams.

Imports: torch, errors, layouts (base, kernels, numerics), models.experts (Part). Both give the same bits: the CPU path
splits a tensor into row ranges whose results do not depend on the split (see numerics), the CUDA path runs the same ops
on the whole tensor at once.

A quantizer's `start` returns a `Quantized`: on the CPU it is done when returned; on a GPU it is a promise (upload,
quantization, statistics and download queued on three streams), kept by `wait()`, which the writer thread
(engine/writing.py) calls just before it writes the bytes, so the thread feeding the GPU never waits for it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fp8q.errors import UsageError
from fp8q.layouts import kernels, numerics
from fp8q.layouts.base import Layout
from fp8q.models.experts import Part

# A chunk of this many input bytes, with its temporaries, stays in a core's L2 cache (measured best
# of 64 KiB..2 MiB here).
CHUNK_BYTES = 1 << 20


@dataclass
class Quantized:
    """One weight's quantization: `q` and `s` are host tensors that hold their values once `wait()` has
    returned, and `stats()` then reads the manifest's statistics."""

    q: torch.Tensor
    s: torch.Tensor
    sums: torch.Tensor  # numerics.error_sums, on the device that computed it
    pending: Callable[[], None] | None = None  # waits for the device; None: finished already
    keep: tuple[torch.Tensor, ...] = field(default=(), repr=False)  # device memory the copies still read

    @property
    def ready(self) -> bool:
        return self.pending is None

    def wait(self) -> None:
        """Block until `q` and `s` hold their values.

        Raises:
            NonFiniteWeight: the weight held NaN or inf (found from its scale, now on the host).
        """
        if self.pending is not None:
            self.pending()
            self.pending, self.keep = None, ()
            if not numerics.scale_is_finite(self.s):
                raise kernels.NonFiniteWeight("holds NaN or inf values")

    def stats(self) -> dict[str, float | int | bool]:
        return numerics.error_stats(self.sums.tolist())


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU.

    Raises:
        UsageError: an unknown device, or CUDA asked for where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: fp8q runs on cpu or cuda")
    return dev


def dequantize_into(
    q: torch.Tensor,
    scale: torch.Tensor,
    layout: Layout,
    out: torch.Tensor,
    pool: ThreadPoolExecutor | None = None,
    second: torch.Tensor | None = None,
) -> bool:
    """Dequantize a quantized weight into `out` (its dtype) band by band, on `pool`'s threads when given; returns
    whether every value is finite (a value `out`'s dtype cannot hold is inf). `second`: FP4's global scale. Fused
    experts (gpt-oss's [E, out, groups, 16] blocks) go expert by expert."""
    if q.dim() > 2:
        for expert in range(q.shape[0]):
            out[expert] = layout.dequantize(q[expert], scale[expert], out.dtype, second)
        return bool(torch.isfinite(out).all())
    rows, cols = q.shape

    def band(r: tuple[int, int, Any]) -> bool:
        r0, r1, scale_rows = r
        out[r0:r1] = layout.dequantize(q[r0:r1], scale[scale_rows], out.dtype, second)
        return bool(torch.isfinite(out[r0:r1]).all())

    bands = list(numerics.row_bands(rows, cols, layout))
    return all(pool.map(band, bands) if pool is not None and len(bands) > 1 else map(band, bands))


@dataclass
class Submitted:
    """A weight handed to a quantizer: its host tensor (kept alive until its upload has run) and, on a GPU, its
    device copy and the event that says the copy is done."""

    host: torch.Tensor
    device: torch.Tensor | None = None
    uploaded: torch.cuda.Event | None = None


class Quantizer(Protocol):
    """What the quantization loop drives: a weight is submitted (uploaded), then started (quantized, at once on the
    CPU, queued on a GPU), and its result waited for by the writer just before it writes the bytes. Its numbers
    size the run's buffer pools."""

    lookahead: int  # weights submitted ahead of the one being started
    in_flight: int  # weights whose buffers stay out after `start` returns
    pin_memory: bool  # buffers in pinned host memory (a GPU's uploads read them)
    pool: ThreadPoolExecutor | None  # CPU threads dequantization may run on too

    def submit(self, w: torch.Tensor) -> Submitted: ...

    def start(
        self, handle: Submitted, q: torch.Tensor | None = None, part: Part | None = None, whole: bool = False
    ) -> Quantized: ...

    def close(self) -> None: ...


class _Quantizer:
    """What every quantizer has: `result`, which starts a weight and waits for it."""

    def start(
        self, handle: Submitted, q: torch.Tensor | None = None, part: Part | None = None, whole: bool = False
    ) -> Quantized:
        raise NotImplementedError

    def result(
        self, handle: Submitted, q: torch.Tensor | None = None, part: Part | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`start`, then wait: the quantized weight and its scale."""
        done = self.start(handle, q, part)
        done.wait()
        return done.q, done.s


class CpuQuantizer(_Quantizer):
    """Quantizes on the CPU with `workers` threads, each walking its own rows chunk by chunk."""

    lookahead = 0
    pin_memory = False
    in_flight = 0  # weights still being worked on after `start` returns

    def __init__(self, layout: Layout, workers: int) -> None:
        self.layout = layout
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fp8q-cpu") if self.workers > 1 else None

    def submit(self, w: torch.Tensor) -> Submitted:
        return Submitted(w)

    def start(
        self, handle: Submitted, q: torch.Tensor | None = None, part: Part | None = None, whole: bool = False
    ) -> Quantized:
        """Quantize the submitted weight (or the `part` of it one output takes) into `q` when given
        (a pool buffer), else into new memory. May be called once per part of the same handle. `whole`: its
        statistics over every value, exactness too (numerics.error_sums).

        Raises:
            NonFiniteWeight: NaN or inf in the weight.
        """
        w = handle.host if part is None else part.take(handle.host)
        layout = self.layout
        q, s = numerics.empty_outputs(w, layout, q=q)
        ranges = numerics.split_rows(w.shape[0], layout.row_step, self.workers)
        amaxes = self._map(lambda r: _chunked_amax(w, r, self._chunk_rows(w), layout), ranges)
        tensor_scale = None
        if amaxes and amaxes[0] is not None:
            tensor_scale = layout.tensor_scale(torch.stack(amaxes).amax(), w.dtype)
        self._map(lambda r: _chunked_quantize(w, q, s, r, self._chunk_rows(w), layout, tensor_scale), ranges)
        return Quantized(q, s, numerics.error_sums(w, q, s, layout, whole=whole))

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()

    def _map(self, fn: Any, ranges: list[tuple[int, int]]) -> list[Any]:
        if self.pool is None or len(ranges) == 1:
            return [fn(r) for r in ranges]
        return list(self.pool.map(fn, ranges))

    def _chunk_rows(self, w: torch.Tensor) -> int:
        step = self.layout.row_step
        rows = CHUNK_BYTES // max(1, w.shape[1] * w.element_size())
        return max(step, rows // step * step)


def _chunked_amax(w: torch.Tensor, r: tuple[int, int], chunk: int, layout: Layout) -> torch.Tensor | None:
    parts = [layout.tensor_amax(w, a, min(a + chunk, r[1])) for a in range(r[0], r[1], chunk)]
    if not parts or parts[0] is None:
        return layout.tensor_amax(w, r[0], r[1])
    return torch.stack(parts).amax()  # type: ignore[arg-type]


def _chunked_quantize(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    r: tuple[int, int],
    chunk: int,
    layout: Layout,
    tensor_scale: torch.Tensor | None,
) -> None:
    for a in range(r[0], max(r[1], r[0] + 1), chunk):
        layout.quantize_rows(w, q, s, a, min(a + chunk, r[1]), tensor_scale)


class CudaQuantizer(_Quantizer):
    """Quantizes on one CUDA device with three streams: uploads (from pinned host memory), quantization
    and statistics, and downloads (into pinned host buffers), each waiting on the last one's event, so
    that several weights are in flight and the host never waits for the GPU: the writer thread waits
    for each download just before it writes those bytes."""

    lookahead = 1
    pin_memory = True
    in_flight = 3  # weights whose buffers stay out after `start`: one pending, one queued, one being written
    pool: ThreadPoolExecutor | None = None

    def __init__(self, layout: Layout, device: torch.device) -> None:
        self.layout = layout
        self.device = device
        self.upload = torch.cuda.Stream(device)
        self.compute = torch.cuda.Stream(device)
        self.download = torch.cuda.Stream(device)

    def submit(self, w: torch.Tensor) -> Submitted:
        with torch.cuda.stream(self.upload):
            dev = w.to(self.device, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(self.upload)
        # Keep the pinned source alive until its copy has run.
        return Submitted(w, dev, uploaded)

    def start(
        self, handle: Submitted, q: torch.Tensor | None = None, part: Part | None = None, whole: bool = False
    ) -> Quantized:
        dev, uploaded = handle.device, handle.uploaded
        assert dev is not None and uploaded is not None
        with torch.cuda.stream(self.compute):
            self.compute.wait_event(uploaded)
            dev.record_stream(self.compute)  # the upload stream's memory, read here
            x = dev if part is None else part.take(dev)
            q_dev, s_dev = numerics.quantize(x, self.layout)  # NaN or inf: a non-finite scale, seen in wait()
            sums = numerics.error_sums(x, q_dev, s_dev, self.layout, whole=whole)
            computed = torch.cuda.Event()
            computed.record(self.compute)
        with torch.cuda.stream(self.download):
            self.download.wait_event(computed)
            q_host, s_host = numerics.empty_outputs(x, self.layout, pin=True, q=q)
            q_host.copy_(q_dev, non_blocking=True)
            s_host.copy_(s_dev, non_blocking=True)
            downloaded = torch.cuda.Event()
            downloaded.record(self.download)
        # The device tensors stay referenced until the download has run; the sums are read after it.
        return Quantized(q_host, s_host, sums, downloaded.synchronize, keep=(q_dev, s_dev))

    def close(self) -> None:
        torch.cuda.synchronize(self.device)


def make_quantizer(layout: Layout, device: torch.device, workers: int) -> Quantizer:
    """The quantizer for the device: CUDA streams, or CPU threads."""
    if device.type == "cuda":
        return CudaQuantizer(layout, device)
    return CpuQuantizer(layout, workers)
