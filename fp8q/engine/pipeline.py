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
    stages.run_plan                      reader, quantization and writer threads (see stages.py)
    all processes agree the run succeeded (torchrun), then rank 0 writes
        index, config.json, side files, fp8q.json
    rename OUT.partial -> OUT
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fp8q import __version__
from fp8q.dtypes import config_name
from fp8q.engine.devices import resolve_device
from fp8q.engine.distributed import Cluster, Watcher, assign
from fp8q.engine.stages import LocalShards, ShardFiles, run_plan
from fp8q.engine.tensor_io import Stopped
from fp8q.errors import (
    CheckpointError,
    Fp8qError,
    Interrupted,
    OutputError,
    write_error,
)
from fp8q.events import Downloaded, DownloadStarted, Event, EventCallback, PlanReady, Report, TensorDone
from fp8q.layouts import DEFAULT_BLOCK, find
from fp8q.layouts.base import Layout
from fp8q.output.manifest import Progress, fingerprint, reusable_shards, write_manifest
from fp8q.output.model_card import CARD_FILE, CardInput
from fp8q.output.model_card import render as render_card
from fp8q.output.writer import (
    MANIFEST_FILE,
    STAGING_DIR,
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
from fp8q.plan.checks import is_moe_plan, plan_notes, plan_problems, run_findings, unservable_reason
from fp8q.plan.fp8_source import check_convertible, detect_fp8, output_dtype, source_layouts
from fp8q.plan.planner import Plan, make_plan
from fp8q.source.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    hub_snapshot,
    read_bounded,
    read_checkpoint,
    read_config,
)

if TYPE_CHECKING:  # imported at run time only for a Hub repo: they bring huggingface_hub
    from fp8q.source.streaming import HubStream


# What a tokenizer ships as (transformers' AutoTokenizer finds one of these).
TOKENIZER_FILE = re.compile(r"tokenizer(_config)?\.json|tokenizer\.model|vocab\.json|.*\.tiktoken")


class Mode(str, Enum):
    """What a run makes: the one engine's three conversions differ only in their plan."""

    QUANTIZE = "quantize"  # a bf16/fp16/fp32 checkpoint -> FP8
    DEQUANTIZE = "dequantize"  # an FP8 checkpoint -> high precision, no quantization_config
    CONVERT = "convert"  # an FP8 checkpoint -> another FP8 layout: dequantize, then quantize


@dataclass(frozen=True)
class QuantizeOptions:
    """What to produce and how. `workers` 0 means one per CPU core."""

    scheme: str = "channel"  # --scheme, --format, --scale-format: the words fp8q.layouts.find takes
    format: str = "compressed-tensors"
    block_size: tuple[int, int] = DEFAULT_BLOCK
    scale_format: str = "float"
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
        """The layout these options ask for.

        Raises:
            UsageError: there is no such layout.
        """
        return find(self.scheme, self.format, self.scale_format, tuple(self.block_size))  # type: ignore[arg-type]

    def output_affecting(self, mode: Mode, dtype: str | None) -> dict[str, Any]:
        """The options that decide the output bytes (device and workers do not: same bits everywhere)."""
        decided: dict[str, Any] = {"command": mode.value}
        if mode is not Mode.DEQUANTIZE:
            layout = self.layout
            decided |= {
                "scheme": layout.scheme.value,
                "format": layout.format.value,
                "block_size": list(self.block_size),
                "scale_format": layout.scale_format.value,
                "ignore": list(self.ignore),
                "targets": list(self.targets),
            }
        if dtype is not None:
            decided["dtype"] = config_name(dtype)
        return decided


def local_source(src: str | Path, revision: str | None = None) -> Path:
    """SRC as a local path. A Hub repo id is resolved by fp8q.source.hub, imported only then: it brings
    huggingface_hub, a fifth of a second of start-up that a local conversion need not pay."""
    source = open_source(src, revision, stream=False)
    assert isinstance(source, Path)
    return source


