"""fp8q's API for conversions: the options, and quantize / dequantize / convert / plan_conversion over the one
engine (run.py), which reads -> transforms -> writes for all three; they differ only in their plan, whose jobs say
what happens to each tensor (keep: copied file to file; quantize; dequantize; requantize: dequantize, then quantize).

Imports: cores, dtypes, errors, events, layouts, plan, source, engine.run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fp8q.cores import usable_cores
from fp8q.dtypes import FP8_NAMES, config_name
from fp8q.errors import CheckpointError
from fp8q.events import EventCallback, Report
from fp8q.layouts import DEFAULT_BLOCK, find
from fp8q.layouts.base import Layout
from fp8q.layouts.detect import quantization_config
from fp8q.plan.checks import plan_notes, plan_problems
from fp8q.plan.fp8_source import check_convertible, detect_fp8, output_dtype
from fp8q.plan.planner import Plan, make_plan
from fp8q.source.checkpoint import Checkpoint, read_checkpoint
from fp8q.source.files import hub_snapshot, read_config

if TYPE_CHECKING:  # imported at run time only for a Hub repo: they bring huggingface_hub
    from fp8q.source.streaming import HubStream


class Mode(str, Enum):
    """What a run makes: the one engine's three conversions differ only in their plan."""

    QUANTIZE = "quantize"  # a bf16/fp16/fp32 checkpoint -> FP8
    DEQUANTIZE = "dequantize"  # an FP8 checkpoint -> high precision, no quantization_config
    CONVERT = "convert"  # an FP8 checkpoint -> another FP8 layout: dequantize, then quantize


@dataclass(frozen=True)
class Push:
    """`--push-to-hub`: publish the output to a Hub repo in the same pass, in one commit at the end."""

    repo_id: str
    revision: str | None = None  # the branch (created from main if missing); None: main
    create_pr: bool = False  # the commit opens a pull request instead
    private: bool = False  # a repo created now is private
    commit_message: str | None = None
    # With no OUT: the folder the shards wait in until uploaded (None: ~/.cache/fp8q/push, or $FP8Q_STAGING)
    staging: str | None = None

    def staging_out(self) -> Path:
        """Where the output is made when there is no OUT: its OUT.partial/ holds the shards on their way up and
        the run's records (for --resume), and is deleted once the commit is made."""
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fp8q" / "push"
        root = Path(self.staging or os.environ.get("FP8Q_STAGING") or cache)
        return root / self.repo_id.replace("/", "--")


@dataclass(frozen=True)
class Options:
    """What to produce and how, for any conversion: the layout and the tensors to quantize (quantize, convert), the
    dtype FP8 weights are dequantized to (dequantize, convert), and how the run goes. `workers` 0 means one per CPU
    core."""

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
    # The model card's `base_model`, a Hub id `org/name` (None: SRC's repo id, else one the source names)
    base_model: str | None = None
    push: Push | None = None  # publish to a Hub repo as well (or instead of OUT, when OUT is None)

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


# Its first name, kept for the API fp8q 0.1 had.
QuantizeOptions = Options


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


def source_label(source: Path | HubStream) -> str:
    """SRC as a user names it: a Hub repo (streamed, or a cache snapshot) as `org/name@commit`, a path as it is."""
    return source_origin(source) or str(source)


def source_origin(source: Path | HubStream) -> str | None:
    """A Hub source (streamed, or a cache snapshot) as `org/name@commit`, whose commit fixes its bytes; None for a
    folder of no repo."""
    snapshot = hub_snapshot(source) if isinstance(source, Path) else (source.repo_id, source.commit)
    return f"{snapshot[0]}@{snapshot[1]}" if snapshot else None


