"""Check an FP8 checkpoint before it is shipped: will the engines load it, and (given the source) is it close?

Imports: cores, errors, events, verification (integrity, sources, values), source (base, checkpoint, opening, reader),
layouts.detect, models (architectures, linear), plan.selection. Reads headers first, then one tensor at a time, shard
after shard, so it runs on checkpoints of any size; a Hub repo not in the cache is read as it downloads, at most two of
its shards on disk (each downloaded once when read in the shards' order). What it checks:

- files: in an fp8q output, every file against the sha256 its fp8q.json lists (verification.integrity);
- structure: `read_checkpoint`'s validation (index and shard headers agree both ways, offsets tile each file);
- config: compressed-tensors configs go through compressed-tensors' own `QuantizationConfig.model_validate`
  (what vLLM and transformers run), when that library is installed; fp8 configs get vLLM's key rules;
- scales: every FP8 weight has exactly one scale, of the name, shape and dtype its layout needs, and every
  scale value is finite and positive (NaN, inf, 0 or a negative scale ruins the whole row, tile or tensor);
- coverage: no Linear weight the config targets is left unquantized unless the config ignores it, and no
  ignored module is FP8;
- with the source checkpoint: every quantized weight is dequantized and compared with the source weight of the
  same name (relative error, max abs error, SNR); errors far above the rest are flagged.

Every problem is one line naming the tensor or module; `VerifyReport.ok` is True when there are none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fp8q.cores import usable_cores
from fp8q.errors import CheckpointError
from fp8q.events import Started, TensorDone
from fp8q.layouts.detect import DetectedLayout, detect_layout, layout_words, quantization_config
from fp8q.models.architectures import architecture_of, groups
from fp8q.models.linear import is_linear_weight, keep_reason
from fp8q.plan.selection import natural_key
from fp8q.source.base import Fetch, Source
from fp8q.source.checkpoint import CONFIG_FILE, Checkpoint
from fp8q.source.opening import on_disk
from fp8q.source.reader import READ_AHEAD, ShardReader
from fp8q.verification.integrity import FileHashes
from fp8q.verification.sources import check_against_source, source_tensors
from fp8q.verification.values import MIN_SNR_DB, TensorCheck, check_values

Event = Started | TensorDone
EventCallback = Callable[[Event], None]


@dataclass
class VerifyReport:
    """The outcome of `verify`. `rows` are sorted worst first (highest relative error; by name without source)."""

    path: str
    source: str | None
    format: str | None = None
    # Layout in words -> number of weights, e.g. {"fp8 block 128x128": 61}.
    layouts: dict[str, int] = field(default_factory=dict)
    tensors_checked: int = 0
    problems: list[str] = field(default_factory=list)
    rows: list[TensorCheck] = field(default_factory=list)
    seconds: float = 0.0
    bytes_downloaded: int = 0  # a streamed Hub repo's shards, downloaded as they were read and deleted
    files_checked: int = 0  # files whose sha256 matched or not what the output's fp8q.json lists
    notes: list[str] = field(default_factory=list)  # worth knowing, not a problem (a file fp8q.json does not list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    path: str | Path | Source,
    source: str | Path | Source | None = None,
    *,
    on_event: EventCallback | None = None,
    workers: int = 0,
) -> VerifyReport:
    """Check the FP8 checkpoint at PATH, and compare it with SOURCE (the checkpoint it was made from) if given.

    Args:
        path: an FP8 checkpoint folder (or one `.safetensors` file), or a Source (`fp8q.engine.api.open_source`:
            a Hub repo streamed has its shards downloaded as they are read, at most two on disk).
        source: the bf16/fp16/fp32 checkpoint PATH was quantized from (the same kinds); tensors are matched by name.
        on_event: called with `Started` once, then `TensorDone` per quantized weight.
        workers: threads that check values while the next weight is read; 0: one per core this process may use.

    Returns:
        A report whose `problems` list every finding as one line naming the tensor; empty when all is well.

    Raises:
        Fp8qError: PATH does not exist, or SOURCE cannot be read. Problems with PATH itself are reported.
    """
    started = time.perf_counter()
    checked, reference = on_disk(path), (on_disk(source) if source is not None else None)
    if not checked.path.exists():
        raise CheckpointError(f"{path}: no such file or folder; give an FP8 checkpoint folder or a .safetensors file")
    report = VerifyReport(checked.given, reference.given if reference is not None else None)
    src = reference.read() if reference is not None else None
    with _fetch(checked) as fetch, _fetch(reference) as src_fetch:
        try:
            checkpoint = checked.read()
            detected = _detect(checkpoint)
        except CheckpointError as e:
            report.problems.append(str(e))
        else:
            # A folder or a Hub repo fp8q made: every file against fp8q.json, on a thread beside the checks below.
            is_folder = checked.path.is_dir()
            hashes = FileHashes(checkpoint, checked) if is_folder else None
            if detected.weights:
                report.format = detected.format.value
                for qw in detected.weights:
                    report.layouts[layout_words(qw.layout)] = report.layouts.get(layout_words(qw.layout), 0) + 1
                report.problems += _check_config(checkpoint, detected, is_folder)
                report.problems += detected.problems
                report.problems += _check_coverage(checkpoint, detected)
                report.problems += _check_rules(checkpoint, detected)
                # Where each output tensor comes from (a quantized source's weights decoded): read once, used twice.
                sources = source_tensors(src) if src is not None else {}
                if src is not None:
                    report.problems += check_against_source(checkpoint, sources, detected)
                # Both read in file order (shard after shard, tensors as the shards hold them): the disk reads ahead.
                # The source is read once, so its pages leave the cache as they are read (the output's are hashed too).
                readers = (
                    ShardReader(checkpoint, fetch, READ_AHEAD),
                    ShardReader(src or checkpoint, src_fetch, READ_AHEAD, drop=src is not None),
                )
                emit = on_event or (lambda event: None)
                rows, problems = check_values(
                    checkpoint, detected, src, sources, readers, emit, workers or usable_cores()
                )
                report.rows, report.tensors_checked = rows, len(rows)
                report.problems += problems
            else:
                report.problems.append(f"{checkpoint.root}: no FP8 weights; this is not an FP8 checkpoint")
            if hashes is not None:
                files = hashes.result()
                report.problems[:0] = files.problems  # before what the values tell: the bytes are not fp8q's
                report.notes += files.notes
                report.files_checked = files.checked
        report.bytes_downloaded = sum(f.bytes_downloaded for f in (fetch, src_fetch) if f is not None)
    report.seconds = time.perf_counter() - started
    return report


@contextmanager
def _fetch(source: Source | None) -> Iterator[Fetch | None]:
    """A streamed repo's shards, downloaded as they are read into a temporary folder (TMPDIR) deleted at the end."""
    fetch = source.on_demand() if source is not None else None
    try:
        yield fetch
    finally:
        if fetch is not None:
            fetch.close()