def open_source(src: str | Path | HubStream, revision: str | None = None, *, stream: bool = True) -> Path | HubStream:
    """SRC as a local path or, for a Hub repo whose weights are not all in the cache (and `stream`), a HubStream:
    the side files downloaded, the missing shards known from their headers alone (fp8q.source.streaming)."""
    if not isinstance(src, (str, Path)):
        return src
    if revision is None and Path(src).exists():
        return Path(src)
    from fp8q.source.hub import resolve_source

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
    return replace(plan, problems=tuple(problems), notes=tuple(plan_notes(plan, options.load_check)))


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
    partial = out  # OUT.partial/ once OUT is checked: an error before then is raised by cluster.agree
    reused: dict[str, Any] = {}
    source_card: str | None = None
    findings: list[str] = []  # rank 0's, from every shard's statistics
    error: BaseException | None = None
    try:
        out = output_path(out)
        partial = partial_dir(out)
        source = open_source(src, options.revision)
        plan = plan_conversion(source, replace(options, revision=None), mode)
        if plan.problems:
            raise Fp8qError(refusal(plan.problems))
        source_card = _source_card(plan) if options.model_card and lead else None
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
    staging = partial / f"{STAGING_DIR}-{cluster.rank}"  # where this process downloads a streamed repo's shards
    files = _shard_files(source, [s.name for s in plan.shards if s.name not in skip], options, emit, staging)
    cleanup.callback(files.close)  # stops downloading and deletes what was downloaded, if not done below
    workers = worker_count(options.workers, cluster.local_world)
    with _stop_on_signals(stop) as caught:
        failure: BaseException | None = None
        try:
            run_emit = emit if cluster.is_single else _count_bytes(cluster)
            with Watcher(cluster, stop, (lambda n: emit(TensorDone("", n))) if lead else None):
                run_plan(plan, partial, device, workers, run_emit, stop, progress, skip, files, options.load_check)
        except BaseException as e:
            failure = e
            cluster.mark_failed()
        finally:
            files.close()  # before OUT.partial/ can become OUT: the staging folder in it goes
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
                stats = {name: st for entry in done.values() for name, st in entry["tensors"].items()}
                findings = run_findings(stats)
                card = _card_input(plan, src, out, options, mode, stats, source_card) if options.model_card else None
                try:
                    _write_metadata_files(plan, partial, card)
                    write_manifest(partial, fp, done, timings)
                    # The run's records leave OUT.partial/ just before it becomes OUT, and come back if that fails.
                    aside = progress.set_aside()
                    try:
                        finalize(partial, out, options.overwrite)
                    except BaseException:
                        progress.put_back(aside)
                        raise
                    remove_tree(aside)
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
        notes=list(plan.notes),
        findings=findings,
    )


