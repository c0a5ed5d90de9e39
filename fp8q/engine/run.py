"""The one engine: every conversion is read -> transform -> write, in three threads with bounded queues
(stages.py), between a `prepare` that decides everything before any data is read and a `finish` that makes
OUT. Under torchrun every process runs it and the cluster is asked twice: once all have prepared, once all have
converted their share of the shards.

Imports: version, dtypes, errors, events, engine (options, planning, devices, distributed, finish, stages, stalls,
writing), output, plan, source. Lifecycle of `run(src, out, options, mode)`:

    prepare     open_source(src)           a local path; a Hub repo id from the cache, or streamed: side files
                                           and shard headers now, each shard downloaded as the reader nears it
                plan_conversion            headers + index, validated; every output name, dtype, shape, offset
                check_output, free space   nothing written yet; under torchrun, rank 0 only
                OUT.partial/, locked       (+ --resume: keep the recorded shards that still hash the same)
    convert     stages.run_plan            reader, quantization and writer threads, this process's shards
    finish      (rank 0, once all agree)   index, config.json, side files, model card, fp8q.json; rename to OUT
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
from typing import TYPE_CHECKING, Any

from fp8q.dtypes import config_name
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
from fp8q.output.manifest import Progress, fingerprint, holds_output, reusable_shards
from fp8q.output.writer import (
    STAGING_DIR,
    check_free_space,
    check_output,
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

if TYPE_CHECKING:  # imported at run time only for a Hub repo: they bring huggingface_hub
    from fp8q.output.publish import Published, Publisher


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
                return _report(ready, options, mode, device, started, None, [], {}, None)
            progress = Progress(ready.partial, ready.fingerprint, cluster.rank)
            stop = threading.Event()
            with _stop_on_signals(stop) as caught:
                stalls = Stalls()
                files, failure = convert(
                    ready, options, cluster, cluster.device(device), emit, stop, progress, cleanup, stalls
                )
                findings: list[str] = []
                files_out: dict[str, str] = {}
                published: Published | None = None
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
                            findings, files_out, published = finish(ready, options, mode, progress, timings, stop, emit)
                        except OSError as e:
                            raise write_error(ready.partial, e) from None
                except BaseException as e:
                    raise (_failed(e, caught, ready.partial, progress) if lead else e) from None
            return _report(ready, options, mode, device, started, files, findings, files_out, published, stalls)
    finally:
        cluster.close()


def prepare(
    src: str | Path, out: Path, options: Options, mode: Mode, cluster: Cluster, cleanup: ExitStack, keep: bool = True
) -> Prepared:
    """Open SRC, plan, check OUT and the disk (and the Hub repo to publish to), set up and lock OUT.partial/ (rank
    0); every process then agrees, so that all fail alike before any data is read. `keep`: OUT was given (else the
    output goes to the Hub only, and each shard is deleted once uploaded).

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
        fp = _fingerprint(plan, source, options, mode)
        reused: dict[str, Any] = {}
        publisher = None
        if options.push is not None:
            # Under torchrun every process uploads the shards it makes; rank 0 checks the repo and commits them all.
            # Checked here without changing anything on the Hub; the repo is created once OUT.partial/ is set up.
            publisher = _publisher(options, source, keep, check=lead, fp=fp)
            cleanup.callback(publisher.close)
        # Every target already holds this very output (a CI job run again): nothing to read, write or push.
        names = output_names(plan, options.model_card)
        up_to_date = lead and not options.resume and _held(out, fp, names, publisher, keep)
        if lead and not up_to_date:
            reused, lock = _prepare_partial(plan, source, out, partial, fp, options, publisher, keep, cluster.world)
            cleanup.callback(os.close, lock)  # releases OUT.partial/ (renamed to OUT by then if all went well)
        ready = Prepared(source, out, partial, plan, fp, reused, card, publisher, keep, up_to_date)
    except Exception as e:  # noqa: BLE001 - handed to every process, then raised
        error = e
    cluster.agree(error)
    assert ready is not None
    if ready.publisher is not None and not cluster.is_single:
        ready.publisher.branch_exists = cluster.broadcast(ready.publisher.branch_exists)  # as rank 0 found it
    return replace(ready, reused=cluster.broadcast(ready.reused), up_to_date=cluster.broadcast(ready.up_to_date))


def _held(out: Path, fp: dict[str, Any], names: set[str], publisher: Publisher | None, keep: bool) -> bool:
    """Whether every target of the run holds the output it would make (the files `names` and fp8q.json): OUT (if
    given) and the repo (--push-to-hub), each by its fp8q.json, for a source whose origin fixes its bytes."""
    in_repo = publisher is None or (publisher.up_to_date and publisher.listed == names)
    return (not keep or holds_output(out, fp, names)) and in_repo


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
    publisher = ready.publisher
    if publisher is not None:
        uploads = [s for s in plan.shards if s.name not in skip and s.name not in ready.reused]
        emit(UploadStarted(sum(s.size for s in uploads), len(uploads)))
        publisher.on_uploaded = lambda name, nbytes: emit(ShardUploaded(name, nbytes))
    workers = worker_count(options.workers, cluster.local_world)
    failure: BaseException | None = None
    try:
        run_emit = emit if cluster.is_single else _count_bytes(cluster)
        with Watcher(cluster, stop, (lambda n: emit(TensorDone("", n))) if cluster.rank == 0 else None):
            outlet = Outlet(progress, ready.publisher)
            run_plan(
                plan, ready.partial, device, workers, run_emit, stop, outlet, skip, files, options.load_check, stalls
            )
            stalls.from_now_on()  # the loop is done: what is left is waiting
            if publisher is not None:
                if pending := publisher.pending():
                    emit(Step(f"uploading the last {pending} shard(s) to {publisher.repo_id}"))
                publisher.finish_uploads(stop)  # this process's shards are up (or it failed) before all agree
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
    published: Published | None,
    stalls: Stalls | None = None,
) -> Report:
    """What the run did (`files` None: nothing, every target holding the output already)."""
    plan = ready.plan
    if ready.up_to_date and ready.publisher is not None:
        published = ready.publisher.held()
    # Waits on the Hub (downloads, uploads, the commit): the loop's stalls meanwhile are its time waiting on it.
    network = (files.waits if files is not None else []) + (ready.publisher.waits if ready.publisher else [])
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
        bytes_uploaded=ready.publisher.bytes_uploaded if ready.publisher else 0,
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


