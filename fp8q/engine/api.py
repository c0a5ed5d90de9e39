"""fp8q's API for conversions, the one door into the engine: the options, and quantize / dequantize / convert /
plan_conversion over the one engine (run.py), which reads -> transforms -> writes for all three; they differ only in
their plan, whose jobs say what happens to each tensor (keep: copied file to file; quantize; dequantize; requantize:
dequantize, then quantize).

Imports: events, plan.planner (the Plan type), source (base, opening), verification, output.writer (OUT as a run takes
it), engine (options, planning, destinations; finish for --dry-run's names; run once a conversion runs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fp8q.engine.destinations import destinations, run_fingerprint, up_to_date
from fp8q.engine.options import Mode, Options, Push, QuantizeOptions, worker_count
from fp8q.engine.planning import plan_conversion, plan_summary, refusal
from fp8q.events import EventCallback, Report
from fp8q.plan.planner import Plan
from fp8q.source.base import Source
from fp8q.source.opening import open_source
from fp8q.verification import VerifyReport, verify


@dataclass(frozen=True)
class Preflight:
    """What a run would do (`--dry-run`), found as the run finds it, with nothing changed anywhere."""

    plan: Plan  # its problems a run refuses, its notes
    push_target: str | None = None  # with --push-to-hub: what the run would do to the repo, in words


def preflight(src: str | Path, out: str | Path | None, options: Options, mode: Mode) -> Preflight:
    """Check a run without making it: SRC read and planned (a Hub repo not in the cache: its headers alone), and
    every destination checked as a run checks it, changing nothing: OUT, and with --push-to-hub the token and the
    repo (what a run would do to it, in words).

    Raises:
        Fp8qError: what the run would refuse before planning (SRC, OUT, the repo), in one line.
    """
    from fp8q.engine.finish import output_names
    from fp8q.output.writer import output_path

    source = open_source(src, options.revision)
    plan = plan_conversion(source, replace(options, revision=None), mode)
    fp = run_fingerprint(plan, source, options, mode)
    names = output_names(plan, options.model_card)
    targets = destinations(source, output_path(Path(out)) if out is not None else None, options, fp)
    up_to_date(targets, names, options.resume)  # what the run checks and refuses, changing nothing
    outlooks = [words for target in targets if (words := target.outlook(names))]
    return Preflight(plan, outlooks[0] if outlooks else None)


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


__all__ = [
    "Mode",
    "Options",
    "Plan",
    "Preflight",
    "VerifyReport",
    "Push",
    "QuantizeOptions",
    "Source",
    "convert",
    "dequantize",
    "open_source",
    "plan_conversion",
    "plan_summary",
    "preflight",
    "quantize",
    "refusal",
    "verify",
    "worker_count",
]