def worker_count(asked: int, processes: int = 1) -> int:
    """CPU quantization threads: as asked (0: the cores shared among this node's processes), never more than the
    cores this process may run on: more threads than cores only wait on each other (10000 ran 9x slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(asked or cores // processes, cores))


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
    except OSError as e:  # a read-only disk or folder, a name too long with ".partial" added, ...
        raise OutputError(f"{partial}: cannot be created ({e.strerror or e}); write the output elsewhere") from None
    lock = lock_partial(partial)
    try:
        reused: dict[str, Any] = {}
        if not fresh:
            if not options.resume:
                raise OutputError(
                    f"{partial}: left by an interrupted run; pass --resume to continue it, or delete it to start over"
                )
            reused = reusable_shards(partial, fp, source_stat)
            for staging in partial.glob(f"{STAGING_DIR}-*"):  # downloads a killed run left (the lock is ours)
                remove_tree(staging)
        shards = [s.size for s in plan.shards if s.name not in reused]
        download = _download_space(source, reused, partial, options.keep_download)
        check_free_space(out, shards + _metadata_sizes(plan), download)
        Progress(partial, fp).start(source_stat)
    except BaseException:
        os.close(lock)
        if fresh:
            remove_tree(partial)
        raise
    return reused, lock


def _download_space(
    source: Path | HubStream, reused: dict[str, Any], partial: Path, keep: bool
) -> tuple[Path, list[int]] | None:
    """Where a streamed run downloads (its staging folders in OUT.partial/, or the Hugging Face cache where the
    downloads are kept), and the most it holds there at once: its two largest shards."""
    if isinstance(source, Path):
        return None
    return (source.folder if keep else partial), source.most_on_disk(set(reused))


def _shard_files(
    source: Path | HubStream, order: list[str], options: QuantizeOptions, emit: EventCallback, staging: Path
) -> ShardFiles:
    """Where the reader finds each shard: the downloads of a streamed Hub repo (into `staging`, a folder of this
    run's own, unless kept in the Hugging Face cache), or the folder's own files."""
    if isinstance(source, Path):
        return LocalShards()
    from fp8q.source.hub import explain
    from fp8q.source.streaming import ShardDownloads

    on_bytes = lambda name, n: emit(Downloaded(name, n))  # noqa: E731
    files = ShardDownloads(source, order, options.keep_download, on_bytes, explain, staging)
    if files.total_bytes:
        emit(DownloadStarted(files.total_bytes, len(files.order)))
    return files


def _metadata_sizes(plan: Plan) -> list[int]:
    """The files the run writes beside the shards: side files, index, config and manifest (upper bounds)."""
    side = [(plan.checkpoint.root / f).stat().st_size for f in plan.checkpoint.side_files]
    index = len(json.dumps(plan.index(), indent=2).encode()) + 1
    config = len(json.dumps(plan.config, indent=2, ensure_ascii=False).encode()) + 1 if plan.config else 0
    # fp8q.json: a line of statistics per quantized weight, a hash per file, the fingerprint.
    manifest = 4096 + 400 * plan.n_quantized + 200 * (len(plan.shards) + len(plan.checkpoint.side_files))
    return [*side, index, config, manifest]


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
    """Clean up after a failed run: once a shard is recorded, every failure keeps OUT.partial/ for `--resume`
    (an interruption, a read or write error, a source changed or gone, bad data in a later shard, a refused final
    rename); a run that recorded nothing removes it."""
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
    if not done:
        remove_tree(partial)
        return e
    if isinstance(e, Fp8qError):
        kept = type(e)(f"{e}; {len(done)} finished shard(s) kept in {partial}: rerun with --resume")
        kept.exit_code = e.exit_code
        return kept
    return e  # a bug: its traceback is worth more than the line, and the finished shards are kept all the same


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
            copy_file(root / name, partial / name, plan.checkpoint.side_ids.get(name))
    if card is not None:
        write_text(partial / CARD_FILE, render_card(card))


def _source_card(plan: Plan) -> str | None:
    """The source's README.md, for the output's model card to carry; read before any weight is.

    Raises:
        CheckpointError: it cannot be read as UTF-8 text (or is far too large to be a card).
    """
    if CARD_FILE not in plan.checkpoint.side_files:
        return None
    path = plan.checkpoint.root / CARD_FILE
    try:
        return read_bounded(path, planned=plan.checkpoint.side_ids.get(CARD_FILE)).decode("utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); fix it, or pass --no-model-card") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text; fix it, or pass --no-model-card") from None


def _card_input(
    plan: Plan,
    src: str | Path,
    out: Path,
    options: QuantizeOptions,
    mode: Mode,
    stats: dict[str, Any],
    source_card: str | None,
) -> CardInput:
    """What the output's model card says, from the plan and the finished shards' statistics (fp8q.json's figures)."""
    is_repo = not Path(src).exists()
    revision = options.revision if is_repo else None
    folder = Path(src) if Path(src).is_dir() else Path(src).parent
    base = str(src) if is_repo else folder.resolve().name
    snapshot = hub_snapshot(folder) if not is_repo else None
    if snapshot is not None:  # a Hub cache snapshot given as a path: the repo it is, at its commit
        base, revision, is_repo = *snapshot, True
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
        stats=stats,
        version=__version__,
        source_card=source_card,
        moe=is_moe_plan(plan),
        unservable=unservable_reason(plan),
        tokenizer=any(TOKENIZER_FILE.fullmatch(name) for name in plan.checkpoint.side_files),
    )


__all__ = ["Fp8qError", "PlanReady", "QuantizeOptions", "Report", "TensorDone", "plan_conversion", "quantize"]