def _publisher(options: Options, source: Source, keep: bool, check: bool, fp: dict[str, Any]) -> Publisher:
    """The Hub repo to publish to, checked (token, write access, what it holds) by one process (`check`), changing
    nothing on the Hub yet: a repo that does not exist is created by `_prepare_partial`, once every local check
    passed, so that a run refused here leaves the Hub as it was."""
    from fp8q.output.publish import Publisher

    push = options.push
    assert push is not None
    if not is_model_id(push.repo_id):
        raise UsageError(f"--push-to-hub {push.repo_id!r}: expected a Hub repo id, ORG/NAME")
    publisher = Publisher(
        push.repo_id,
        push.revision,
        create_pr=push.create_pr,
        private=push.private,
        overwrite=options.overwrite,
        source_repo=source.repo.id if source.repo else None,
        room=None if keep else ON_DISK_FOR_UPLOAD,
        fingerprint=fp,
    )
    if check:
        publisher.check(create=False)
    return publisher


def check_push_target(options: Options, source: Source, plan: Plan, mode: Mode) -> str:
    """--dry-run --push-to-hub: the checks a run makes of the repo before anything is converted, changing nothing on
    the Hub (a repo that does not exist is not created); returns what a run would do to it, in a line.

    Raises:
        OutputError, UsageError: in one line, as the run would (a refusal).
    """
    publisher = _publisher(options, source, keep=True, check=True, fp=_fingerprint(plan, source, options, mode))
    repo = publisher.repo_id
    if publisher.missing:
        return f"{repo} does not exist: a run creates it and commits the output to it"
    if publisher.up_to_date and publisher.listed == output_names(plan, options.model_card):
        return f"up to date: {repo}@{publisher.parent} holds this output: a run changes nothing"
    where = (
        f"a pull request against {publisher.revision}" if publisher.create_pr else f"one commit on {publisher.revision}"
    )
    what = "replaces the fp8q output it holds" if publisher.ours else "publishes the output"
    return f"{repo}: a run {what} in {where}"


def _fingerprint(plan: Plan, source: Source, options: Options, mode: Mode) -> dict[str, Any]:
    """What makes this run's output: what --resume and a repo's fp8q.json are compared with."""
    return fingerprint(plan.checkpoint, options.output_affecting(mode, plan.dtype), __version__, source.origin)


# --push-to-hub with no OUT: output shards on local disk at once (the one being written, the one uploading).
ON_DISK_FOR_UPLOAD = 2


def _prepare_partial(
    plan: Plan,
    source: Source,
    out: Path,
    partial: Path,
    fp: dict[str, Any],
    options: Options,
    publisher: Publisher | None = None,
    keep: bool = True,
    processes: int = 1,
) -> tuple[dict[str, Any], int]:
    """Check OUT and the disk, and set up and lock OUT.partial/; returns the shards a resumed run keeps (with a
    publisher, also those an earlier run uploaded and deleted, if the Hub still holds them) and the descriptor that
    holds the lock (closed when the run ends)."""
    check_output(source.path, out, options.overwrite)
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
            held: set[str] = set()
            if publisher is not None:
                from fp8q.output.publish import Uploaded

                # An upload counts only for the shard as last made: a shard made again after its upload (its source
                # changed in place, say) has a done record of another sha256, and is sent again.
                records = Progress(partial, fp)
                done = records.done()
                recorded = {
                    name: Uploaded(**entry)
                    for name, entry in records.uploads().items()
                    if name in done and done[name]["sha256"] == entry["sha256"]
                }
                held = publisher.confirmed(recorded)
            reused = reusable_shards(partial, fp, source_stat, held)
            if publisher is not None:
                publisher.uploaded = {name: recorded[name] for name in held if name in reused}
            for staging in partial.glob(f"{STAGING_DIR}-*"):  # downloads a killed run left (the lock is ours)
                remove_tree(staging)
        shards = [s.size for s in plan.shards if s.name not in reused]
        if publisher is not None and not keep:  # each shard deleted once uploaded, by each process
            shards = sorted(shards)[-ON_DISK_FOR_UPLOAD * processes :]
        download = _download_space(source, reused, partial, options.keep_download)
        check_free_space(out, shards + metadata_sizes(plan), download)
        Progress(partial, fp).start(source_stat)
        if publisher is not None:
            publisher.create()  # if it does not exist: every local check has passed
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
