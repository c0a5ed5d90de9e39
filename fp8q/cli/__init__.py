"""The `fp8q` command: typer + rich. The only module that prints or exits.

Exit codes: 0 done, 1 failed (or a plan with problems), 2 usage, 130/143 interrupted. Errors are one
line on stderr; `FP8Q_DEBUG=1` adds the traceback. Human output goes to stderr, `--json` results to
stdout. torch and the engine are imported only once a command runs, so `--help` and `--version` are
instant.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import TyperException

from fp8q import __version__
from fp8q.errors import Fp8qError, UsageError
from fp8q.layouts.vocabulary import Format, Scheme
from fp8q.units import size_text

if TYPE_CHECKING:
    from fp8q.engine.pipeline import QuantizeOptions, Report
    from fp8q.plan.planner import Plan
    from fp8q.verification import VerifyReport


class _PlainHelp:
    """`--help` listed as the flag it is, not as `--help <bool>`."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_PlainHelp, TyperCommand):
    """Usage reads `fp8q quantize [OPTIONS] SRC OUT`, as man pages write it, not typer's `{SRC} {OUT}`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece.removeprefix("{").removesuffix("}") for piece in super().collect_usage_pieces(ctx)]


class _Group(_PlainHelp, TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="fp8q",
    help="Stream a Hugging Face safetensors checkpoint into an FP8 checkpoint for vLLM, SGLang and transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped output is not wrapped at 80 columns: a tensor name stays on one line for grep and logs. No markup: names
# and paths come from the input, and `[bold]` in a tensor name is text (styles are given as `Text` spans).
err = Console(stderr=True, highlight=False, markup=False, width=None if sys.stderr.isatty() else 1000)
T = TypeVar("T")
_RANK = int(os.environ.get("RANK", "0"))  # set by torchrun

SrcArg = Annotated[
    str,
    typer.Argument(metavar="SRC", help="Checkpoint folder, .safetensors file, or Hub repo id (org/name)."),
]
SchemeOpt = Annotated[
    Scheme,
    typer.Option(
        "--scheme",
        help="Scale granularity: one per output channel, per 128x128 block, per tensor, or MXFP8 (mx: per 32 inputs).",
    ),
]
FormatOpt = Annotated[
    Format, typer.Option("--format", help="compressed-tensors (llm-compressor layout) or fp8 (vLLM/DeepSeek layout).")
]
BlockOpt = Annotated[str, typer.Option("--block-size", metavar="ROWSxCOLS", help="Block tile, for --scheme block.")]
IgnoreOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--ignore", metavar="REGEX", help="Keep Linear layers whose module name this searches in; repeatable."
    ),
]
TargetsOpt = Annotated[
    list[str] | None,
    typer.Option("--targets", metavar="REGEX", help="Quantize only Linear layers whose name matches; repeatable."),
]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the plan or the result as JSON on stdout.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", metavar="REV", help="Branch, tag or commit, when SRC is a Hub repo id.")
]
TpOpt = Annotated[
    int | None,
    typer.Option(
        "--tp",
        min=1,
        metavar="N",
        help="Check that --scheme block layers load in vLLM at this tensor-parallel size (default 1).",
    ),
]
LoadCheckOpt = Annotated[
    bool,
    typer.Option(
        "--no-load-check",
        metavar="",
        help="Write anyway what no engine could load or serve: block layers vLLM refuses at --tp, a layout an "
        "engine refuses for the model, weights whose client overflows.",
    ),
]
ScaleFormatOpt = Annotated[
    str,
    typer.Option(
        "--scale-format",
        metavar="float|ue8m0",
        help="ue8m0: power-of-two block scales (DeepSeek-V3.1, DeepGEMM); with --scheme block --format fp8.",
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", metavar="DEVICE", help="auto (CUDA if available), cpu, cuda or cuda:N.")
]
WorkersOpt = Annotated[
    int,
    typer.Option("--workers", metavar="N", help="CPU quantization threads; 0 = one per core (never more).", min=0),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", metavar="", help="Replace OUT if it is an fp8q output (only once the new one is complete)."
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", metavar="", help="Continue an interrupted run, reusing its finished shards.")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", metavar="", help="Show the plan and write nothing (exit 1 on problems).")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", metavar="FILE", help="config.json to use when SRC has none (a lone .safetensors file)."),
]
CardOpt = Annotated[
    bool,
    typer.Option(
        "--no-model-card",
        metavar="",
        help="Copy SRC's README.md unchanged instead of writing a model card for the output.",
    ),
]
KeepOpt = Annotated[
    bool,
    typer.Option(
        "--keep-download",
        metavar="",
        help="A streamed Hub repo: download its shards into the Hugging Face cache and keep them (else each is "
        "downloaded into OUT.partial/ and deleted once converted).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress bar or summary; errors only.")]


def main() -> None:
    """The console script: usage errors become one line (exit 2) like every other error."""
    try:
        code = app(standalone_mode=False)
    except TyperException as e:
        message = e.format_message().replace("Value error, ", "")
        # The help of the command given, where there is such a command (a misspelled one has none).
        command = next((a for a in sys.argv[1:2] if a in _COMMANDS), "")
        _say("error:", "red", f"{_one_line(message)} (see `fp8q {command} --help`)".replace("  ", " "))
        code = e.exit_code
    except KeyboardInterrupt:
        _say("interrupted:", "red", "nothing was written")
        code = 130
    sys.exit(code or 0)


_COMMANDS = ("quantize", "convert", "inspect", "verify", "dequantize")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fp8q {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", metavar="", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """fp8q: FP8 checkpoints from bf16/fp16/fp32 safetensors, streaming, byte-identical to the reference tools."""


@app.command("quantize", cls=_Command)
def quantize_command(
    src: SrcArg,
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (created; must not exist or be empty).")],
    revision: RevisionOpt = None,
    scheme: SchemeOpt = Scheme.CHANNEL,
    format: FormatOpt = Format.COMPRESSED_TENSORS,
    block_size: BlockOpt = "128x128",
    scale_format: ScaleFormatOpt = "float",
    ignore: IgnoreOpt = None,
    targets: TargetsOpt = None,
    device: DeviceOpt = "auto",
    tp: TpOpt = None,
    no_load_check: LoadCheckOpt = False,
    config: ConfigOpt = None,
    workers: WorkersOpt = 0,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    keep_download: KeepOpt = False,
    no_model_card: CardOpt = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize SRC into an FP8 checkpoint at OUT.

    Examples:

      fp8q quantize ./Llama-3.1-8B ./Llama-3.1-8B-FP8

      fp8q quantize ./model ./model-fp8 --scheme block --format fp8
    """

    def run() -> None:
        options = _options(
            scheme, format, block_size, ignore, targets, tp, no_load_check, config, revision,
            scale_format=scale_format, device=device, workers=workers, overwrite=overwrite, resume=resume,
            model_card=not no_model_card, keep_download=keep_download,
        )  # fmt: skip
        _convert(src, out, options, "quantize", dry_run, as_json, quiet)

    _guarded(run, out)


