"""The one engine: every conversion (quantize, dequantize, convert) is read -> transform -> write, in three
threads with bounded queues; the three differ only in their plan, whose jobs say what happens to each tensor
(keep: copied file to file; quantize; dequantize; requantize: dequantize, then quantize).

Imports: everything below it; never prints. Lifecycle of `run(src, out, options, mode)`:

    open_source(src)                     a local path; a Hub repo id from the cache, or streamed: side files
                                         and shard headers now, each shard downloaded as the reader nears it
    read_checkpoint(src)                 headers + index, validated; no tensor data
    make_plan(checkpoint, layout, ...)   every output name, dtype, shape, offset, header, config
    check_output / check_free_space      nothing written yet; under torchrun, rank 0 only
    OUT.partial/, locked  (+ --resume: keep the recorded shards that still hash the same)
        reader thread    shard by shard, tensor by tensor: read a tensor into a pooled (pinned) buffer,
                         and an FP8 weight's scale from whichever shard holds it
        main thread      dequantize it (CPU), quantize it (CPU chunks on worker threads, or CUDA streams)
        writer thread    pwrite weight + scale at planned offsets; once a shard is written, delete
                         its source if it was streamed
        copy thread      as each shard opens, copy its tensors kept whole file to file
        shard threads    flush each finished shard, hash it, record it for --resume
    all processes agree the run succeeded (torchrun), then rank 0 writes
        index, config.json, side files, fp8q.json
    rename OUT.partial -> OUT

Memory: the buffer pools bound what is alive whatever the model size: three input buffers the
size of the largest weight (one being read, one queued, one being quantized) and a few output
buffers for quantized weights (one byte per element) on their way to disk.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fp8q import __version__
from fp8q.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    changed_since_read,
    hub_snapshot,
    read_checkpoint,
    read_config,
)
from fp8q.checks import plan_notes, plan_problems
from fp8q.distributed import Cluster, Watcher, assign
from fp8q.dtypes import ITEMSIZE, NAME_OF, TORCH_DTYPE, config_name
from fp8q.errors import (
    CheckpointError,
    Fp8qError,
    Interrupted,
    OutputError,
    UnsupportedTensorError,
    read_error,
    write_error,
)
from fp8q.events import Downloaded, DownloadStarted, Event, EventCallback, PlanReady, Report, TensorDone
from fp8q.formats import Format, Layout, ScaleFormat, Scheme
from fp8q.fp8_source import check_convertible, detect_fp8, output_dtype, source_layouts
from fp8q.layouts import QuantizedWeight, value_problem
from fp8q.manifest import FileHasher, Progress, fingerprint, reusable_shards, write_manifest
from fp8q.model_card import CARD_FILE, CardInput
from fp8q.model_card import render as render_card
from fp8q.numerics import FP8, NonFiniteWeight
from fp8q.plan import Action, Job, Plan, make_plan
from fp8q.quantizer import dequantize_into, make_quantizer, resolve_device
from fp8q.tensor_io import BufferPool, ShardReader, Stopped, read_ahead, read_tensor, typed_view
from fp8q.writer import (
    MANIFEST_FILE,
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
    write_text,
)

if TYPE_CHECKING:  # imported at run time only for a Hub repo: they bring huggingface_hub
    from fp8q.streaming import HubStream, ShardDownloads

# The reader keeps the kernel fetching this far ahead of it, so the disk works while it waits for a
# free buffer (measured on a cold cache: 256 MiB as fast as more).
READ_AHEAD = 256 << 20


class Mode(str, Enum):
    """What a run makes: the one engine's three conversions differ only in their plan."""

    QUANTIZE = "quantize"  # a bf16/fp16/fp32 checkpoint -> FP8
    DEQUANTIZE = "dequantize"  # an FP8 checkpoint -> high precision, no quantization_config
    CONVERT = "convert"  # an FP8 checkpoint -> another FP8 layout: dequantize, then quantize


