"""The one engine: every conversion is read -> transform -> write, in three threads with bounded queues
(stages.py), between a `prepare` that decides everything before any data is read and a `finish` that makes
OUT. Under torchrun every process runs it and the cluster is asked twice: once all have prepared, once all have
converted their share of the shards.

Imports: version, dtypes, errors, events, engine (options, planning, destinations, devices, distributed, finish, stages,
stalls, writing), output, plan, source. Lifecycle of `run(src, out, options, mode)`:

    prepare     open_source(src)           a Source: a local path; a Hub repo id from the cache, or streamed: side
                                           files and shard headers now, each shard downloaded as the reader nears it
                plan_conversion            headers + index, validated; every output name, dtype, shape, offset
                destinations: check        OUT, the Hub repo: nothing changed; under torchrun, rank 0 only
                OUT.partial/, locked       (+ --resume: keep the recorded shards that still hash the same); free
                                           space; then each destination opened (a missing repo created)
    convert     stages.run_plan            reader, quantization and writer threads, this process's shards, each
                                           finished one put to the destinations (uploaded); then drained
    finish      (rank 0, once all agree)   index, config.json, side files, model card, fp8q.json; each destination's
                                           commit (one Hub commit; the rename to OUT)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fp8q.dtypes import config_name
from fp8q.engine.destinations import ON_DISK_FOR_UPLOAD, destinations, run_fingerprint, up_to_date
from fp8q.engine.devices import resolve_device
from fp8q.engine.distributed import Cluster, Watcher, assign
from fp8q.engine.finish import Prepared, finish, metadata_sizes, output_names, source_card
from fp8q.engine.options import Mode, Options, worker_count
from fp8q.engine.planning import plan_conversion, refusal
from fp8q.engine.stages import run_plan
from fp8q.engine.stalls import Stalls
from fp8q.engine.writing import Outlet
from fp8q.errors import Fp8qError, Interrupted, OutputError, Stopped, UsageError, write_error
from fp8q.events import (
    Downloaded,
    DownloadStarted,
    Event,
    EventCallback,
    PlanReady,
    Report,
    ShardUploaded,
    Step,
    TensorDone,
    UploadStarted,
)
from fp8q.output.destination import Destination
from fp8q.output.manifest import Progress, reusable_shards
from fp8q.output.writer import (
    STAGING_DIR,
    check_free_space,
    lock_partial,
    output_path,
    partial_dir,
    remove_tree,
)
from fp8q.plan.fp8_source import source_layouts
from fp8q.plan.planner import Plan
from fp8q.source.base import ShardFiles, Source
from fp8q.source.files import is_model_id
from fp8q.source.opening import open_source
from fp8q.version import __version__


def run(
    src: str | Path, out: str | Path | None, options: Options, on_event: EventCallback | None, mode: Mode
) -> Report:
    """The engine: prepare, convert (read -> transform on a device -> write), finish; for any of the three
    conversions. `out` None: the output goes to the Hub only (options.push), made in a staging folder."""
    started = time.perf_counter()
    device = resolve_device(options.device)
    cluster = Cluster.from_env(cuda=device.type == "cuda")
    lead = cluster.rank == 0
    emit = (on_event if lead else None) or (lambda event: None)
    try:
        with ExitStack() as cleanup:
            if out is None and options.push is None:
                raise UsageError("OUT is missing: give the output folder, or --push-to-hub ORG/NAME")
            target = Path(out) if out is not None else options.push.staging_out()  # type: ignore[union-attr]
            ready = prepare(src, target, options, mode, cluster, cleanup, keep=out is not None)
            if ready.up_to_date:
                return _report(ready, options, mode, device, started, None, [], {})
            progress = Progress(ready.partial, ready.fingerprint, cluster.rank)
            stop = threading.Event()
            with _stop_on_signals(stop) as caught:
                stalls = Stalls()
                files, failure = convert(
                    ready, options, cluster, cluster.device(device), emit, stop, progress, cleanup, stalls
                )
                findings: list[str] = []
                files_out: dict[str, str] = {}
                try:
                    cluster.agree(_interrupted(caught) if caught else failure)  # every process succeeded
                    if lead:
                        timings = {
                            "seconds": round(time.perf_counter() - started, 3),
                            "processes": cluster.world,
                            # Which process made each shard (under torchrun), or an earlier run for a reused one.
                            "shards": {
                                name: {"rank": entry["rank"], "reused": name in ready.reused}
                                for name, entry in progress.done().items()
                            },
                        }
                        try:
                            findings, files_out = finish(ready, options, mode, progress, timings, stop, emit)
                        except OSError as e:
                            raise write_error(ready.partial, e) from None
                except BaseException as e:
                    raise (_failed(e, caught, ready.partial, progress) if lead else e) from None
            return _report(ready, options, mode, device, started, files, findings, files_out, stalls)
    finally:
        cluster.close()


def prepare(
    src: str | Path, out: Path, options: Options, mode: Mode, cluster: Cluster, cleanup: ExitStack, keep: bool = True
) -> Prepared:
    """Open SRC, plan, check the destinations (OUT, the Hub repo to publish to) and the disk, set up and lock
    OUT.partial/ (rank 0); every process then agrees, so that all fail alike before any data is read. `keep`: OUT was
    given (else the output goes to the Hub only, and each shard is deleted once uploaded).

    Raises:
        Fp8qError: SRC, the options or OUT cannot make a servable output, in one line.
    """
    lead = cluster.rank == 0
    error: BaseException | None = None
    ready: Prepared | None = None
    try:
        if options.base_model is not None and not is_model_id(options.base_model):
            raise UsageError(f"--base-model {options.base_model!r}: expected a Hub model id, ORG/NAME")
        out = output_path(out)
        partial = partial_dir(out)
        source = open_source(src, options.revision)
        plan = plan_conversion(source, replace(options, revision=None), mode)
        if plan.problems:
            raise Fp8qError(refusal(plan.problems))
        card = source_card(plan) if options.model_card and lead else None
        fp = run_fingerprint(plan, source, options, mode)
        reused: dict[str, Any] = {}
        # Under torchrun every process uploads the shards it makes; rank 0 checks the repo and commits them all.
        # Checked here changing nothing (a repo is created once OUT.partial/ is set up), each of them: any may refuse.
        targets = destinations(source, out if keep else None, options, fp)
        for target in targets:
            cleanup.callback(target.close)
        names = output_names(plan, options.model_card)
        # Every destination holds this very output already (a CI job run again): nothing to read, write or push.
        held = lead and up_to_date(targets, names, options.resume)
        if lead and not held:
            reused, lock = _prepare_partial(plan, source, out, partial, fp, options, targets, keep, cluster.world)
            cleanup.callback(os.close, lock)  # releases OUT.partial/ (renamed to OUT by then if all went well)
        ready = Prepared(source, out, partial, plan, fp, reused, card, targets, keep, held)
    except Exception as e:  # noqa: BLE001 - handed to every process, then raised
        error = e
    cluster.agree(error)
    assert ready is not None
    if not cluster.is_single:
        for target in ready.destinations:
            target.settle(cluster.broadcast)  # what rank 0's check found
    return replace(ready, reused=cluster.broadcast(ready.reused), up_to_date=cluster.broadcast(ready.up_to_date))


def convert(
    ready: Prepared,
    options: Options,
    cluster: Cluster,
    device: Any,
    emit: EventCallback,
    stop: threading.Event,
    progress: Progress,
    cleanup: ExitStack,
    stalls: Stalls,
) -> tuple[ShardFiles, BaseException | None]:
    """This process's share of the shards still to make (balanced by bytes), through the stages; returns where the
    shards were read from and the failure that stopped it, if one did (every process hears of it). `stalls`: the
    quantization loop's waits, and from its end on, all the time left (the last uploads, the commit)."""
    plan = ready.plan
    todo = {s.name: s.input.size for s in plan.shards if s.name not in ready.reused}
    mine = assign(todo, cluster.world)[cluster.rank]
    skip = {s.name for s in plan.shards} - mine
    emit(PlanReady(plan))
    for shard in (s for s in plan.shards if s.name in ready.reused):
        for job in shard.jobs:
            emit(TensorDone(job.input.name, job.input.nbytes, shard.name))
    staging = ready.partial / f"{STAGING_DIR}-{cluster.rank}"  # where this process downloads a streamed repo's shards
    files = _shard_files(ready.source, [s.name for s in plan.shards if s.name not in skip], options, emit, staging)
    cleanup.callback(files.close)  # stops downloading and deletes what was downloaded, if not done below
    if any(target.sends for target in ready.destinations):
        uploads = [s for s in plan.shards if s.name not in skip and s.name not in ready.reused]
        emit(UploadStarted(sum(s.size for s in uploads), len(uploads)))
    workers = worker_count(options.workers, cluster.local_world)
    failure: BaseException | None = None
    try:
        run_emit = emit if cluster.is_single else _count_bytes(cluster)
        with Watcher(cluster, stop, (lambda n: emit(TensorDone("", n))) if cluster.rank == 0 else None):
            outlet = Outlet(progress, ready.destinations, lambda name, nbytes: emit(ShardUploaded(name, nbytes)))
            run_plan(
                plan, ready.partial, device, workers, run_emit, stop, outlet, skip, files, options.load_check, stalls
            )
            stalls.from_now_on()  # the loop is done: what is left is waiting
            for target in ready.destinations:  # this process's shards are up (or it failed) before all agree
                target.drain(stop, lambda words: emit(Step(words)))
    except BaseException as e:
        failure = e
        cluster.mark_failed()
    finally:
        files.close()  # before OUT.partial/ can become OUT: the staging folder in it goes
    return files, failure


