"""The command line's options: each one's flags and help, declared once for every command that takes it, and the
`Options` a command's values make.

Imports: typer, layouts.vocabulary (the choices, without torch), errors; engine.api (the Options and Push types,
which check themselves) only when a command runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fp8q.errors import UsageError
from fp8q.layouts.vocabulary import Format, Scheme

if TYPE_CHECKING:
    from fp8q.engine.api import Options, Push

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
OutArg = Annotated[
    Path | None,
    typer.Argument(
        metavar="OUT",
        help="Output folder (created; must not exist or be empty). May be left out with --push-to-hub.",
        show_default=False,
    ),
]
PushOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="Publish the output to this Hub repo in the same pass: each shard uploaded as soon as it is written, "
        "everything in one commit at the end (created if missing). Without OUT, shards are deleted once uploaded.",
    ),
]
PushRevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--push-revision", metavar="BRANCH", help="--push-to-hub: the branch to commit to (created if missing)."
    ),
]
CreatePrOpt = Annotated[
    bool, typer.Option("--create-pr", metavar="", help="--push-to-hub: open a pull request with the commit instead.")
]
PrivateOpt = Annotated[bool, typer.Option("--private", metavar="", help="--push-to-hub: create the repo private.")]
CommitMessageOpt = Annotated[
    str | None, typer.Option("--commit-message", metavar="TEXT", help="--push-to-hub: the commit's message.")
]
StagingOpt = Annotated[
    Path | None,
    typer.Option(
        "--staging",
        metavar="DIR",
        help="--push-to-hub without OUT: where shards wait until uploaded (default: $FP8Q_STAGING, else "
        "~/.cache/fp8q/push).",
    ),
]
BaseModelOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        metavar="ORG/NAME",
        help="The model card's base_model, a Hub model id (default: SRC's repo id, or one the source names).",
    ),
]
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
        "engine refuses for the model, weights whose client overflows or that come out far from their source.",
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


def make_push(
    repo_id: str | None,
    revision: str | None,
    create_pr: bool,
    private: bool,
    message: str | None,
    staging: Path | None,
) -> Push | None:
    """The --push-to-hub options, or None without it (the others then are a usage error)."""
    from fp8q.engine.api import Push as Target

    if repo_id is None:
        given = {
            "--push-revision": revision,
            "--create-pr": create_pr,
            "--private": private,
            "--commit-message": message,
            "--staging": staging,
        }
        flag = next((flag for flag, value in given.items() if value), None)
        if flag is not None:
            raise UsageError(f"{flag} goes with --push-to-hub ORG/NAME")
        return None
    return Target(repo_id, revision, create_pr, private, message, str(staging) if staging is not None else None)


def make_options(
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
) -> Options:
    from fp8q.engine.api import Options

    return Options(
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
