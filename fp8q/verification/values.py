"""The values of a checked checkpoint, read once, shard after shard: every scale usable and no FP8 weight a NaN, no
product of the client's overflowing, every tensor that must not change bit for bit its source's, and with a source
how far each dequantized weight is from it (relative error, max abs error, SNR), outliers flagged.

Imports: torch, events, layouts (base, detect, inputs, numerics), plan (checks, selection), source (checkpoint,
reader), verification.sources.

Speed: the main thread reads a weight (its scale, its source) into reused buffers, with the disk reading ahead (and the
source's pages dropped from the cache once read), while a pool of one thread per core checks the one before, each thread
a run of its bands (rows that stay in the CPU's cache). The arithmetic decides as float64 does, several times faster:
- a scale's finiteness and sign, and NaN codes, are read off the stored values (no arithmetic);
- overflow: a bound from the scales alone clears nearly every weight without reading it (`numerics.may_overflow`);
  the rest are dequantized as their client computes them and looked at;
- dequantized values: in float32 where that gives the client's bits exactly (`numerics.client_in_float32`: every
  layout fp8q writes), float64 elsewhere, so the compared values are the client's own, bit for bit;
- error sums: float32 differences and dot products per band, float64 across bands (always in the same order, so
  the figures do not depend on the number of threads), float64 for a band whose sums float32 cannot hold well (one
  above 2^100 or below 2^-60). On the 8-layer bench checkpoint in four layouts, every relative error and SNR agreed
  with float64's to 5e-6 relative and every max abs error exactly: a verdict could differ only for a weight within
  5e-6 (relative) of a limit (relative error 0.1, SNR 15 dB, 3x the median), and a digit shown only on a rounding
  edge.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import EllipsisType

import torch

from fp8q.events import Started, TensorDone
from fp8q.layouts import numerics
from fp8q.layouts.base import Layout
from fp8q.layouts.detect import DetectedLayout, QuantizedWeight, layout_words, value_problem
from fp8q.layouts.inputs import InputLayout
from fp8q.plan.checks import MAX_REL_ERROR
from fp8q.plan.selection import natural_key
from fp8q.source.checkpoint import Checkpoint, TensorMeta
from fp8q.source.reader import ShardReader
from fp8q.verification.sources import SourceTensor, source_of

# (MAX_REL_ERROR, from checks) ... or one below this signal-to-noise ratio is broken whatever its neighbours do.
MIN_SNR_DB = 15.0
# ...and one this many times the median error of the checkpoint (and above the floor) is an outlier.
OUTLIER_FACTOR = 3.0
OUTLIER_FLOOR = 0.05

# A float32 band sum is kept when it lies in [2^-60, 2^100]: squares that float32 flushes to 0 (below 2^-126 each,
# 2^17 of them at most a band) are then under 2^-49 of it, and it is far from float32's overflow at 2^128.
_SUM_LOW, _SUM_HIGH = 2.0**-60, 2.0**100

EventCallback = Callable[[Started | TensorDone], None]


@dataclass(frozen=True)
class TensorCheck:
    """One quantized weight: its scale range and, with a source, how far its dequantized values are."""

    name: str
    layout: str
    shape: tuple[int, ...]
    scale_min: float
    scale_max: float
    rel_error: float | None = None  # ||deq - w|| / ||w||
    max_abs_error: float | None = None
    snr_db: float | None = None  # 20 log10(||w|| / ||deq - w||); inf when exact
    flagged: str | None = None  # why this row is a problem


def check_values(
    checkpoint: Checkpoint,
    detected: DetectedLayout,
    src: Checkpoint | None,
    sources: dict[str, SourceTensor],
    readers: tuple[ShardReader, ShardReader],
    emit: EventCallback,
    workers: int,
) -> tuple[list[TensorCheck], list[str]]:
    """Read every scale (and with a source every weight, and every tensor that must not change), one weight at a
    time, shard after shard, into rows (worst first with a source, by name without) and problems: a streamed repo's
    shards are each downloaded once. `sources`: `source_tensors(src)`; `workers`: threads that check values."""
    usable = [qw for qw in detected.weights if qw.scale is not None and qw.layout is not None]
    emit(Started(len(usable), sum(_nbytes(qw) for qw in usable)))
    exact = _exact_pairs(checkpoint, src, detected) if src is not None else []
    shards = sorted({qw.weight.shard for qw in usable} | {meta.shard for meta, _ in exact}, key=natural_key)
    # The order each checkpoint's shards are read in: a streamed repo fetches the next while one is checked.
    src_order = []
    for shard in shards:
        src_order += [origin.shard for meta, origin in exact if meta.shard == shard]
        src_order += [s.source.shard for qw in usable if qw.weight.shard == shard if (s := source_of(sources, qw))]
    for reader, order in zip(readers, (shards, src_order), strict=True):
        if reader.fetch is not None:
            reader.fetch.expect(order)
    exact_problems: list[str] = []  # said before the values', as they were when read in a pass of their own
    value_problems: list[str] = []
    rows: list[TensorCheck] = []

    def finish(checked: _Checking) -> None:
        row, problem = checked.result()
        rows.append(row)
        if problem:
            value_problems.append(problem)
        emit(TensorDone(checked.qw.weight.name, _nbytes(checked.qw)))

    buffers = _Buffers()
    with readers[0] as reader, readers[1] as src_reader, _pool(workers) as pool:
        pending: _Checking | None = None  # checked by the pool while the next weight is read
        for shard in shards:
            for meta, origin in (pair for pair in exact if pair[0].shard == shard):
                if not torch.equal(reader.read(meta).view(torch.uint8), src_reader.read(origin).view(torch.uint8)):
                    exact_problems.append(
                        f"tensor {meta.name} in {meta.shard} differs from the source; it must be copied bit for bit "
                        "(engines use it as it is stored)"
                    )
            for qw in (qw for qw in usable if qw.weight.shard == shard):
                slot = buffers.slot(len(rows) + (pending is not None))  # not the pending weight's
                checking = _start(qw, reader, src_reader, source_of(sources, qw), pool, workers, slot)
                if pending is not None:
                    finish(pending)
                pending = checking
        if pending is not None:
            finish(pending)
    if src is None:
        return sorted(rows, key=lambda r: natural_key(r.name)), exact_problems + value_problems
    rows = _flag_outliers(rows)
    value_problems += [f"tensor {r.name}: {r.flagged}" for r in rows if r.flagged]
    return sorted(rows, key=lambda r: -(r.rel_error or 0.0)), exact_problems + value_problems


@contextmanager
def _pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """The checking threads, with one torch thread each (our threads use the cores; torch's own would only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fp8q-verify")
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


class _Buffers:
    """The memory weights are read into, reused: two weights' worth (the one read and the one being checked), each
    grown to the largest read so far. A fresh allocation per read would cost the kernel a page fault every 4 KB read
    (on a VM: more system time than the checks took)."""

    def __init__(self) -> None:
        self._memory: dict[tuple[int, str], torch.Tensor] = {}

    def slot(self, n: int) -> Callable[[str, TensorMeta], torch.Tensor]:
        """The buffers of the n-th weight read: a function of what is read (`q`, `scale`, `source`) and its header."""

        def get(role: str, meta: TensorMeta) -> torch.Tensor:
            key = (n % 2, role)
            buf = self._memory.get(key)
            if buf is None or buf.numel() < meta.nbytes:
                buf = self._memory[key] = torch.empty(meta.nbytes, dtype=torch.uint8)
            return buf

        return get


def _nbytes(qw: QuantizedWeight) -> int:
    return qw.weight.nbytes + (qw.scale.nbytes if qw.scale is not None else 0)


# What a band of a weight's rows tells: its squared error and squared source summed, and its largest error.
_BandSums = tuple[float, float, float]


class _Overflow(Exception):
    """A product of the client's overflowed to inf in a band."""


@dataclass
class _Checking:
    """A weight being checked: its row, a problem found before any arithmetic, or the pool's work on its rows."""

    qw: QuantizedWeight
    row: TensorCheck
    problem: str | None = None
    parts: list[Future[list[_BandSums]]] | None = None
    compared: bool = False
    client: torch.dtype = torch.float32  # the dtype the client multiplies in (named when it overflows)

    def result(self) -> tuple[TensorCheck, str | None]:
        """The row and the problem, once the pool is done with the weight."""
        if self.problem is not None or self.parts is None:
            return self.row, self.problem
        try:
            bands = [band for part in self.parts for band in part.result()]  # in row order, whatever the workers
        except _Overflow:
            assert self.qw.scale is not None
            return self.row, (
                f"tensor {self.qw.scale.name} in {self.qw.scale.shard} makes {self.qw.weight.name} overflow to inf "
                f"in the {str(self.client).removeprefix('torch.')} its client computes in; quantize it again"
            )
        if not self.compared:
            return self.row, None
        diff_sq = ref_sq = max_abs = 0.0
        for band in bands:  # one order of additions: the same figures with any number of workers
            diff_sq, ref_sq, max_abs = diff_sq + band[0], ref_sq + band[1], max(max_abs, band[2])
        rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
        snr = math.inf if diff_sq == 0 else (10 * math.log10(ref_sq / diff_sq) if ref_sq > 0 else -math.inf)
        return replace(self.row, rel_error=rel, max_abs_error=max_abs, snr_db=snr), None


def _start(
    qw: QuantizedWeight,
    reader: ShardReader,
    src_reader: ShardReader,
    origin: SourceTensor | None,
    pool: ThreadPoolExecutor,
    workers: int,
    buffer: Callable[[str, TensorMeta], torch.Tensor],
) -> _Checking:
    """Read a weight (its scale, with a source its source values) into `buffer`s and hand its rows to the pool."""
    assert qw.scale is not None and qw.layout is not None
    layout = qw.layout
    scale = reader.read(qw.scale, buffer("scale", qw.scale))
    values = scale.float()
    finite = values[torch.isfinite(values)]
    row = TensorCheck(
        qw.weight.name,
        layout_words(layout),
        qw.weight.shape,
        float(finite.min()) if finite.numel() else math.nan,
        float(finite.max()) if finite.numel() else math.nan,
    )
    q = reader.read(qw.weight, buffer("q", qw.weight))
    problem = value_problem(qw, q, scale)
    if problem:
        return _Checking(qw, row, problem)
    w = origin.load(src_reader, buffer("source", origin.source)) if origin is not None else None
    overflow = numerics.may_overflow(scale, layout)
    if w is None and not overflow:
        return _Checking(qw, row)  # nothing left to compute: the scales alone cleared it
    in_float32 = not isinstance(layout, InputLayout) and numerics.client_in_float32(scale, layout)
    rows, cols = q.shape
    bands = list(numerics.row_bands(rows, cols, layout, numerics.CHECK_ELEMENTS))
    shares = numerics.split_rows(len(bands), 1, workers)  # contiguous runs of bands, one per worker
    parts = [pool.submit(_check_bands, q, scale, w, layout, bands[a:b], in_float32, overflow) for a, b in shares]
    return _Checking(qw, row, parts=parts, compared=w is not None, client=layout.client_dtype(scale.dtype))


def _check_bands(
    q: torch.Tensor,
    scale: torch.Tensor,
    w: torch.Tensor | None,
    layout: Layout,
    bands: list[tuple[int, int, slice | EllipsisType]],
    in_float32: bool,
    overflow: bool,
) -> list[_BandSums]:
    """Bands of a weight's rows (`numerics.row_bands`): the client's values (float32 where they are exact there),
    whether any overflows (`overflow`: the scales could not rule it out), and with the source `w` each band's sums.

    Raises:
        _Overflow: a value overflowed to inf in the client's dtype.
    """
    sums = []
    for a, b, scale_rows in bands:
        if in_float32:
            x = numerics.client_values(q[a:b], scale[scale_rows], layout)
        else:
            x = numerics.dequantize(q[a:b], scale[scale_rows], layout, torch.float64, strict=True)
        if overflow and not bool(torch.isfinite(x).all()):
            raise _Overflow
        if w is None:
            continue
        band = _band_sums(x, w[a:b])
        if x.dtype == torch.float32 and not _holds(band):
            exact = numerics.dequantize(q[a:b], scale[scale_rows], layout, torch.float64, strict=True)
            band = _band_sums(exact, w[a:b])
        sums.append(band)
    return sums


def _band_sums(x: torch.Tensor, w: torch.Tensor) -> _BandSums:
    """Squared error, squared source and largest error of a band: `x` the client's values (overwritten), `w` the
    source's, compared in x's dtype."""
    ref = w.to(x.dtype).reshape(-1)
    diff = x.reshape(-1).sub_(ref)
    if not diff.numel():
        return 0.0, 0.0, 0.0
    largest = max(-float(diff.amin()), float(diff.amax()))  # two reductions: faster than aminmax or abs().amax()
    return float(torch.dot(diff, diff)), float(torch.dot(ref, ref)), largest


def _holds(band: _BandSums) -> bool:
    """Whether a band's float32 sums are good to about 1e-7 (see `_SUM_LOW`): each one 0 with nothing in it (no
    error at all), or within [2^-60, 2^100]."""
    diff_sq, ref_sq, max_abs = band
    diff_ok = (diff_sq == 0 and max_abs == 0) or _SUM_LOW <= diff_sq <= _SUM_HIGH
    return diff_ok and _SUM_LOW <= ref_sq <= _SUM_HIGH


# Tensors engines use as they are stored, which a conversion must copy bit for bit: MoE routing biases and gates
# (a downcast e_score_correction_bias mis-routes tokens), SSM and conv parameters, attention sinks, scales of
# norms and experts.
_EXACT = re.compile(
    r"(e_score_correction_bias|\.sinks|A_log|dt_bias|\.D|conv1d\.(weight|bias)|per_expert_scale|router\.scale"
    r"|shared_expert_gate\.weight|\.gate\.weight|router(\.layer)?\.(weight|bias)|layer_scalar)$"
)
_EXACT_MAX_BYTES = 64 << 20


def _exact_pairs(
    checkpoint: Checkpoint, src: Checkpoint, detected: DetectedLayout
) -> list[tuple[TensorMeta, TensorMeta]]:
    """Every tensor that must not change (1-D ones, routers, SSM parameters, ...) with the source tensor it must
    equal byte for byte; read and compared with the weights, shard by shard."""
    fp8, dropped = {qw.weight.name for qw in detected.weights}, detected.dropped
    pairs = []
    for name, meta in sorted(checkpoint.tensors.items(), key=lambda kv: natural_key(kv[0])):
        origin = src.tensors.get(name)
        exact = len(meta.shape) <= 1 or _EXACT.search(name)
        if not exact or name in fp8 or name in dropped or origin is None or meta.nbytes > _EXACT_MAX_BYTES:
            continue
        if (origin.dtype, origin.shape) != (meta.dtype, meta.shape):
            continue  # reported by check_against_source
        pairs.append((meta, origin))
    return pairs


def _flag_outliers(rows: list[TensorCheck]) -> list[TensorCheck]:
    """Flag errors that are large outright, or far above the checkpoint's median."""
    errors = [r.rel_error for r in rows if r.rel_error is not None and math.isfinite(r.rel_error)]
    median = statistics.median(errors) if errors else 0.0
    flagged = []
    for r in rows:
        why = None
        if r.rel_error is not None and r.snr_db is not None:
            numbers = f"relative error {r.rel_error:.4f}, SNR {r.snr_db:.1f} dB, max abs error {r.max_abs_error:.4g}"
            if r.rel_error > MAX_REL_ERROR or r.snr_db < MIN_SNR_DB:
                why = f"{numbers}: far from the source (limits {MAX_REL_ERROR} / {MIN_SNR_DB} dB)"
            elif r.rel_error > max(OUTLIER_FACTOR * median, OUTLIER_FLOOR):
                why = f"{numbers}: more than {OUTLIER_FACTOR:g}x the median {median:.4f} of the checkpoint"
        flagged.append(replace(r, flagged=why))
    return flagged


__all__ = ["MIN_SNR_DB", "TensorCheck", "check_values"]
