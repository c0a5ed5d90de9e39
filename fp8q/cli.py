"""The `fp8q` command: typer + rich. The only module that prints or exits.

Exit codes: 0 done, 1 failed, 2 usage, 130/143 interrupted. Errors are one line on stderr;
`FP8Q_DEBUG=1` adds the traceback. Human output goes to stderr, `--json` results to stdout.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from fp8q import __version__
from fp8q.dequantize import Started, dequantize
from fp8q.errors import Fp8qError, UsageError
from fp8q.formats import Format, Scheme
from fp8q.pipeline import Event, PlanReady, QuantizeOptions, Report, TensorDone, local_source, plan_conversion, quantize
from fp8q.plan import Plan, describe
from fp8q.verify import VerifyReport, verify
from fp8q.writer import check_output

app = typer.Typer(
    name="fp8q",
    help="Stream a Hugging Face safetensors checkpoint into an FP8 checkpoint for vLLM, SGLang and transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, highlight=False)
T = TypeVar("T")
_RANK = int(os.environ.get("RANK", "0"))  # set by torchrun

SchemeOpt = Annotated[
    Scheme,
    typer.Option("--scheme", help="Scale granularity: one per output channel, per 128x128 block, or per tensor."),
]
FormatOpt = Annotated[
    Format, typer.Option("--format", help="compressed-tensors (llm-compressor layout) or fp8 (vLLM/DeepSeek layout).")
]
BlockOpt = Annotated[str, typer.Option("--block-size", help="Block tile as ROWSxCOLS, for --scheme block.")]
IgnoreOpt = Annotated[
    list[str] | None,
    typer.Option("--ignore", help="Regex (searched in module names) of Linear layers to keep; repeatable."),
]
TargetsOpt = Annotated[
    list[str] | None,
    typer.Option("--targets", help="Regex: quantize only Linear layers whose name matches; repeatable."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the plan or the result as JSON on stdout.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Branch, tag or commit, when SRC is a Hub repo id.")
]
TpOpt = Annotated[
    int | None,
    typer.Option("--tp", min=1, help="Check that --scheme block layers shard at this vLLM tensor-parallel size."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary; errors only.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fp8q {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """fp8q: FP8 checkpoints from bf16/fp16/fp32 safetensors, streaming, byte-identical to the reference tools."""


@app.command("quantize")
def quantize_command(
    src: Annotated[str, typer.Argument(help="Checkpoint folder, .safetensors file, or Hub repo id (org/name).")],
    out: Annotated[Path, typer.Argument(help="Output folder (created; must not exist or be empty).")],
    revision: RevisionOpt = None,
    scheme: SchemeOpt = Scheme.CHANNEL,
    format: FormatOpt = Format.COMPRESSED_TENSORS,
    block_size: BlockOpt = "128x128",
    ignore: IgnoreOpt = None,
    targets: TargetsOpt = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu, cuda or cuda:N.")] = "auto",
    tp: TpOpt = None,
    workers: Annotated[int, typer.Option("--workers", help="CPU quantization threads; 0 = one per core.", min=0)] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it exists (only once the new one is complete).")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run, reusing its finished shards.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan and write nothing.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize SRC into an FP8 checkpoint at OUT.

    Examples:

      fp8q quantize ./Llama-3.1-8B ./Llama-3.1-8B-FP8

      fp8q quantize ./model ./model-fp8 --scheme block --format fp8
    """

    def run() -> None:
        options = QuantizeOptions(
            scheme=scheme,
            format=format,
            block_size=_parse_block(block_size),
            ignore=tuple(_check_regex(p, "--ignore") for p in ignore or ()),
            targets=tuple(_check_regex(p, "--targets") for p in targets or ()),
            device=device,
            workers=workers,
            tp=tp,
            overwrite=overwrite,
            resume=resume,
            revision=revision,
        )
        if dry_run:
            local = local_source(src, revision)
            plan = plan_conversion(local, replace(options, revision=None))
            check_output(local, out, overwrite)
            _show_plan(plan, as_json, quiet)
            return
        with _ProgressView(quiet or _RANK > 0) as view:
            report = quantize(src, out, options, on_event=view.on_event)
        if _RANK == 0:  # under torchrun, rank 0 speaks for all
            _show_report(report, as_json, quiet)

    _guarded(run)


