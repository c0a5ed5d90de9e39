"""What `prepare` decided, and what rank 0 does once every shard is done: writes beside the shards the index,
config.json, the side files, the model card (from the plan, the options and every shard's statistics) and
fp8q.json; commits it all to the Hub (--push-to-hub); and then OUT.partial/ becomes OUT.

Imports: version, errors, events, plan, output, source, engine.options (its types, for type checking).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fp8q.errors import CheckpointError
from fp8q.events import EventCallback, Step
from fp8q.output.destination import Destination
from fp8q.output.manifest import Progress, write_manifest
from fp8q.output.model_card import CARD_FILE, CardInput, front_matter
from fp8q.output.model_card import render as render_card
from fp8q.output.writer import MANIFEST_FILE, copy_file, remove_tree, write_json, write_text
from fp8q.plan.checks import is_moe_plan, unservable_reason
from fp8q.plan.fp8_source import source_layouts
from fp8q.plan.planner import Plan
from fp8q.source.base import Source
from fp8q.source.checkpoint import CONFIG_FILE, INDEX_FILE
from fp8q.source.files import is_model_id, read_bounded
from fp8q.version import __version__

if TYPE_CHECKING:
    from fp8q.engine.options import Mode, Options

# What a tokenizer ships as (transformers' AutoTokenizer finds one of these).
TOKENIZER_FILE = re.compile(r"tokenizer(_config)?\.json|tokenizer\.model|vocab\.json|.*\.tiktoken")


@dataclass(frozen=True)
class Prepared:
    """What `prepare` decided before any data was read, the same on every process."""

    source: Source
    out: Path  # OUT, a link resolved
    partial: Path
    plan: Plan
    fingerprint: dict[str, Any]
    reused: dict[str, Any]  # the finished shards of an interrupted run that this one keeps (--resume)
    source_card: str | None  # the source's README.md (rank 0's), for the model card
    destinations: list[Destination] = field(default_factory=list)  # OUT, the Hub repo: checked, in commit order
    keep: bool = True  # OUT was given: the output stays on local disk (else only the Hub keeps it)
    up_to_date: bool = False  # every target holds this very output already: nothing is done


def finish(
    ready: Prepared,
    options: Options,
    mode: Mode,
    progress: Progress,
    timings: dict[str, Any],
    stop: threading.Event,
    emit: EventCallback,
) -> tuple[list[str], dict[str, str]]:
    """Write what goes beside the shards, and commit the output to each destination (--push-to-hub: one commit of
    every file; OUT: the work folder renamed), or, with no OUT, delete the staging folder; returns what the quantized
    values tell (run_findings, after what the destinations noted), and every file of the output but fp8q.json with its
    sha256. `stop` (a signal) ends a wait on the Hub's commit; `emit` says the commit as it starts (a `Step`).

    Raises:
        OSError: writing a file or the final rename failed (OUT.partial/ keeps its records for --resume).
        Fp8qError: a side file is not the one planned, OUT was filled meanwhile, an upload or the commit failed.
    """
    from fp8q.plan.checks import run_findings

    plan, out, partial = ready.plan, ready.out, ready.partial
    done = progress.done()
    stats = {name: st for entry in done.values() for name, st in entry["tensors"].items()}
    card = card_input(plan, ready.source, out, options, mode, stats, ready.source_card) if options.model_card else None
    said = [card.base_model_note] if card is not None and card.base_model_note else []
    write_metadata_files(plan, partial, card)
    files = write_manifest(partial, ready.fingerprint, done, timings)
    message = f"fp8q {mode.value}: {plan.layout.describe() if plan.layout else 'bf16'}"
    if options.push is not None and options.push.commit_message:
        message = options.push.commit_message
    for destination in ready.destinations:
        destination.commit(partial, [*files, MANIFEST_FILE], progress, message, stop, lambda words: emit(Step(words)))
        said += destination.notes
    if not ready.keep:
        remove_tree(partial)  # the staging folder: everything in it is on the Hub now
    return [*said, *run_findings(stats, plan.n_copied)], files


def output_names(plan: Plan, model_card: bool) -> set[str]:
    """Every file a run of the plan writes but fp8q.json (as `write_metadata_files` and the shards make them)."""
    names = {shard.name for shard in plan.shards} | (set(plan.checkpoint.side_files) - {MANIFEST_FILE})
    names |= {INDEX_FILE} if _indexed(plan) else set()
    names |= {CONFIG_FILE} if plan.config is not None else set()
    return names | ({CARD_FILE} if model_card else set())


def _indexed(plan: Plan) -> bool:
    return plan.checkpoint.has_index or len(plan.shards) > 1


def write_metadata_files(plan: Plan, partial: Path, card: CardInput | None) -> None:
    """The index, config.json, the side files and the model card, into OUT.partial/."""
    root = plan.checkpoint.root
    if _indexed(plan):
        write_json(partial / INDEX_FILE, plan.index())
    if plan.config is not None:
        write_json(partial / CONFIG_FILE, plan.config)
    # An FP8 source's fp8q.json describes its own run: this run writes its own. Its card gives way to ours.
    replaced = {MANIFEST_FILE} | ({CARD_FILE} if card is not None else set())
    for name in plan.checkpoint.side_files:
        if name not in replaced:
            copy_file(root / name, partial / name, plan.checkpoint.side_ids.get(name))
    if card is not None:
        write_text(partial / CARD_FILE, render_card(card))


def source_card(plan: Plan) -> str | None:
    """The source's README.md, for the output's model card to carry; read before any weight is.

    Raises:
        CheckpointError: it cannot be read as UTF-8 text (or is far too large to be a card).
    """
    if CARD_FILE not in plan.checkpoint.side_files:
        return None
    path = plan.checkpoint.root / CARD_FILE
    try:
        return read_bounded(path, planned=plan.checkpoint.side_ids.get(CARD_FILE)).decode("utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); fix it, or pass --no-model-card") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text; fix it, or pass --no-model-card") from None


def card_input(
    plan: Plan,
    source: Source,
    out: Path,
    options: Options,
    mode: Mode,
    stats: dict[str, Any],
    source_text: str | None,
) -> CardInput:
    """What the output's model card says, from the plan and the finished shards' statistics (fp8q.json's figures)."""
    repo = source.repo
    folder = source.path if source.path.is_dir() else source.path.parent
    base, revision, is_repo = (repo.id, repo.revision, True) if repo else (folder.resolve().name, None, False)
    base_model, note = _base_model(options.base_model or (base if is_repo else None), plan, source_text)
    return CardInput(
        command=mode.value,
        base=base,
        is_repo=is_repo,
        base_model=base_model,
        base_model_note=note,
        revision=revision,
        out_name=options.push.repo_id if options.push is not None else out.name,
        pushed=options.push is not None,
        layout=plan.layout,
        source_layouts=list(source_layouts(plan.detected)),
        dtype=plan.dtype,
        ignore=options.ignore,
        targets=options.targets,
        ignored_modules=plan.ignored,
        quantization_config=plan.quantization_config,
        tensors_quantized=plan.n_quantized,
        tensors_kept=plan.n_kept,
        tensors_dequantized=plan.n_dequantized,
        weights_copied=plan.n_copied,
        bytes_in=plan.bytes_in,
        bytes_out=plan.bytes_out,
        stats=stats,
        version=__version__,
        source_card=source_text,
        moe=is_moe_plan(plan),
        unservable=unservable_reason(plan),
        tokenizer=any(TOKENIZER_FILE.fullmatch(name) for name in plan.checkpoint.side_files),
    )


def _base_model(given: str | None, plan: Plan, source_text: str | None) -> tuple[str | None, str | None]:
    """The card's `base_model`: always a Hub id or nothing (a folder name would link the card to a stranger's
    model). The id given (--base-model, or SRC's repo id), else one the source names, said in a note: its
    config.json's `_name_or_path` (the id it was saved from), its card's own `base_model`."""
    if given is not None:
        return given, None
    fix = "pass --base-model ORG/NAME if that is not the model converted"
    named = (plan.config or {}).get("_name_or_path")
    if is_model_id(named):
        return named, f"{CARD_FILE}: base_model {named}, the id in the source's {CONFIG_FILE} (_name_or_path); {fix}"
    carried = front_matter(source_text).get("base_model") if source_text else None
    carried = carried[0] if isinstance(carried, list) and len(carried) == 1 else carried
    if is_model_id(carried):
        return carried, f"{CARD_FILE}: base_model {carried}, as the source's own card says; {fix}"
    return None, (
        f"{CARD_FILE}: no base_model: the source is a local folder that names no Hub id; pass --base-model ORG/NAME "
        "to link the card to the model it was made from"
    )


def metadata_sizes(plan: Plan) -> list[int]:
    """The files the run writes beside the shards: side files, index, config and manifest (upper bounds)."""
    side = [(plan.checkpoint.root / f).stat().st_size for f in plan.checkpoint.side_files]
    index = len(json.dumps(plan.index(), indent=2).encode()) + 1
    config = len(json.dumps(plan.config, indent=2, ensure_ascii=False).encode()) + 1 if plan.config else 0
    # fp8q.json: a line of statistics per quantized weight, a hash per file, the fingerprint.
    manifest = 4096 + 400 * plan.n_quantized + 200 * (len(plan.shards) + len(plan.checkpoint.side_files))
    return [*side, index, config, manifest]


__all__ = ["TOKENIZER_FILE", "card_input", "finish", "metadata_sizes", "source_card", "write_metadata_files"]