@app.command("convert", cls=_Command)
def convert_command(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="An FP8 checkpoint (any layout fp8q detects), folder or Hub repo id.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (created; must not exist or be empty).")],
    revision: RevisionOpt = None,
    scheme: SchemeOpt = Scheme.CHANNEL,
    format: FormatOpt = Format.COMPRESSED_TENSORS,
    block_size: BlockOpt = "128x128",
    scale_format: ScaleFormatOpt = "float",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", metavar="DTYPE", help="Dequantize to bfloat16, float16 or float32 (default: config's)."
        ),
    ] = None,
    ignore: IgnoreOpt = None,
    targets: TargetsOpt = None,
    device: DeviceOpt = "auto",
    tp: TpOpt = None,
    no_load_check: LoadCheckOpt = False,
    workers: WorkersOpt = 0,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    keep_download: KeepOpt = False,
    no_model_card: CardOpt = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert an FP8 checkpoint (fp8q's, llm-compressor's, DeepSeek's) to another FP8 layout in one pass:
    exactly what `fp8q dequantize` then `fp8q quantize` would write.

    Examples:

      fp8q convert ./DeepSeek-V3 ./DeepSeek-V3-channel --scheme channel

      fp8q convert ./DeepSeek-V3 ./DeepSeek-V3-ue8m0 --scheme block --format fp8 --scale-format ue8m0
    """

    def run() -> None:
        options = _options(
            scheme, format, block_size, ignore, targets, tp, no_load_check, None, revision,
            scale_format=scale_format, dtype=dtype, device=device, workers=workers, overwrite=overwrite,
            resume=resume, model_card=not no_model_card, keep_download=keep_download,
        )  # fmt: skip
        _convert(src, out, options, "convert", dry_run, as_json, quiet)

    _guarded(run, out)


def _convert(
    src: str, out: Path, options: QuantizeOptions, mode: str, dry_run: bool, as_json: bool, quiet: bool
) -> None:
    """quantize and convert: the plan for --dry-run, else the run and its summary."""
    engine = _engine()
    if dry_run:
        from dataclasses import replace

        from fp8q.output.writer import check_output, output_path

        source = engine.open_source(src, options.revision)  # a Hub repo not in the cache: its headers alone
        plan = engine.plan_conversion(source, replace(options, revision=None), engine.Mode(mode))
        check_output(engine.source_folder(source), output_path(out), options.overwrite)
        _show_plan(plan, as_json, quiet)
        return
    verb = {"quantize": "quantizing", "convert": "converting"}[mode]
    with _ProgressView(quiet or _RANK > 0, verb) as view:
        report = engine.run(src, out, options, view.on_event, engine.Mode(mode))
    if _RANK == 0:  # under torchrun, rank 0 speaks for all
        _show_report(report, as_json, quiet)


@app.command("inspect", cls=_Command)
def inspect_command(
    src: SrcArg,
    revision: RevisionOpt = None,
    scheme: SchemeOpt = Scheme.CHANNEL,
    format: FormatOpt = Format.COMPRESSED_TENSORS,
    block_size: BlockOpt = "128x128",
    ignore: IgnoreOpt = None,
    targets: TargetsOpt = None,
    tp: TpOpt = None,
    no_load_check: LoadCheckOpt = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what `quantize` would do with SRC: tensors, sizes, memory, problems. Reads headers only;
    exits 1 when the plan has problems, so CI can gate on it."""

    def run() -> None:
        engine = _engine()
        options = _options(scheme, format, block_size, ignore, targets, tp, no_load_check, config, revision)
        _show_plan(engine.plan_conversion(src, options), as_json, quiet)

    _guarded(run)


@app.command("verify", cls=_Command)
def verify_command(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="The FP8 checkpoint folder (or .safetensors file) to check.")
    ],
    source: Annotated[
        str | None,
        typer.Option("--source", metavar="SRC", help="The checkpoint it was made from: compare every weight."),
    ] = None,
    top: Annotated[int, typer.Option("--top", metavar="N", min=0, help="Rows of the worst-tensors table.")] = 10,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check an FP8 checkpoint (any tool's): structure, scales, coverage; with --source, the error of
    every weight. Exit 1 on any problem, each named by tensor.

    Example:

      fp8q verify ./model-fp8 --source ./model
    """

    def run() -> None:
        engine = _engine()
        from fp8q.verification import verify

        reference = engine.local_source(source) if source is not None else None
        with _ProgressView(quiet, "verifying") as view:
            report = verify(engine.local_source(path), reference, on_event=view.on_event)
        if as_json:
            data = {**report.__dict__, "ok": report.ok, "rows": [row.__dict__ for row in report.rows]}
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        if not quiet:
            _show_verify(report, top)
        if not report.ok:
            # Several are listed above (unless quiet); one is said here alone.
            several = len(report.problems) > 1 and not quiet
            listed = "listed above" if several else f"first: {report.problems[0]}"
            raise Fp8qError(f"{report.path}: {len(report.problems)} problem(s), {listed}")

    _guarded(run)


@app.command("dequantize", cls=_Command)
def dequantize_command(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="An FP8 checkpoint (any supported layout), folder or Hub repo id.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder for the high-precision checkpoint.")],
    revision: RevisionOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="bfloat16, float16 or float32.")] = "bfloat16",
    device: DeviceOpt = "cpu",
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    keep_download: KeepOpt = False,
    no_model_card: CardOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn an FP8 checkpoint (compressed-tensors, MXFP8, fp8 per-tensor, fp8 block / DeepSeek-V3) back
    into a bf16 checkpoint with no quantization_config, e.g. to fine-tune it.

    Example:

      fp8q dequantize ./DeepSeek-V3 ./DeepSeek-V3-bf16
    """

    def run() -> None:
        engine = _engine()
        with _ProgressView(quiet, "dequantizing") as view:
            report = engine.dequantize(
                src, out, dtype=dtype, overwrite=overwrite, resume=resume, device=device, revision=revision,
                model_card=not no_model_card, keep_download=keep_download, on_event=view.on_event,
            )  # fmt: skip
        _show_report(report, as_json, quiet)

    _guarded(run, out)


def _engine() -> Any:
    """The conversion engine (and torch with it), imported on first use. Importing torch makes a few
    hundred thousand objects that live until exit: the garbage collector would walk them over and over
    during the imports (0.15 s) and once more at exit (0.4 s), freeing nothing, so import with it off
    and set them aside for good."""
    gc.disable()
    try:
        import fp8q.engine.pipeline as engine
    finally:
        gc.freeze()
        gc.enable()
    return engine


def _options(
    scheme: Scheme,
    format: Format,
    block_size: str,
    ignore: list[str] | None,
    targets: list[str] | None,
    tp: int | None,
    no_load_check: bool,
    config: Path | None,
    revision: str | None,
    **run: Any,
) -> QuantizeOptions:
    from fp8q.engine.pipeline import QuantizeOptions

    if run.get("scale_format", "float") not in ("float", "ue8m0"):
        raise UsageError(f"--scale-format {run['scale_format']!r}: choose float or ue8m0")
    return QuantizeOptions(
        scheme=scheme,
        format=format,
        block_size=_parse_block(block_size),
        ignore=tuple(_check_regex(p, "--ignore") for p in ignore or ()),
        targets=tuple(_check_regex(p, "--targets") for p in targets or ()),
        tp=tp,
        load_check=not no_load_check,
        config=str(config) if config is not None else None,
        revision=revision,
        **run,
    )


def _guarded(fn: Callable[[], T], out: Path | None = None) -> T:
    """The error boundary: known errors become one line and an exit code. `out`: the command's output folder,
    whose OUT.partial/ (an earlier run's) a Ctrl-C before the run takes it over leaves as it was."""
    debug = os.environ.get("FP8Q_DEBUG", "") not in ("", "0")
    if not debug:
        # huggingface_hub logs its retries as warnings: a failure is fp8q's one line, a retry that works is
        # nothing. It reads this once, on import (which comes later: only a Hub repo id imports it).
        os.environ.setdefault("HF_HUB_VERBOSITY", "critical")
    try:
        return fn()
    except typer.Exit:
        raise
    except Fp8qError as e:
        if debug:
            raise
        if _RANK > 0:  # rank 0 reports every process's failure
            raise typer.Exit(e.exit_code) from None
        _say("error:", "red", _one_line(str(e)))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        partial = out.with_name(out.name + ".partial") if out is not None and out.name else None
        kept = (
            f"; {partial} (an earlier run's) is left as it was: --resume continues it"
            if partial and partial.is_dir()
            else ""
        )
        _say("interrupted:", "red", f"nothing was written to the output folder{kept}")
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        _say(
            "internal error:",
            "red",
            f"{type(e).__name__}: {_one_line(str(e))} (set FP8Q_DEBUG=1 for the traceback, and please report it)",
        )
        raise typer.Exit(1) from None


def _say(label: str, style: str, text: str) -> None:
    """One line on stderr: a styled label, then text shown as it is (no markup: it names files and tensors)."""
    err.print(Text.assemble((label, style), " ", text), soft_wrap=True)


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


def _elapsed() -> float:
    """Seconds since this process started (interpreter start-up and imports included), where Linux says."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def _notes(notes: tuple[str, ...] | list[str]) -> None:
    for note in notes:
        _say("note:", "yellow", note)


def _show_plan(plan: Plan, as_json: bool, quiet: bool) -> None:
    from fp8q.engine.stages import memory_estimate
    from fp8q.plan.planner import describe

    data = describe(plan)
    data["estimated_peak_host_bytes"], data["estimated_peak_gpu_bytes"] = memory_estimate(plan, os.cpu_count() or 1)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    if not quiet:
        table = Table(title=f"fp8q plan for {plan.checkpoint.root}", show_header=False, title_justify="left")
        layout = f"{plan.layout.scheme.value} / {plan.layout.format.value}" if plan.layout else "none (dequantize)"
        table.add_row("layout", layout)
        table.add_row("tensors", f"{plan.n_quantized} quantized, {plan.n_kept} kept")
        # Modules a rule kept get a row of their own below, with why; the others (--ignore, --targets) are here.
        by_rule = {module for module, _ in plan.kept}
        others = [m for m in plan.ignored if m not in by_rule]
        if others or not by_rule:
            table.add_row("kept Linear modules", ", ".join(others) or "none")
        table.add_row("shards", str(len(plan.shards)))
        table.add_row("size", f"{size_text(plan.bytes_in)} in, {size_text(plan.bytes_out)} out")
        table.add_row(
            "peak memory (est.)",
            f"host: torch + {size_text(data['estimated_peak_host_bytes'])}, "
            f"GPU: {size_text(data['estimated_peak_gpu_bytes'])}",
        )
        if plan.checkpoint.skipped_files:
            table.add_row("not copied", ", ".join(plan.checkpoint.skipped_files))
        for label, value in _decisions(plan, data):
            table.add_row(label, value)
        err.print(table)
        _notes(plan.notes)
        for problem in plan.problems:
            _say("problem:", "red", problem)
    if plan.problems:
        # Exit 1 so that CI can gate on `inspect` and `--dry-run`; the problems are listed above.
        _say("error:", "red", f"{len(plan.problems)} problem(s): quantize would refuse this plan")
        raise typer.Exit(1)


def _decisions(plan: Plan, data: dict[str, Any]) -> list[tuple[str, str]]:
    """The architecture rules' decisions, as table rows: what they kept and why, MTP, fused experts and groups."""
    generic = "" if plan.architecture.model_types else " (generic rules)"
    rows = [("architecture", plan.architecture.name + generic)]
    reasons: dict[str, list[str]] = {}
    for module, why in plan.kept:
        reasons.setdefault(why, []).append(module)
    for why, modules in reasons.items():
        what, _, because = why.partition(": ")
        example = modules[0] + (f" (+{len(modules) - 1} more)" if len(modules) > 1 else "")
        rows.append((f"kept: {what}", f"{example}" + (f"; {because}" if because else "")))
    if data["mtp"]:
        quantized, kept = len(data["mtp"]["quantized"]), ", ".join(data["mtp"]["kept"]) or "none"
        rows.append(("MTP layers", f"{quantized} Linear weights quantized like the backbone; kept: {kept}"))
    if data["split_experts"]:
        split = data["split_experts"]
        rows.append(("fused experts", f"{len(split)} 3-D tensors split into {sum(split.values())} per-expert weights"))
    if data["fused_groups"]:
        groups = ", ".join(f"{n} x {g}" for g, n in data["fused_groups"].items())
        rows.append(("loaded as one", f"{groups} (each quantized alike)"))
    return rows


def _show_verify(report: VerifyReport, top: int) -> None:
    layouts = ", ".join(f"{n} {name}" for name, n in report.layouts.items()) or "none"
    err.print(f"{report.path}: {report.tensors_checked} quantized weights ({layouts})", soft_wrap=True)
    if top and report.rows:
        table = Table(title="worst tensors" if report.source else "tensors", title_justify="left")
        table.add_column("tensor", no_wrap=True)
        mixed = len(report.layouts) > 1  # one layout is already named in the line above
        errors = report.source is not None  # without a source there are no errors to show
        columns = (["layout"] if mixed else []) + ["scale range"]
        columns += ["rel err", "max abs", "SNR dB"] if errors else []
        for column in [*columns, "flag"]:
            table.add_column(column)
        for row in report.rows[:top]:
            cells = [row.layout] if mixed else []
            cells.append(f"{row.scale_min:.2g}..{row.scale_max:.2g}")
            if errors:
                cells += [
                    "" if row.rel_error is None else f"{row.rel_error:.4f}",
                    "" if row.max_abs_error is None else f"{row.max_abs_error:.2g}",
                    "" if row.snr_db is None else f"{row.snr_db:.1f}",
                ]
            table.add_row(row.name, *cells, row.flagged or "")
        err.print(table)
    if len(report.problems) > 1:  # a single one is the error line's
        for problem in report.problems:
            _say("problem:", "red", problem)
    if report.ok:
        _say("ok:", "green", f"no problems ({report.seconds:.1f} s)")


def _show_report(report: Report, as_json: bool, quiet: bool) -> None:
    if as_json:
        data: dict[str, Any] = dict(report.__dict__)
        data["gb_per_s"] = round(report.gb_per_s, 3)
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    if quiet:
        return
    _notes(report.findings)
    resumed = ""
    if report.resumed_shards:
        resumed = f", {report.resumed_shards} finished shard(s) reused from the interrupted run"
    tensors = f"{report.tensors_quantized} quantized, {report.tensors_kept} kept"
    if report.tensors_dequantized:
        layouts = ", ".join(f"{n} {name}" for name, n in report.layouts.items())
        tensors += (
            f"; {report.tensors_dequantized} FP8 weights ({layouts}) dequantized to {report.dtype}, "
            f"{report.tensors_dropped} scales dropped"
        )
    downloaded = ""
    if report.bytes_downloaded:
        what = "kept in the Hugging Face cache" if report.downloads_kept else "each deleted once converted"
        downloaded = f"\n  hub:     {size_text(report.bytes_downloaded)} streamed from the Hub, {what}"
    _say(
        "done:",
        "green",
        f"{report.out}\n"
        f"  tensors: {tensors}\n"
        f"  size:    {size_text(report.bytes_in)} in, {size_text(report.bytes_out)} out{resumed}{downloaded}\n"
        f"  time:    {_elapsed():.1f} s in all ({report.seconds:.1f} s converting, "
        f"{report.gb_per_s:.2f} GB/s on {report.device})",
    )


class _Settled(ProgressColumn):
    """A speed or time-left column that shows nothing until there is something to estimate from: the
    first tensors (and the start-up before them) make for readings like 80 kB/s, 4:30:02 left."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Any) -> Text:
        if not task.completed or (task.elapsed or 0.0) < 2.0:
            return Text("-", style="progress.remaining")
        return self.column.render(task)  # type: ignore[return-value]


class _ProgressView:
    """A byte-counting progress bar fed by the library's events, naming the shard being written."""

    def __init__(self, quiet: bool, verb: str = "quantizing") -> None:
        self.verb = verb
        self.quiet = quiet
        self.progress = (
            None
            if quiet
            else Progress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                DownloadColumn(),
                _Settled(TransferSpeedColumn()),
                _Settled(TimeRemainingColumn()),
                console=err,
                transient=True,
            )
        )
        self.task: Any = None
        self.download: Any = None  # a streamed Hub repo's downloads, on a line of their own
        self.shard = ""

    def __enter__(self) -> _ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress and self.task is not None:
            self.progress.stop()

    def on_event(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "PlanReady" and not self.quiet:
            _notes(event.plan.notes)  # before the bar, which takes the last line
        if not self.progress:
            return
        if kind in ("PlanReady", "Started"):
            # Started only now, so that an error found while planning prints alone on its line.
            self.progress.start()
            total = sum(j.source.nbytes for j in event.plan.jobs) if kind == "PlanReady" else event.nbytes
            self.task = self.progress.add_task(self.verb, total=total)
        elif kind == "DownloadStarted":
            self.download = self.progress.add_task("downloading", total=event.nbytes)
        elif kind == "Downloaded" and self.download is not None:
            self.progress.update(self.download, description=f"downloading {event.shard}", advance=event.nbytes)
        elif kind == "TensorDone" and self.task is not None:
            shard = getattr(event, "shard", "")
            if shard and shard != self.shard:
                self.shard = shard
                self.progress.update(self.task, description=f"{self.verb} {shard}")
            self.progress.advance(self.task, event.nbytes)