@app.command("inspect")
def inspect_command(
    src: Annotated[str, typer.Argument(help="Checkpoint folder, .safetensors file, or Hub repo id (org/name).")],
    revision: RevisionOpt = None,
    scheme: SchemeOpt = Scheme.CHANNEL,
    format: FormatOpt = Format.COMPRESSED_TENSORS,
    block_size: BlockOpt = "128x128",
    ignore: IgnoreOpt = None,
    targets: TargetsOpt = None,
    tp: TpOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what `quantize` would do with SRC: tensors, sizes, memory. Reads headers only."""

    def run() -> None:
        options = QuantizeOptions(
            scheme=scheme,
            format=format,
            block_size=_parse_block(block_size),
            ignore=tuple(_check_regex(p, "--ignore") for p in ignore or ()),
            targets=tuple(_check_regex(p, "--targets") for p in targets or ()),
            tp=tp,
            revision=revision,
        )
        _show_plan(plan_conversion(src, options), as_json, quiet)

    _guarded(run)


@app.command("verify")
def verify_command(
    path: Annotated[str, typer.Argument(help="The FP8 checkpoint folder (or .safetensors file) to check.")],
    source: Annotated[
        str | None, typer.Option("--source", help="The checkpoint it was made from: compare every weight.")
    ] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Rows of the worst-tensors table.")] = 10,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check an FP8 checkpoint (any tool's): structure, scales, coverage; with --source, the error of
    every weight. Exit 1 on any problem, each named by tensor.

    Example:

      fp8q verify ./model-fp8 --source ./model
    """

    def run() -> None:
        reference = local_source(source) if source is not None else None
        with _ProgressView(quiet, "verifying") as view:
            report = verify(local_source(path), reference, on_event=view.on_event)
        if as_json:
            data = {**report.__dict__, "ok": report.ok, "rows": [row.__dict__ for row in report.rows]}
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        if not quiet:
            _show_verify(report, top)
        if not report.ok:
            raise Fp8qError(f"{report.path}: {len(report.problems)} problem(s), first: {report.problems[0]}")

    _guarded(run)


@app.command("dequantize")
def dequantize_command(
    src: Annotated[str, typer.Argument(help="An FP8 checkpoint (any supported layout), folder or Hub repo id.")],
    out: Annotated[Path, typer.Argument(help="Output folder for the high-precision checkpoint.")],
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16, float16 or float32.")] = "bfloat16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn an FP8 checkpoint (compressed-tensors, fp8 per-tensor, fp8 block / DeepSeek-V3) back
    into a bf16 checkpoint with no quantization_config, e.g. to fine-tune it.

    Example:

      fp8q dequantize ./DeepSeek-V3 ./DeepSeek-V3-bf16
    """

    def run() -> None:
        with _ProgressView(quiet, "dequantizing") as view:
            report = dequantize(local_source(src), out, dtype=dtype, overwrite=overwrite, on_event=view.on_event)
        if as_json:
            sys.stdout.write(json.dumps({**report.__dict__}, indent=2) + "\n")
        if not quiet:
            layouts = ", ".join(f"{n} {name}" for name, n in report.layouts.items())
            err.print(
                f"[green]done[/green]: {report.out}\n"
                f"  tensors: {report.tensors_dequantized} dequantized to {report.dtype} ({layouts}), "
                f"{report.tensors_kept} kept, {report.tensors_dropped} scales dropped\n"
                f"  size:    {_gb(report.bytes_in)} in, {_gb(report.bytes_out)} out, {report.seconds:.1f} s"
            )

    _guarded(run)


def _guarded(fn: Callable[[], T]) -> T:
    """The error boundary: known errors become one line and an exit code."""
    debug = os.environ.get("FP8Q_DEBUG", "") not in ("", "0")
    try:
        return fn()
    except Fp8qError as e:
        if debug:
            raise
        if _RANK > 0:  # rank 0 reports every process's failure
            raise typer.Exit(e.exit_code) from None
        err.print(f"[red]error:[/red] {_one_line(str(e))}", soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: nothing was written to the output folder", soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {_one_line(str(e))} "
            "(set FP8Q_DEBUG=1 for the traceback, and please report it)",
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _parse_block(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise UsageError(f"--block-size {text!r}: expected ROWSxCOLS with positive sizes, like 128x128")
    return int(m[1]), int(m[2])


def _check_regex(pattern: str, flag: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{flag} {pattern!r}: not a valid regular expression ({e})") from None
    return pattern


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _show_plan(plan: Plan, as_json: bool, quiet: bool) -> None:
    data = describe(plan)
    data["estimated_peak_host_bytes"] = 4 * plan.largest_quantized
    data["estimated_peak_gpu_bytes"] = 4 * plan.largest_quantized
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    if quiet:
        return
    table = Table(title=f"fp8q plan for {plan.checkpoint.root}", show_header=False, title_justify="left")
    table.add_row("layout", f"{plan.layout.scheme.value} / {plan.layout.format.value}")
    table.add_row("tensors", f"{plan.n_quantized} quantized, {plan.n_kept} kept")
    table.add_row("kept Linear modules", ", ".join(plan.ignored) or "none")
    table.add_row("shards", str(len(plan.shards)))
    table.add_row("size", f"{_gb(plan.bytes_in)} in, {_gb(plan.bytes_out)} out")
    table.add_row(
        "peak memory (est.)",
        f"host: torch + {_gb(data['estimated_peak_host_bytes'])}, GPU: {_gb(data['estimated_peak_gpu_bytes'])}",
    )
    if plan.checkpoint.skipped_files:
        table.add_row("not copied", ", ".join(plan.checkpoint.skipped_files))
    err.print(table)
    for problem in plan.problems:
        err.print(f"[yellow]problem:[/yellow] {problem}", soft_wrap=True)


def _show_verify(report: VerifyReport, top: int) -> None:
    layouts = ", ".join(f"{n} {name}" for name, n in report.layouts.items()) or "none"
    err.print(f"{report.path}: {report.tensors_checked} quantized weights ({layouts})", soft_wrap=True)
    if top and report.rows:
        table = Table(title="worst tensors" if report.source else "tensors", title_justify="left")
        table.add_column("tensor", overflow="fold")
        mixed = len(report.layouts) > 1  # one layout is already named in the line above
        columns = (["layout"] if mixed else []) + ["scale range", "rel err", "max abs", "SNR dB", "flag"]
        for column in columns:
            table.add_column(column)
        for row in report.rows[:top]:
            cells = [row.layout] if mixed else []
            cells += [
                f"{row.scale_min:.2g}..{row.scale_max:.2g}",
                "" if row.rel_error is None else f"{row.rel_error:.4f}",
                "" if row.max_abs_error is None else f"{row.max_abs_error:.2g}",
                "" if row.snr_db is None else f"{row.snr_db:.1f}",
                row.flagged or "",
            ]
            table.add_row(row.name, *cells)
        err.print(table)
    for problem in report.problems:
        err.print(f"[red]problem:[/red] {problem}", soft_wrap=True)
    if report.ok:
        err.print(f"[green]ok[/green]: no problems ({report.seconds:.1f} s)")


def _show_report(report: Report, as_json: bool, quiet: bool) -> None:
    if as_json:
        data: dict[str, Any] = dict(report.__dict__)
        data["gb_per_s"] = round(report.gb_per_s, 3)
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    if quiet:
        return
    err.print(
        f"[green]done[/green]: {report.out}\n"
        f"  tensors: {report.tensors_quantized} quantized, {report.tensors_kept} kept\n"
        f"  size:    {_gb(report.bytes_in)} in, {_gb(report.bytes_out)} out\n"
        f"  time:    {report.seconds:.1f} s, {report.gb_per_s:.2f} GB/s on {report.device}"
    )


class _ProgressView:
    """A byte-counting progress bar fed by the library's events."""

    def __init__(self, quiet: bool, verb: str = "quantizing") -> None:
        self.progress = (
            None
            if quiet
            else Progress(
                TextColumn(f"[bold]{verb}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
        )
        self.task: Any = None

    def __enter__(self) -> _ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress and self.task is not None:
            self.progress.stop()

    def on_event(self, event: Event) -> None:
        if not self.progress:
            return
        if isinstance(event, (PlanReady, Started)):
            # Started only now, so that an error found while planning prints alone on its line.
            self.progress.start()
            total = sum(j.source.nbytes for j in event.plan.jobs) if isinstance(event, PlanReady) else event.nbytes
            self.task = self.progress.add_task("run", total=total)
        elif isinstance(event, TensorDone) and self.task is not None:
            self.progress.advance(self.task, event.nbytes)