def _detect(checkpoint: Checkpoint) -> DetectedLayout:
    try:
        return detect_layout(checkpoint.config, checkpoint.tensors)
    except CheckpointError as e:  # detect_layout does not know where the config came from
        raise CheckpointError(f"{checkpoint.root / CONFIG_FILE}: {e}") from None


def _check_config(checkpoint: Checkpoint, detected: DetectedLayout, is_folder: bool) -> list[str]:
    where = checkpoint.root / CONFIG_FILE
    if checkpoint.config is None:
        # A lone .safetensors file has no config to check; a folder without one cannot be loaded.
        return [f"{where}: missing; engines read the quantization_config from it"] if is_folder else []
    qc = quantization_config(checkpoint.config)
    if qc is None:
        return [f"{where}: no quantization_config; engines would load the FP8 weights as if they were plain"]
    return detected.family.config_problems(qc, where)


def _check_rules(checkpoint: Checkpoint, detected: DetectedLayout) -> list[str]:
    """fp8q's architecture rules, on anyone's checkpoint: no FP8 weight where engines build the layer unquantized
    (output heads, routers, MTP heads, ...), and layers vLLM loads as one all FP8 or none."""
    arch = architecture_of(checkpoint.config)
    problems = []
    fp8 = {qw.weight.module for qw in detected.weights}
    for qw in detected.weights:
        why = keep_reason(qw.weight.module, arch)
        if why is not None and why != "encoder":  # vision towers: FP8 in some releases, engine by engine
            problems.append(
                f"tensor {qw.weight.name} in {qw.weight.shard} is FP8, but it is {why}: engines build that layer "
                "unquantized and cannot load it; keep it in high precision"
            )
    linear = {m.module for m in checkpoint.tensors.values() if is_linear_weight(m)}
    for group in groups(arch):
        for parent in sorted({m.rpartition(".")[0] for m in linear if m.rpartition(".")[2] in group}, key=natural_key):
            members = [g for g in group if f"{parent}.{g}" in linear]
            quantized = [g for g in members if f"{parent}.{g}" in fp8]
            if len(members) > 1 and 0 < len(quantized) < len(members):
                rest = [g for g in members if g not in quantized]
                problems.append(
                    f"{parent}.{{{','.join(members)}}}: {', '.join(quantized)} FP8 but {', '.join(rest)} not; vLLM "
                    "loads them as one layer and refuses it half quantized"
                )
    return problems


def _check_coverage(checkpoint: Checkpoint, detected: DetectedLayout) -> list[str]:
    """Linear weights the config targets must be FP8 unless ignored, and ignored ones must not be."""
    problems = []
    fp8 = {qw.weight.name for qw in detected.weights}
    for meta in sorted(checkpoint.tensors.values(), key=lambda m: natural_key(m.name)):
        if not is_linear_weight(meta):
            continue
        ignored = detected.is_ignored(meta.module)
        if meta.name in fp8 and ignored and detected.family.ignore_is_exact:
            problems.append(
                f"tensor {meta.name} in {meta.shard} is FP8 but the quantization_config ignores {meta.module}; "
                "engines would build it unquantized"
            )
        elif meta.name not in fp8 and detected.is_targeted(meta) and not ignored:
            key = detected.family.ignore_key
            problems.append(
                f"tensor {meta.name} in {meta.shard} is {meta.dtype} but the quantization_config targets "
                f"{meta.module}: quantize it, or list it in {key}"
            )
    return problems


__all__ = ["MIN_SNR_DB", "TensorCheck", "VerifyReport", "verify"]