def _report(
    ready: Prepared,
    options: Options,
    mode: Mode,
    device: Any,
    started: float,
    files: ShardFiles | None,
    findings: list[str],
    written: dict[str, str],
    stalls: Stalls | None = None,
) -> Report:
    """What the run did (`files` None: nothing, every destination holding the output already)."""
    plan = ready.plan
    published = next((target.published for target in ready.destinations if target.published), None)
    # Waits on the Hub (downloads, uploads, the commit): the loop's stalls meanwhile are its time waiting on it.
    network = (files.waits if files is not None else []) + [w for target in ready.destinations for w in target.waits]
    layout = None
    if plan.layout is not None:
        block = plan.layout.block
        layout = {
            "scheme": plan.layout.scheme.value,
            "format": plan.layout.format.value,
            "scale_format": plan.layout.scale_format.value,
            "block_size": list(block) if block else None,
        }
    return Report(
        out=str(ready.out) if ready.keep else "",
        pushed=asdict(published) if published is not None else None,
        bytes_uploaded=sum(target.bytes_sent for target in ready.destinations),
        version=__version__,
        command=mode.value,
        layout=layout,
        files=written,
        device=str(device),
        tensors_quantized=plan.n_quantized,
        tensors_kept=plan.n_kept,
        bytes_in=plan.bytes_in,
        bytes_out=plan.bytes_out,
        seconds=time.perf_counter() - started,
        ignored_modules=list(plan.ignored),
        resumed_shards=len(ready.reused),
        tensors_dequantized=plan.n_dequantized,
        tensors_dropped=len(plan.detected.dropped) if plan.detected else 0,
        dtype=config_name(plan.dtype) if plan.dtype else None,
        layouts=source_layouts(plan.detected),
        bytes_downloaded=files.total_bytes if files is not None else 0,
        downloads_kept=options.keep_download,
        notes=list(plan.notes),
        findings=findings,
        up_to_date=ready.up_to_date,
        seconds_waiting=stalls.on(network) if stalls is not None else 0.0,
    )


