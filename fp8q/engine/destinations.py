"""Where a run's output goes, made from its options: OUT (output.destination.OutFolder) and the Hub repo of
--push-to-hub (output.publish.Publisher), either or both, held by the run as one list of Destinations; and the
fingerprint that says what output a run makes (what --resume and a destination's fp8q.json are compared with).

Imports: version, engine.options, output (destination, manifest; publish for --push-to-hub, imported then: it brings
huggingface_hub), plan (types), source (base, its types).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fp8q.engine.options import Mode, Options
from fp8q.output.destination import Destination, OutFolder
from fp8q.output.manifest import fingerprint
from fp8q.plan.planner import Plan
from fp8q.source.base import Source
from fp8q.version import __version__

# --push-to-hub with no OUT: output shards on local disk at once (the one being written, the one uploading).
ON_DISK_FOR_UPLOAD = 2


def destinations(source: Source, out: Path | None, options: Options, fp: dict[str, Any]) -> list[Destination]:
    """The run's destinations, in the order they commit: the Hub repo (--push-to-hub), then OUT (`out`, if the
    output stays on local disk), whose commit renames the work folder the repo's commit reads from. Nothing is
    asked of them yet: a run checks them (`check`) before it converts, and creates a repo only once every local check
    has passed (`open`), so that a run refused early leaves the Hub as it was."""
    found: list[Destination] = []
    push = options.push
    if push is not None:
        from fp8q.output.publish import Publisher

        found.append(
            Publisher(
                push.repo_id,
                push.revision,
                create_pr=push.create_pr,
                private=push.private,
                overwrite=options.overwrite,
                source_repo=source.repo.id if source.repo else None,
                room=None if out is not None else ON_DISK_FOR_UPLOAD,  # no OUT: each shard deleted once up
                fingerprint=fp,
            )
        )
    if out is not None:
        found.append(OutFolder(out, source.path, fp, options.overwrite))
    return found


def up_to_date(targets: list[Destination], names: set[str], resume: bool) -> bool:
    """Check every destination (each may refuse; none changes anything): True when every one holds this very output
    already (the files `names`) and the run has nothing to do. Else the run makes the output (--resume makes it
    whatever they hold), and each must `accept` it as it stands. A run asks this, and --dry-run as the run would."""
    held = [target.check(names) for target in targets]
    if not resume and all(held):
        return True
    for target in targets:
        target.accept()
    return False


def run_fingerprint(plan: Plan, source: Source, options: Options, mode: Mode) -> dict[str, Any]:
    """What makes this run's output: what --resume and a destination's fp8q.json are compared with."""
    return fingerprint(plan.checkpoint, options.output_affecting(mode, plan.dtype), __version__, source.origin)


__all__ = ["ON_DISK_FOR_UPLOAD", "destinations", "run_fingerprint", "up_to_date"]
