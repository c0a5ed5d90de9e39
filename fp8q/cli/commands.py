"""The `fp8q` commands: typer, over the engine's API. The only place that exits (but for `fp8q.__main__`'s Ctrl-C
during start-up).

Imports: typer, version, cli (options, render), errors, layouts.vocabulary; engine.api once a command runs.

Exit codes: 0 done, 1 failed (or a plan with problems), 2 usage, 130/143 interrupted. Errors are one
line on stderr; `FP8Q_DEBUG=1` adds the traceback. Human output goes to stderr, `--json` results to
stdout. torch and the engine are imported only once a command runs, so `--help` and `--version` are
instant.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import TyperException

from fp8q.cli.options import (
    BaseModelOpt,
    BlockOpt,
    CardOpt,
    CommitMessageOpt,
    ConfigOpt,
    CreatePrOpt,
    DeviceOpt,
    DryRunOpt,
    FormatOpt,
    IgnoreOpt,
    JsonOpt,
    KeepOpt,
    LoadCheckOpt,
    OutArg,
    OverwriteOpt,
    PrivateOpt,
    PushOpt,
    PushRevisionOpt,
    QuietOpt,
    ResumeOpt,
    RevisionOpt,
    ScaleFormatOpt,
    SchemeOpt,
    SrcArg,
    StagingOpt,
    TargetsOpt,
    TpOpt,
    WorkersOpt,
    make_options,
    make_push,
)
from fp8q.cli.render import JSON, ProgressView, one_line, say, show_plan, show_report, show_verify
from fp8q.errors import Fp8qError
from fp8q.version import __version__

if TYPE_CHECKING:
    from fp8q.engine.api import Options
from fp8q.layouts.vocabulary import Format, Scheme


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
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped output is not wrapped at 80 columns: a tensor name stays on one line for grep and logs. No markup: names
# and paths come from the input, and `[bold]` in a tensor name is text (styles are given as `Text` spans).
_RANK = int(os.environ.get("RANK", "0"))  # set by torchrun


def main() -> None:
    """The console script: usage errors become one line (exit 2) like every other error."""
    # fp8q shows the downloads and uploads it makes itself: huggingface_hub's own bars (read at its import, which
    # comes later) would repeat them, and print under --quiet and --json.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = app(standalone_mode=False)
    except TyperException as e:
        message = e.format_message().replace("Value error, ", "")
        if not message.strip():  # `fp8q` alone: the help was shown, and there is no error to say
            sys.exit(e.exit_code)
        # The help of the command given, where there is such a command (a misspelled one has none).
        command = next((a for a in sys.argv[1:2] if a in _COMMANDS), "")
        line = f"{one_line(message)} (see `fp8q {command} --help`)".replace("  ", " ")
        say("error:", "red", line)
        code = e.exit_code
        if "--json" in sys.argv:
            JSON.failure(line, code)
    except KeyboardInterrupt:
        code = 130
    if code == 130 and not _SAID:  # Ctrl-C before a command's own boundary (typer answers it with a bare 130)
        reads_only = sys.argv[1:2] in (["inspect"], ["verify"])
        say("interrupted:", "red", "stopped before it finished" if reads_only else "nothing was written")
    sys.exit(code or 0)


_SAID: list[str] = []  # what the error boundary (`_guarded`) said: main() adds nothing then


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
    out: OutArg = None,
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
    base_model: BaseModelOpt = None,
    push_to_hub: PushOpt = None,
    push_revision: PushRevisionOpt = None,
    create_pr: CreatePrOpt = False,
    private: PrivateOpt = False,
    commit_message: CommitMessageOpt = None,
    staging: StagingOpt = None,
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
        options = make_options(
            scheme, format, block_size, ignore, targets, tp, no_load_check, config, revision,
            scale_format=scale_format, device=device, workers=workers, overwrite=overwrite, resume=resume,
            model_card=not no_model_card, keep_download=keep_download, base_model=base_model,
            push=make_push(push_to_hub, push_revision, create_pr, private, commit_message, staging),
        )  # fmt: skip
        _convert(src, out, options, "quantize", dry_run, as_json, quiet)

    _guarded(run, out, as_json)


@app.command("convert", cls=_Command)
def convert_command(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="An FP8 checkpoint (any layout fp8q detects), folder or Hub repo id.")
    ],
    out: OutArg = None,
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
    base_model: BaseModelOpt = None,
    push_to_hub: PushOpt = None,
    push_revision: PushRevisionOpt = None,
    create_pr: CreatePrOpt = False,
    private: PrivateOpt = False,
    commit_message: CommitMessageOpt = None,
    staging: StagingOpt = None,
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
        options = make_options(
            scheme, format, block_size, ignore, targets, tp, no_load_check, None, revision,
            scale_format=scale_format, dtype=dtype, device=device, workers=workers, overwrite=overwrite,
            resume=resume, model_card=not no_model_card, keep_download=keep_download, base_model=base_model,
            push=make_push(push_to_hub, push_revision, create_pr, private, commit_message, staging),
        )  # fmt: skip
        _convert(src, out, options, "convert", dry_run, as_json, quiet)

    _guarded(run, out, as_json)


def _convert(
    src: str, out: Path | None, options: Options, mode: str, dry_run: bool, as_json: bool, quiet: bool
) -> None:
    """quantize and convert: the plan for --dry-run, else the run and its summary."""
    with _engine_imports():
        from fp8q.engine.api import Mode, convert, preflight, quantize
    if dry_run:
        checked = preflight(src, out, options, Mode(mode))  # as a run checks, changing nothing
        show_plan(checked.plan, as_json, quiet, checked.push_target)
        if checked.plan.problems:
            raise typer.Exit(1)  # so that CI can gate on `--dry-run`; the problems are listed
        return
    verb = {"quantize": "quantizing", "convert": "converting"}[mode]
    with ProgressView(quiet or _RANK > 0, verb) as view:
        report = (quantize if mode == "quantize" else convert)(src, out, options, view.on_event)
    if _RANK == 0:  # under torchrun, rank 0 speaks for all
        show_report(report, as_json, quiet)


@app.command("inspect", cls=_Command)
def inspect_command(
    src: SrcArg,
    revision: RevisionOpt = None,
    scheme: SchemeOpt = Scheme.CHANNEL,
    format: FormatOpt = Format.COMPRESSED_TENSORS,
    block_size: BlockOpt = "128x128",
    scale_format: ScaleFormatOpt = "float",
    ignore: IgnoreOpt = None,
    targets: TargetsOpt = None,
    tp: TpOpt = None,
    no_load_check: LoadCheckOpt = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what `quantize` would do with SRC (with a quantized SRC, what `convert` would: its format, and which
    weights can come through exactly): tensors, sizes, memory, problems. Reads headers only; exits 1 when the plan
    has problems, so CI can gate on it."""

    def run() -> None:
        with _engine_imports():
            from fp8q.engine.api import plan_conversion
        options = make_options(
            scheme, format, block_size, ignore, targets, tp, no_load_check, config, revision, scale_format=scale_format
        )
        plan = plan_conversion(src, options, None)
        show_plan(plan, as_json, quiet)
        if plan.problems:
            raise typer.Exit(1)  # so that CI can gate on `inspect`; the problems are listed

    _guarded(run, as_json=as_json, writes=False)