def plan_conversion(src: str | Path | HubStream, options: Options, mode: Mode | None = Mode.QUANTIZE) -> Plan:
    """Read and validate SRC and plan the conversion, reading no tensor data (of a Hub repo not in the local
    cache, only the side files and the shards' headers are fetched). `plan.problems` lists why the output could
    not be served (a run refuses them), `plan.notes` what else to know. `mode` None (`inspect`): decided by SRC,
    the conversion of a quantized one into the layout asked for (unless it is in that layout already: then
    quantize's refusal, which says what to do with it), else its quantization."""
    source = open_source(src, options.revision)
    remote = None if isinstance(source, Path) else source.remote
    checkpoint = read_checkpoint(source_folder(source), remote)
    if options.config is not None:
        checkpoint = replace(checkpoint, config=read_config(Path(options.config)))
    if mode is None:
        mode = Mode.CONVERT if _convertible(checkpoint, options.layout) else Mode.QUANTIZE
    if mode is Mode.QUANTIZE:
        plan = make_plan(checkpoint, options.layout, options.ignore, options.targets)
    else:
        fp8 = detect_fp8(checkpoint)
        dtype = output_dtype(options.dtype, checkpoint.config)
        layout = options.layout if mode is Mode.CONVERT else None
        if mode is Mode.CONVERT:
            check_convertible(checkpoint, fp8, options.layout)
        plan = make_plan(checkpoint, layout, options.ignore, options.targets, detected=fp8, dtype=dtype)
    if remote:
        _check_streamable(plan, remote)
    problems = plan_problems(plan, options.tp, options.load_check)
    notes = tuple(plan_notes(plan, options.load_check, options.tp))
    return replace(plan, problems=tuple(problems), notes=notes, source=source_label(source))


def _convertible(checkpoint: Checkpoint, layout: Layout) -> bool:
    """Whether a checkpoint holds weights fp8q reads as quantized, not all of them already in `layout`."""
    if not quantization_config(checkpoint.config) and not any(
        m.dtype in FP8_NAMES for m in checkpoint.tensors.values()
    ):
        return False
    try:
        detected = detect_fp8(checkpoint)
    except CheckpointError:
        return False  # quantize's refusal says what the input is and what to do
    return not all(qw.layout == layout for qw in detected.weights)


def _check_streamable(plan: Plan, remote: dict[str, Any]) -> None:
    """A streamed run reads one shard at a time: an FP8 weight whose scale lives in another shard cannot be."""
    for job in plan.jobs:
        if job.scale is not None and job.scale.shard != job.input.shard and job.scale.shard in remote:
            raise CheckpointError(
                f"tensor {job.input.name} in {job.input.shard} has its scale {job.scale.name} in "
                f"{job.scale.shard}, and a Hub repo is streamed one shard at a time: download it first "
                "(`hf download REPO`), then convert it"
            )


def quantize(
    src: str | Path,
    out: str | Path | None,
    options: Options | None = None,
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
    from fp8q.engine.run import run

    return run(src, out, options or Options(), on_event, Mode.QUANTIZE)


def dequantize(
    src: str | Path,
    out: str | Path | None,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    resume: bool = False,
    device: str = "cpu",
    revision: str | None = None,
    model_card: bool = True,
    keep_download: bool = False,
    base_model: str | None = None,
    push: Push | None = None,
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
    options = Options(
        dtype=dtype,
        overwrite=overwrite,
        resume=resume,
        device=device,
        revision=revision,
        model_card=model_card,
        keep_download=keep_download,
        base_model=base_model,
        push=push,
    )
    from fp8q.engine.run import run

    return run(src, out, options, on_event, Mode.DEQUANTIZE)


def convert(
    src: str | Path,
    out: str | Path | None,
    options: Options | None = None,
    on_event: EventCallback | None = None,
) -> Report:
    """Convert the FP8 checkpoint at SRC (any layout fp8q detects) into another FP8 layout at OUT, in one pass:
    each FP8 weight dequantized as its format's client does, to `options.dtype` (default: the config's dtype),
    then quantized as `quantize` does. The result is byte for byte what `dequantize` then `quantize` make.

    Raises:
        Fp8qError: as `quantize`; also a source whose conversion would silently lose what it holds
            (static activation or KV-cache scales) or that is already in the target layout.
    """
    from fp8q.engine.run import run

    return run(src, out, options or Options(), on_event, Mode.CONVERT)


def worker_count(asked: int, processes: int = 1) -> int:
    """CPU quantization threads: as asked (0: the cores shared among this node's processes), never more than the
    cores this process may run on: more threads than cores only wait on each other (10000 ran 9x slower)."""
    cores = usable_cores()
    return max(1, min(asked or cores // processes, cores))


def refusal(problems: tuple[str, ...]) -> str:
    """The one line that refuses a plan with problems."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems, first: {problems[0]} (`fp8q inspect` with the same options lists them all)"


__all__ = [
    "Mode",
    "Options",
    "QuantizeOptions",
    "convert",
    "dequantize",
    "open_source",
    "plan_conversion",
    "quantize",
    "refusal",
    "source_folder",
    "worker_count",
]