@dataclass(frozen=True)
class QuantizeOptions:
    """What to produce and how. `workers` 0 means one per CPU core."""

    scheme: Scheme = Scheme.CHANNEL
    format: Format = Format.COMPRESSED_TENSORS
    block_size: tuple[int, int] = (128, 128)
    scale_format: ScaleFormat = ScaleFormat.FLOAT
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    device: str = "auto"
    workers: int = 0
    overwrite: bool = False
    resume: bool = False
    revision: str | None = None  # for a Hub repo id
    tp: int | None = None  # check that block layouts load in vLLM at this tensor-parallel size (None: 1)
    load_check: bool = True  # False writes block layers vLLM could not load (the user's explicit choice)
    config: str | None = None  # a config.json to use when SRC has none
    # dequantize and convert: the dtype FP8 weights are dequantized to (None: the config's, else bfloat16)
    dtype: str | None = None
    model_card: bool = True  # False copies the source's README.md unchanged instead of writing a card
    keep_download: bool = False  # a streamed Hub repo: keep the shards downloaded in the cache

    @property
    def layout(self) -> Layout:
        block = tuple(self.block_size)
        return Layout(Scheme(self.scheme), Format(self.format), block, ScaleFormat(self.scale_format))  # type: ignore[arg-type]

    def output_affecting(self, mode: Mode, dtype: str | None) -> dict[str, Any]:
        """The options that decide the output bytes (device and workers do not: same bits everywhere)."""
        decided: dict[str, Any] = {"command": mode.value}
        if mode is not Mode.DEQUANTIZE:
            layout = self.layout
            decided |= {
                "scheme": layout.scheme.value,
                "format": layout.format.value,
                "block_size": list(layout.block),
                "scale_format": layout.scale_format.value,
                "ignore": list(self.ignore),
                "targets": list(self.targets),
            }
        if dtype is not None:
            decided["dtype"] = config_name(dtype)
        return decided


def local_source(src: str | Path, revision: str | None = None) -> Path:
    """SRC as a local path. A Hub repo id is resolved by fp8q.source, imported only then: it brings
    huggingface_hub, a fifth of a second of start-up that a local conversion need not pay."""
    source = open_source(src, revision, stream=False)
    assert isinstance(source, Path)
    return source


def open_source(src: str | Path | HubStream, revision: str | None = None, *, stream: bool = True) -> Path | HubStream:
    """SRC as a local path or, for a Hub repo whose weights are not all in the cache (and `stream`), a HubStream:
    the side files downloaded, the missing shards known from their headers alone (fp8q.streaming)."""
    if not isinstance(src, (str, Path)):
        return src
    if revision is None and Path(src).exists():
        return Path(src)
    from fp8q.source import resolve_source

    return resolve_source(str(src), revision, stream=stream)


def source_folder(source: Path | HubStream) -> Path:
    return source if isinstance(source, Path) else source.folder


def plan_conversion(src: str | Path | HubStream, options: QuantizeOptions, mode: Mode = Mode.QUANTIZE) -> Plan:
    """Read and validate SRC and plan the conversion, reading no tensor data (of a Hub repo not in the local
    cache, only the side files and the shards' headers are fetched). `plan.problems` lists why the output could
    not be served (a run refuses them), `plan.notes` what else to know."""
    source = open_source(src, options.revision)
    remote = None if isinstance(source, Path) else source.remote
    checkpoint = read_checkpoint(source_folder(source), remote)
    if options.config is not None:
        checkpoint = replace(checkpoint, config=read_config(Path(options.config)))
    if mode is Mode.QUANTIZE:
        plan = make_plan(checkpoint, options.layout, options.ignore, options.targets)
    else:
        fp8 = detect_fp8(checkpoint)
        dtype = output_dtype(options.dtype, checkpoint.config)
        layout = options.layout if mode is Mode.CONVERT else None
        if mode is Mode.CONVERT:
            check_convertible(checkpoint, fp8, options.layout)
        plan = make_plan(checkpoint, layout, options.ignore, options.targets, source=fp8, dtype=dtype)
    if remote:
        _check_streamable(plan, remote)
    problems = plan_problems(plan, options.tp, options.load_check)
    return replace(plan, problems=tuple(problems), notes=tuple(plan_notes(plan)))


def _check_streamable(plan: Plan, remote: dict[str, Any]) -> None:
    """A streamed run reads one shard at a time: an FP8 weight whose scale lives in another shard cannot be."""
    for job in plan.jobs:
        if job.scale is not None and job.scale.shard != job.source.shard and job.scale.shard in remote:
            raise CheckpointError(
                f"tensor {job.source.name} in {job.source.shard} has its scale {job.scale.name} in "
                f"{job.scale.shard}, and a Hub repo is streamed one shard at a time: download it first "
                "(`hf download REPO`), then convert it"
            )