@app.command("verify", cls=_Command)
def verify_command(
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH", help="The FP8 checkpoint to check: a folder, a .safetensors file or a Hub repo id."
        ),
    ],
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            metavar="SRC",
            help="The checkpoint it was made from (folder or Hub repo id): compare every weight.",
        ),
    ] = None,
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision", metavar="REV", help="Branch, tag, commit or refs/pr/N of PATH, when it is a Hub repo id."
        ),
    ] = None,
    top: Annotated[int, typer.Option("--top", metavar="N", min=0, help="Rows of the worst-tensors table.")] = 10,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check an FP8 checkpoint (any tool's): structure, scales, coverage; with --source, the error of
    every weight. Exit 1 on any problem, each named by tensor.

    Example:

      fp8q verify ./model-fp8 --source ./model

      fp8q verify org/model-FP8 --source org/model
    """

    def run() -> None:
        with _engine_imports():
            from fp8q.engine.api import open_source, verify

        # A Hub repo not in the cache is read as it downloads: each shard once, at most two on disk.
        checked = open_source(path, revision)
        reference = open_source(source) if source is not None else None
        with ProgressView(quiet, "verifying") as view:
            report = verify(checked, reference, on_event=view.on_event)
        # Several problems are listed (unless quiet); one is said in the error line alone.
        several = len(report.problems) > 1 and not quiet
        listed = "listed above" if several else f"first: {report.problems[0]}" if report.problems else ""
        error = f"{report.path}: {len(report.problems)} problem(s), {listed}"
        if as_json:
            verdict = {"ok": True, "exit_code": 0} if report.ok else {"ok": False, "error": error, "exit_code": 1}
            JSON.write({**verdict, **report.__dict__, "rows": [row.__dict__ for row in report.rows]})
        if not quiet:
            show_verify(report, top)
        if not report.ok:
            raise Fp8qError(error)

    _guarded(run, as_json=as_json, writes=False)


@app.command("dequantize", cls=_Command)
def dequantize_command(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="An FP8 checkpoint (any supported layout), folder or Hub repo id.")
    ],
    out: OutArg = None,
    revision: RevisionOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="bfloat16, float16 or float32.")] = "bfloat16",
    device: DeviceOpt = "cpu",
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    keep_download: KeepOpt = False,
    no_model_card: CardOpt = False,
    base_model: BaseModelOpt = None,
    push_to_hub: PushOpt = None,
    push_revision: PushRevisionOpt = None,
    create_pr: CreatePrOpt = False,
    private: PrivateOpt = False,
    commit_message: CommitMessageOpt = None,
    staging: StagingOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn an FP8 checkpoint (compressed-tensors, MXFP8, fp8 per-tensor, fp8 block / DeepSeek-V3) back
    into a bf16 checkpoint with no quantization_config, e.g. to fine-tune it.

    Example:

      fp8q dequantize ./DeepSeek-V3 ./DeepSeek-V3-bf16
    """

    def run() -> None:
        with _engine_imports():
            from fp8q.engine.api import dequantize
        with ProgressView(quiet, "dequantizing") as view:
            report = dequantize(
                src, out, dtype=dtype, overwrite=overwrite, resume=resume, device=device, revision=revision,
                model_card=not no_model_card, keep_download=keep_download, base_model=base_model,
                push=make_push(push_to_hub, push_revision, create_pr, private, commit_message, staging),
                on_event=view.on_event,
            )  # fmt: skip
        show_report(report, as_json, quiet)

    _guarded(run, out, as_json)


@contextmanager
def _engine_imports() -> Iterator[None]:
    """Import the conversion engine (and torch with it) inside this. Importing torch makes a few hundred thousand
    objects that live until exit: the garbage collector would walk them over and over during the imports (0.15 s)
    and once more at exit (0.4 s), freeing nothing, so import with it off and set them aside for good."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _guarded(fn: Callable[[], None], out: Path | None = None, as_json: bool = False, writes: bool = True) -> None:
    """The error boundary: known errors become one line and an exit code, and with `--json` the failure object on
    stdout too. `out`: the command's output folder, whose OUT.partial/ (an earlier run's) a Ctrl-C before the run
    takes it over leaves as it was; `writes` False: a command that only reads (inspect, verify)."""
    JSON.written = False
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
        label, line, code = "error:", one_line(str(e)), e.exit_code
    except KeyboardInterrupt:
        partial = out.with_name(out.name + ".partial") if out is not None and out.name else None
        kept = (
            f"; {partial} (an earlier run's) is left as it was: --resume continues it"
            if partial and partial.is_dir()
            else ""
        )
        said = f"nothing was written to the output folder{kept}" if writes else "stopped before it finished"
        label, line, code = "interrupted:", said, 130
    except Exception as e:
        if debug:
            raise
        label, code = "internal error:", 1
        line = f"{type(e).__name__}: {one_line(str(e))} (set FP8Q_DEBUG=1 for the traceback, and please report it)"
    say(label, "red", line)
    _SAID.append(line)
    if as_json and _RANK == 0:
        JSON.failure(line, code)
    raise typer.Exit(code) from None
