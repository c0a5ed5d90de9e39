"""What the command line shows: one-line messages, the plan, the verify table, the summary, and the progress bar
fed by the library's events. Names and paths from the input are printed as they are (no markup).

Imports: rich, units; engine.api (plan_summary) when it shows a plan; events and engine.api (the types it renders)
only for type checking.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from fp8q.units import rate_text, size_text

if TYPE_CHECKING:
    from fp8q.engine.api import Plan, VerifyReport
    from fp8q.events import Report

# Piped output is not wrapped at 80 columns: a tensor name stays on one line for grep and logs. No markup: names
# and paths come from the input, and `[bold]` in a tensor name is text (styles are given as `Text` spans).
err = Console(stderr=True, highlight=False, markup=False, width=None if sys.stderr.isatty() else 1000)


def say(label: str, style: str, text: str) -> None:
    """One line on stderr: a styled label, then text shown as it is (no markup: it names files and tensors)."""
    err.print(Text.assemble((label, style), " ", text), soft_wrap=True)


def one_line(text: str) -> str:
    return " ".join(text.split())


def _elapsed() -> float:
    """Seconds since this process started (interpreter start-up and imports included), where Linux says."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


class JsonOut:
    """`--json`: exactly one object on stdout, whatever happens: the result (with `"ok"` and `"exit_code"`), or
    `{"ok": false, "error": "<the one line>", "exit_code": N}` when the command fails before it has one."""

    def __init__(self) -> None:
        self.written = False

    def write(self, data: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        self.written = True

    def failure(self, line: str, exit_code: int) -> None:
        if not self.written:
            self.write({"ok": False, "error": line, "exit_code": exit_code})


JSON = JsonOut()


def notes(notes: tuple[str, ...] | list[str]) -> None:
    for note in notes:
        say("note:", "yellow", note)


def show_plan(plan: Plan, as_json: bool, quiet: bool, push: str | None = None) -> None:
    """The plan, as a table or JSON, with its notes and problems (whose count ends it); `push`: what a run would do
    to the repo of --push-to-hub (--dry-run)."""
    from fp8q.engine.api import plan_summary

    data = plan_summary(plan)
    if push is not None:
        data["push_target"] = push
    if as_json:
        JSON.write({"ok": not plan.problems, "exit_code": 1 if plan.problems else 0, **data})
    if not quiet:
        table = Table(
            title=f"fp8q plan for {plan.source or plan.checkpoint.root}", show_header=False, title_justify="left"
        )
        layout = plan.layout.describe() if plan.layout else "none (dequantize)"
        table.add_row("layout", layout)
        # A quantized source (`convert`): its layouts, and what the target keeps of each.
        for words, entry in data.get("source_layouts", {}).items():
            table.add_row("source", f"{entry['weights']} weights in {words}")
            if "exact" in entry:
                table.add_row("  into the layout", entry["exact"])
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
        notes(plan.notes)
        if push is not None:
            say("push:", "green", push)
        for problem in plan.problems:
            say("problem:", "red", problem)
    if plan.problems:
        say("error:", "red", f"{len(plan.problems)} problem(s): quantize would refuse this plan")


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


# Problems `verify` lists one a line; past that many, a count (all of them are in --json).
SHOWN_PROBLEMS = 10


def show_verify(report: VerifyReport, top: int) -> None:
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
    notes(report.notes)
    if len(report.problems) > 1:  # a single one is the error line's
        for problem in report.problems[:SHOWN_PROBLEMS]:
            say("problem:", "red", problem)
        if len(report.problems) > SHOWN_PROBLEMS:  # a wrong --source differs everywhere: its first lines tell why
            rest = len(report.problems) - SHOWN_PROBLEMS
            say("problem:", "red", f"... and {rest} more ({len(report.problems)} in all; --json lists every one)")
    if report.bytes_downloaded:
        streamed = f"{size_text(report.bytes_downloaded)} streamed from the Hub, each shard deleted once read"
        err.print(f"  hub:     {streamed}", soft_wrap=True)
    if report.files_checked:
        err.print(f"  files:   {report.files_checked} checked against the sha256 fp8q.json lists", soft_wrap=True)
    if report.ok:
        say("ok:", "green", f"no problems ({report.seconds:.1f} s)")


def show_report(report: Report, as_json: bool, quiet: bool) -> None:
    if as_json:
        data: dict[str, Any] = {"ok": True, "exit_code": 0, **report.__dict__}
        data["gb_per_s"] = round(report.gb_per_s, 3)
        data["wall_seconds"] = round(_elapsed(), 3)  # the whole command, start-up included
        JSON.write(data)
    if quiet:
        return
    if report.up_to_date:  # nothing was done: what holds the output says it all
        held = [report.out] if report.out else []
        if report.pushed:
            held.append(f"{report.pushed['repo_id']}@{report.pushed['commit']}")
        verb = "hold" if len(held) > 1 else "holds"
        say("up to date:", "green", f"{' and '.join(held)} {verb} this output")
        return
    notes(report.findings)
    resumed = ""
    if report.resumed_shards:
        resumed = f", {report.resumed_shards} finished shard(s) reused from the interrupted run"
    tensors = f"{report.tensors_quantized} quantized, {report.tensors_kept} kept"
    if report.tensors_dequantized:
        layouts = ", ".join(f"{n} {name}" for name, n in report.layouts.items())
        tensors += (
            f"; {report.tensors_dequantized} source weights ({layouts}) dequantized to {report.dtype}, "
            f"{report.tensors_dropped} scales dropped"
        )
    hub = []  # what went over the network, beside what was converted
    if report.bytes_downloaded:
        what = "kept in the Hugging Face cache" if report.downloads_kept else "each shard deleted once converted"
        hub.append(f"{size_text(report.bytes_downloaded)} downloaded ({what})")
    if report.pushed:
        hub.append(f"{size_text(report.bytes_uploaded)} uploaded")
    downloaded = f"\n  hub:     {', '.join(hub)}" if hub else ""
    published = ""
    if report.pushed:
        pushed = report.pushed
        where = pushed["pr_url"] or f"{pushed['repo_id']} ({pushed['revision']})"
        published = f"\n  pushed:  {where}, commit {pushed['commit'][:12]}"
    say(
        "done:",
        "green",
        f"{report.out or report.pushed and report.pushed['url'] or ''}\n"
        f"  tensors: {tensors}\n"
        f"  size:    {size_text(report.bytes_in)} in, {size_text(report.bytes_out)} out{resumed}{downloaded}"
        f"{published}\n"
        f"  time:    {_elapsed():.1f} s in all ({_time_split(report)}{rate_text(report.gb_per_s * 1e9)} on "
        f"{report.device})",
    )


def _time_split(report: Report) -> str:
    """The run's time: converting, and apart from it the time it waited on the Hub (downloads, uploads, commit)."""
    if report.seconds_waiting < 0.05:
        return f"{report.seconds:.1f} s converting, "
    return f"{report.seconds_converting:.1f} s converting, {report.seconds_waiting:.1f} s waiting on the Hub; "


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


class ProgressView:
    """A byte-counting progress bar fed by the library's events, naming the shard being written."""

    def __init__(self, quiet: bool, verb: str = "quantizing") -> None:
        self.verb = verb
        self.quiet = quiet
        # Only on a terminal: piped (a CI log) a bar cannot redraw, and would leave an empty line above the notes.
        self.progress = (
            None
            if quiet or not err.is_terminal
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
        self.upload: Any = None  # --push-to-hub: the finished shards' uploads, on a line of their own
        self.step: Any = None  # the step at the end under way (the last uploads, the commit)
        self.shard = ""

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress and self.task is not None:
            self.progress.stop()

    def on_event(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "PlanReady" and not self.quiet:
            notes(event.plan.notes)  # before the bar, which takes the last line
        if not self.progress:
            return
        if kind in ("PlanReady", "Started"):
            # Started only now, so that an error found while planning prints alone on its line.
            self.progress.start()
            total = sum(j.input.nbytes for j in event.plan.jobs) if kind == "PlanReady" else event.nbytes
            self.task = self.progress.add_task(self.verb, total=total)
        elif kind == "DownloadStarted":
            self.download = self.progress.add_task("downloading", total=event.nbytes)
        elif kind == "Downloaded" and self.download is not None:
            self.progress.update(self.download, description=f"downloading {event.shard}", advance=event.nbytes)
        elif kind == "UploadStarted":
            self.upload = self.progress.add_task("uploading", total=event.nbytes)
        elif kind == "ShardUploaded" and self.upload is not None:
            self.progress.update(self.upload, description=f"uploaded {event.shard}", advance=event.nbytes)
        elif kind == "Step":
            if self.step is not None:
                self.progress.update(self.step, total=1, completed=1)
            self.step = self.progress.add_task(event.words, total=None)  # no bytes to count: a pulsing bar
        elif kind == "TensorDone" and self.task is not None:
            shard = getattr(event, "shard", "")
            if shard and shard != self.shard:
                self.shard = shard
                self.progress.update(self.task, description=f"{self.verb} {shard}")
            self.progress.advance(self.task, event.nbytes)