def _prepare_partial(
    plan: Plan,
    source: Source,
    out: Path,
    partial: Path,
    fp: dict[str, Any],
    options: Options,
    targets: list[Destination],
    keep: bool = True,
    processes: int = 1,
) -> tuple[dict[str, Any], int]:
    """Check the disk, set up and lock OUT.partial/, and open the destinations; returns the shards a resumed run
    keeps (also those an earlier run sent and deleted, if every destination still holds them) and the descriptor that
    holds the lock (closed when the run ends)."""
    source_stat = [shard.input.stat_record() for shard in plan.shards]
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
            # A shard deleted once sent is kept only if every destination holds it (OUT holds none before its rename).
            records = Progress(partial, fp)
            held = set.intersection(*(target.resume(records) for target in targets))
            reused = reusable_shards(partial, fp, source_stat, held)
            for staging in partial.glob(f"{STAGING_DIR}-*"):  # downloads a killed run left (the lock is ours)
                remove_tree(staging)
        shards = [s.size for s in plan.shards if s.name not in reused]
        if not keep:  # the Hub alone takes the output: each shard deleted once uploaded, by each process
            shards = sorted(shards)[-ON_DISK_FOR_UPLOAD * processes :]
        download = _download_space(source, reused, partial, options.keep_download)
        check_free_space(out, shards + metadata_sizes(plan), download)
        Progress(partial, fp).start(source_stat)
        for target in targets:
            target.open()  # every local check has passed: a repo that does not exist is created now
    except BaseException:
        os.close(lock)
        if fresh:
            remove_tree(partial)
        raise
    return reused, lock


def _download_space(source: Source, reused: dict[str, Any], partial: Path, keep: bool) -> tuple[Path, list[int]] | None:
    """Where a streamed run downloads (its staging folders in OUT.partial/, or the Hugging Face cache where the
    downloads are kept), and the most it holds there at once: its two largest shards (None: it downloads nothing)."""
    sizes = source.most_on_disk(set(reused))
    return ((source.path if keep else partial), sizes) if sizes else None


def _shard_files(source: Source, order: list[str], options: Options, emit: EventCallback, staging: Path) -> ShardFiles:
    """Where the reader finds each shard: the downloads of a streamed Hub repo (into `staging`, a folder of this
    run's own, unless kept in the Hugging Face cache), or the folder's own files."""
    files = source.shard_files(order, options.keep_download, lambda name, n: emit(Downloaded(name, n)), staging)
    if files.total_bytes:
        emit(DownloadStarted(files.total_bytes, len(files.order)))
    return files


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
        said = f" {e}" if isinstance(e, Stopped) and str(e) else ""  # what the run was doing: a commit under way
        if done:
            return Interrupted(
                f"{what}{said}: {len(done)} finished shard(s) kept in {partial}; run again with --resume to continue",
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


__all__ = ["convert", "prepare", "run"]