def quantize(
    src: str | Path,
    out: str | Path,
    options: QuantizeOptions | None = None,
    on_event: EventCallback | None = None,
) -> Report:
    """Convert the checkpoint at SRC into an FP8 checkpoint at OUT.

    Under `torchrun`, every process calls this with the same arguments: each converts its share of
    the shards (balanced by bytes) on its own device, and rank 0 writes the rest once all are done.

    Args:
        src: a checkpoint folder, a single `.safetensors` file, or a Hub repo id.
        out: the folder to create; it appears only once complete.
        options: scheme, format, device and the rest; defaults to per-channel compressed-tensors.
        on_event: called with `PlanReady` once, then `TensorDone` per tensor (from a worker thread);
            under torchrun only on rank 0, for the bytes of all processes.

    Raises:
        Fp8qError: any problem with the input, options or output, naming the file or tensor.
    """
    return run(src, out, options or QuantizeOptions(), on_event, Mode.QUANTIZE)


def dequantize(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    resume: bool = False,
    device: str = "cpu",
    revision: str | None = None,
    model_card: bool = True,
    keep_download: bool = False,
    on_event: EventCallback | None = None,
) -> Report:
    """Write the FP8 checkpoint at SRC (any layout fp8q detects) as a `dtype` checkpoint at OUT that loads with
    no quantization library: each FP8 weight dequantized as its format's client does, scales dropped,
    `quantization_config` removed from config.json (which then says the new dtype); streaming, atomic and
    resumable like `quantize`.

    Raises:
        Fp8qError: no FP8 weight in SRC, an FP8 weight without a usable scale, NaN codes or values `dtype`
            cannot hold, an OUT that cannot be written; one line naming the file or tensor.
    """
    options = QuantizeOptions(
        dtype=dtype,
        overwrite=overwrite,
        resume=resume,
        device=device,
        revision=revision,
        model_card=model_card,
        keep_download=keep_download,
    )
    return run(src, out, options, on_event, Mode.DEQUANTIZE)


def convert(
    src: str | Path,
    out: str | Path,
    options: QuantizeOptions | None = None,
    on_event: EventCallback | None = None,
) -> Report:
    """Convert the FP8 checkpoint at SRC (any layout fp8q detects) into another FP8 layout at OUT, in one pass:
    each FP8 weight dequantized as its format's client does, to `options.dtype` (default: the config's dtype),
    then quantized as `quantize` does. The result is byte for byte what `dequantize` then `quantize` make.

    Raises:
        Fp8qError: as `quantize`; also a source whose conversion would silently lose what it holds
            (static activation or KV-cache scales) or that is already in the target layout.
    """
    return run(src, out, options or QuantizeOptions(), on_event, Mode.CONVERT)


def run(
    src: str | Path, out: str | Path, options: QuantizeOptions, on_event: EventCallback | None, mode: Mode
) -> Report:
    """The engine: plan, then read -> transform on a device -> write, for any of the three conversions."""
    started = time.perf_counter()
    out = Path(out)
    device = resolve_device(options.device)
    cluster = Cluster.from_env(cuda=device.type == "cuda")
    try:
        with ExitStack() as cleanup:
            return _run(src, out, options, on_event, cluster, cluster.device(device), started, cleanup, mode)
    finally:
        cluster.close()


def _run(
    src: str | Path,
    out: Path,
    options: QuantizeOptions,
    on_event: EventCallback | None,
    cluster: Cluster,
    device: torch.device,
    started: float,
    cleanup: ExitStack,
    mode: Mode,
) -> Report:
    lead = cluster.rank == 0
    emit = (on_event if lead else None) or (lambda event: None)
    partial = partial_dir(out)
    reused: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        out = output_path(out)
        partial = partial_dir(out)
        source = open_source(src, options.revision)
        plan = plan_conversion(source, replace(options, revision=None), mode)
        if plan.problems:
            raise Fp8qError(refusal(plan.problems))
        fp = fingerprint(plan.checkpoint, options.output_affecting(mode, plan.dtype), __version__)
        if lead:
            reused, lock = _prepare_partial(plan, source, out, partial, fp, options)
            cleanup.callback(os.close, lock)  # releases OUT.partial/ (renamed to OUT by then if all went well)
    except Exception as e:  # noqa: BLE001 - handed to every process, then raised
        error = e
    cluster.agree(error)  # every process fails alike, before any data is read
    reused = cluster.broadcast(reused)
    todo = {s.name: s.source.size for s in plan.shards if s.name not in reused}
    mine = assign(todo, cluster.world)[cluster.rank]
    skip = {s.name for s in plan.shards} - mine

    emit(PlanReady(plan))
    for shard in (s for s in plan.shards if s.name in reused):
        for job in shard.jobs:
            emit(TensorDone(job.source.name, job.source.nbytes, shard.name))
    progress = Progress(partial, fp, cluster.rank)
    stop = threading.Event()
    files = _shard_files(source, [s.name for s in plan.shards if s.name not in skip], options, emit)
    cleanup.callback(files.close)  # stops downloading and deletes downloads no shard was made from
    workers = options.workers or max(1, (os.cpu_count() or 1) // cluster.local_world)
    with _stop_on_signals(stop) as caught:
        failure: BaseException | None = None
        try:
            run_emit = emit if cluster.is_single else _count_bytes(cluster)
            with Watcher(cluster, stop, (lambda n: emit(TensorDone("", n))) if lead else None):
                _run_plan(plan, partial, device, workers, run_emit, stop, progress, skip, files)
        except BaseException as e:
            failure = e
            cluster.mark_failed()
        if caught and failure is None:
            failure = Stopped()
        try:
            cluster.agree(_interrupted(caught) if caught else failure)
            if lead:
                done = progress.done()
                timings = {
                    "seconds": round(time.perf_counter() - started, 3),
                    "processes": cluster.world,
                    # Which process made each shard (under torchrun), or an earlier run for a reused one.
                    "shards": {name: {"rank": entry["rank"], "reused": name in reused} for name, entry in done.items()},
                }
                card = _card_input(plan, src, out, options, mode, done) if options.model_card else None
                try:
                    _write_metadata_files(plan, partial, card)
                    write_manifest(partial, fp, done, timings)
                    progress.clear()
                    finalize(partial, out)
                except OSError as e:
                    raise write_error(partial, e) from None
        except BaseException as e:
            raise (_failed(e, caught, partial, progress) if lead else e) from None
    return Report(
        out=str(out),
        device=str(device),
        tensors_quantized=plan.n_quantized,
        tensors_kept=plan.n_kept,
        bytes_in=plan.bytes_in,
        bytes_out=plan.bytes_out,
        seconds=time.perf_counter() - started,
        ignored_modules=list(plan.ignored),
        resumed_shards=len(reused),
        tensors_dequantized=plan.n_dequantized,
        tensors_dropped=len(plan.source.dropped) if plan.source else 0,
        dtype=config_name(plan.dtype) if plan.dtype else None,
        layouts=source_layouts(plan.source),
        bytes_downloaded=getattr(files, "total_bytes", 0),
        downloads_kept=options.keep_download,
    )


def refusal(problems: tuple[str, ...]) -> str:
    """The one line that refuses a plan with problems."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems, first: {problems[0]} (`fp8q inspect` with the same options lists them all)"


def _prepare_partial(
    plan: Plan, source: Path | HubStream, out: Path, partial: Path, fp: dict[str, Any], options: QuantizeOptions
) -> tuple[dict[str, Any], int]:
    """Check OUT and the disk, and set up and lock OUT.partial/; returns the shards a resumed run keeps
    and the descriptor that holds the lock (closed when the run ends)."""
    check_output(source_folder(source), out, options.overwrite)
    source_stat = [shard.source.stat_record() for shard in plan.shards]
    try:
        partial.mkdir(parents=True)
        fresh = True
    except FileExistsError:
        fresh = False
    lock = lock_partial(partial)
    try:
        reused: dict[str, Any] = {}
        if not fresh:
            if not options.resume:
                raise OutputError(
                    f"{partial}: left by an interrupted run; pass --resume to continue it, or delete it to start over"
                )
            reused = reusable_shards(partial, fp, source_stat)
        reused_bytes = sum(s.size for s in plan.shards if s.name in reused)
        check_free_space(out, plan.bytes_out - reused_bytes + _metadata_bytes(plan), _download_space(source, reused))
        Progress(partial, fp).start(source_stat)
    except BaseException:
        os.close(lock)
        if fresh:
            remove_tree(partial)
        raise
    return reused, lock


def _download_space(source: Path | HubStream, reused: dict[str, Any]) -> tuple[Path, int] | None:
    """Where a streamed run downloads, and the most it holds there at once: its two largest shards."""
    if isinstance(source, Path):
        return None
    return source.folder, source.most_on_disk(set(reused))


class _LocalShards:
    """The shard files of a checkpoint on disk: always there, never deleted."""

    def ready(self, name: str, stop: threading.Event) -> None:
        pass

    def done(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


def _shard_files(
    source: Path | HubStream, order: list[str], options: QuantizeOptions, emit: EventCallback
) -> _LocalShards | ShardDownloads:
    """What the reader waits on before it opens a shard, and the writer tells once a shard is written: the
    downloads of a streamed Hub repo, or nothing at all."""
    if isinstance(source, Path):
        return _LocalShards()
    from fp8q.source import explain
    from fp8q.streaming import ShardDownloads

    files = ShardDownloads(source, order, options.keep_download, lambda name, n: emit(Downloaded(name, n)), explain)
    if files.total_bytes:
        emit(DownloadStarted(files.total_bytes, len(files.order)))
    return files


def _metadata_bytes(plan: Plan) -> int:
    """What the run writes beside the shards: side files, index, config and manifest (an upper bound)."""
    side = sum((plan.checkpoint.root / f).stat().st_size for f in plan.checkpoint.side_files)
    index = len(json.dumps(plan.index(), indent=2).encode()) + 1
    config = len(json.dumps(plan.config, indent=2, ensure_ascii=False).encode()) + 1 if plan.config else 0
    # fp8q.json: a line of statistics per quantized weight, a hash per file, the fingerprint.
    manifest = 4096 + 400 * plan.n_quantized + 200 * (len(plan.shards) + len(plan.checkpoint.side_files))
    return side + index + config + manifest


def _count_bytes(cluster: Cluster) -> EventCallback:
    """Under torchrun, progress goes to the shared counter that rank 0 renders."""

    def count(event: Event) -> None:
        if isinstance(event, TensorDone):
            cluster.add_bytes(event.nbytes)

    return count


def _interrupted(caught: list[int]) -> Interrupted:
    signame = signal.Signals(caught[0]).name
    return Interrupted(f"interrupted by {signame}", 128 + caught[0])


def _failed(e: BaseException, caught: list[int], partial: Path, progress: Progress) -> BaseException:
    """Clean up after a failed run. Finished shards are kept for `--resume` when the run was
    interrupted or hit an I/O error, the cases where running again can succeed."""
    done = progress.done() if partial.exists() else {}
    interrupted = caught or isinstance(e, Interrupted)
    if interrupted:
        what = e if isinstance(e, Interrupted) else _interrupted(caught)
        if done:
            return Interrupted(
                f"{what}: {len(done)} finished shard(s) kept in {partial}; run again with --resume to continue",
                what.exit_code,
            )
        remove_tree(partial)
        return Interrupted(f"{what}: nothing was written", what.exit_code)
    if isinstance(e, (CheckpointError, OutputError)) and done:
        return type(e)(f"{e}; {len(done)} finished shard(s) kept in {partial}: rerun with --resume")
    remove_tree(partial)
    return e


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT and SIGTERM stop the run at the next tensor instead of killing it mid-write."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _write_metadata_files(plan: Plan, partial: Path, card: CardInput | None) -> None:
    root = plan.checkpoint.root
    if plan.checkpoint.has_index or len(plan.shards) > 1:
        write_json(partial / INDEX_FILE, plan.index())
    if plan.config is not None:
        write_json(partial / CONFIG_FILE, plan.config)
    # An FP8 source's fp8q.json describes its own run: this run writes its own. Its card gives way to ours.
    replaced = {MANIFEST_FILE} | ({CARD_FILE} if card is not None else set())
    for name in plan.checkpoint.side_files:
        if name not in replaced:
            copy_file(root / name, partial / name)
    if card is not None:
        write_text(partial / CARD_FILE, render_card(card))


def _card_input(
    plan: Plan, src: str | Path, out: Path, options: QuantizeOptions, mode: Mode, done: dict[str, Any]
) -> CardInput:
    """What the output's model card says, from the plan and the finished shards' records (fp8q.json's figures)."""
    is_repo = not Path(src).exists()
    revision = options.revision if is_repo else None
    folder = Path(src) if Path(src).is_dir() else Path(src).parent
    base = str(src) if is_repo else folder.resolve().name
    snapshot = hub_snapshot(folder) if not is_repo else None
    if snapshot is not None:  # a Hub cache snapshot given as a path: the repo it is, at its commit
        base, revision, is_repo = *snapshot, True
    card_path = plan.checkpoint.root / CARD_FILE
    source_card = None
    if CARD_FILE in plan.checkpoint.side_files:
        try:
            source_card = card_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{card_path}: cannot be read ({e}); fix it, or pass --no-model-card") from None
    return CardInput(
        command=mode.value,
        base=base,
        is_repo=is_repo,
        revision=revision,
        out_name=out.name,
        layout=plan.layout,
        source_layouts=list(source_layouts(plan.source)),
        dtype=plan.dtype,
        ignore=options.ignore,
        targets=options.targets,
        ignored_modules=plan.ignored,
        quantization_config=plan.quantization_config,
        tensors_quantized=plan.n_quantized,
        tensors_kept=plan.n_kept,
        tensors_dequantized=plan.n_dequantized,
        bytes_in=plan.bytes_in,
        bytes_out=plan.bytes_out,
        stats={name: stats for entry in done.values() for name, stats in entry["tensors"].items()},
        version=__version__,
        source_card=source_card,
    )


@dataclass
class _Item:
    shard: int
    job: Job | None  # None marks the end of a shard
    data: Any = None
    buffer: torch.Tensor | None = None  # the pool buffer behind the input `data`, handed back once used
    pool: BufferPool | None = None  # where `buffer` goes back to (None: the input pool)
    out_buffers: list[torch.Tensor] = field(default_factory=list)  # pool buffers behind quantized outputs
    scale: torch.Tensor | None = None  # an FP8 source weight's scale


def _run_plan(
    plan: Plan,
    partial: Path,
    device: torch.device,
    workers: int,
    emit: EventCallback,
    stop: threading.Event,
    progress: Progress,
    skip: set[str],
    files: _LocalShards | ShardDownloads,
) -> None:
    # dequantize quantizes nothing: any layout will do for its quantizer, which only dequantizes.
    quantizer = make_quantizer(plan.layout or Layout(Scheme.CHANNEL, Format.COMPRESSED_TENSORS), device, workers)
    # Three buffers each way: one being filled, one queued, one being used; memory stays bounded.
    quantized = [j for j in plan.jobs if j.action.quantizes]
    largest_weight = max((p.out.nbytes for j in quantized for p in j.pieces), default=0)
    pieces = max((len(j.pieces) for j in quantized), default=1)
    # A device that works on while the host goes on holds its weights' buffers longer.
    dequantized = max(
        (math.prod(j.source.shape) * ITEMSIZE[plan.dtype] for j in plan.jobs if j.action.dequantizes and plan.dtype),
        default=0,
    )
    pools = _Pools(
        BufferPool(plan.largest_quantized, 3 + quantizer.in_flight, quantizer.pin_memory),
        BufferPool(largest_weight, (2 + quantizer.in_flight) * pieces + 1, quantizer.pin_memory),
        BufferPool(dequantized, 3 + quantizer.in_flight, quantizer.pin_memory),
    )
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
        target=guarded(lambda: _write(plan, partial, to_write, stop, emit, pools, progress, files)),
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


def _read(
    plan: Plan,
    outbox: queue.Queue[_Item | None],
    stop: threading.Event,
    pool: BufferPool,
    skip: set[str],
    files: _LocalShards | ShardDownloads,
) -> None:
    with ShardReader(plan.checkpoint) as scales:  # FP8 weights' scales, from whichever shard holds them
        for index, shard in enumerate(plan.shards):
            if shard.name in skip:
                continue
            files.ready(shard.name, stop)  # a streamed shard: downloaded
            path = shard.source.path
            fd = os.open(path, os.O_RDONLY)
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


def _write(
    plan: Plan,
    partial: Path,
    inbox: queue.Queue[_Item | None],
    stop: threading.Event,
    emit: EventCallback,
    pools: _Pools,
    progress: Progress,
    files: _LocalShards | ShardDownloads,
) -> None:
    current: ShardFile | None = None
    hasher: FileHasher | None = None
    stats: dict[str, Any] = {}
    src_fd = -1
    # Each shard has a helper thread of its own that hashes it as its bytes land and flushes it once
    # finished: the writer never waits on the disk or the hash, and the hashing of a finished shard's
    # last bytes goes on beside that of the next (sha256 runs on one core per stream).
    syncer: ThreadPoolExecutor | None = None
    syncers: list[ThreadPoolExecutor] = []
    flushed: list[Future[None]] = []
    # Tensors kept whole (an embedding, lm_head: 1 GB each in an 8B model) are copied file to file by
    # a thread of their own, started as their shard opens, so the weights written meanwhile never
    # queue behind them; the shard is finished once they are in.
    copier = ThreadPoolExecutor(1, thread_name_prefix="fp8q-copy")
    copying: list[Future[None]] = []

    try:
        while (item := _get(inbox, stop)) is not None:
            shard = plan.shards[item.shard]
            path = partial / shard.name
            try:
                if current is None:
                    syncer = ThreadPoolExecutor(1, thread_name_prefix="fp8q-fsync")
                    syncers.append(syncer)
                    hasher = FileHasher(path)
                    current = ShardFile(path, shard, _hash_in_background(syncer, hasher))
                    src_fd = os.open(shard.source.path, os.O_RDONLY)
                    copying = [
                        copier.submit(current.copy, src_fd, j.source.start, j.pieces[0].out)
                        for j in shard.jobs
                        if j.is_copy
                    ]
                if item.job is None:
                    for copy in copying:
                        copy.result()  # an OSError of the copy's is raised here, and named below
                    copying = []
                    if changed_since_read(shard.source, os.fstat(src_fd)):
                        raise CheckpointError(
                            f"{shard.source.path}: changed while fp8q was converting it; run again once nothing "
                            "writes to the source"
                        )
                    assert syncer is not None
                    flushed.append(syncer.submit(_finish_shard, current, hasher, shard.name, stats, progress))
                    current, hasher, stats = None, None, {}
                    os.close(src_fd)
                    src_fd = -1
                    files.done(shard.name)  # a streamed shard's download is deleted: everything is read from it
                    continue
                job = item.job
                if job.is_copy:
                    pass  # on the copier since the shard opened
                elif not job.action.quantizes:
                    for piece, t in zip(job.pieces, item.data, strict=True):
                        current.write(piece.out, t)
                    if item.buffer is not None:  # a dequantized weight's
                        (item.pool or pools.inputs).give(item.buffer)
                        item.data = item.buffer = None
                else:
                    _write_quantized(current, job, item, stats, pools)
            except OSError as e:
                raise write_error(path, e) from None
            emit(TensorDone(job.source.name, job.source.nbytes, shard.name))
        for future in flushed:
            try:
                future.result()
            except OSError as e:
                raise write_error(partial, e) from None
    finally:
        copier.shutdown(wait=True, cancel_futures=True)  # before the files it copies between close
        for executor in syncers:
            executor.shutdown(wait=True)
        if current is not None:
            current.abort()
        if hasher is not None:
            hasher.close()
        if src_fd >= 0:
            os.close(src_fd)


def _write_quantized(shard: ShardFile, job: Job, item: _Item, stats: dict[str, Any], pools: _Pools) -> None:
    """Write a quantized weight and its scale once the device has them ready, and hand its buffers back."""
    for piece, done in zip(job.pieces, item.data, strict=True):
        assert piece.scale is not None
        try:
            done.wait()
        except NonFiniteWeight:
            raise _non_finite(job) from None
        shard.write(piece.out, done.q)
        shard.write(piece.scale, done.s)
        stats[piece.out.name] = {"shape": list(piece.out.shape), **done.stats()}
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


__all__ = ["Fp8qError", "PlanReady", "QuantizeOptions", "Report", "TensorDone", "plan_conversion", "quantize"]
