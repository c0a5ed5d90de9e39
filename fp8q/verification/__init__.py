"""Check an FP8 checkpoint before it is shipped: will the engines load it, and (given the source) is it close?

Imports: torch, errors, dtypes, events, verification.integrity, source (checkpoint, reader; hub and streaming for a
Hub repo, imported then), layouts (detect, numerics), models (architectures, experts, linear), plan (checks,
selection). Reads headers first, then one tensor at a time, shard after shard, so it runs on checkpoints of any size;
a Hub repo not in the cache is read as it downloads, at most two of its shards on disk (each downloaded once when read
in the shards' order). What it checks:

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

import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fp8q.dtypes import FP8_NAMES
from fp8q.errors import CheckpointError, Fp8qError
from fp8q.events import Started, TensorDone
from fp8q.layouts import numerics
from fp8q.layouts.detect import (
    DetectedLayout,
    QuantizedWeight,
    detect_layout,
    layout_words,
    quantization_config,
    value_problem,
)
from fp8q.models.architectures import architecture_of, groups
from fp8q.models.experts import Part, fused_weight_of, is_fused_expert_weight, split
from fp8q.models.linear import is_linear_weight, keep_reason
from fp8q.plan.checks import MAX_REL_ERROR
from fp8q.plan.selection import natural_key
from fp8q.source.checkpoint import CONFIG_FILE, Checkpoint, TensorMeta, read_checkpoint
from fp8q.source.reader import ShardReader
from fp8q.verification.integrity import FileHashes

if TYPE_CHECKING:
    from fp8q.source.streaming import HubStream, ShardsOnDemand

# (MAX_REL_ERROR, from checks) ... or one below this signal-to-noise ratio is broken whatever its neighbours do.
MIN_SNR_DB = 15.0
# ...and one this many times the median error of the checkpoint (and above the floor) is an outlier.
OUTLIER_FACTOR = 3.0
OUTLIER_FLOOR = 0.05

Event = Started | TensorDone
EventCallback = Callable[[Event], None]


@dataclass(frozen=True)
class TensorCheck:
    """One quantized weight: its scale range and, with a source, how far its dequantized values are."""

    name: str
    layout: str
    shape: tuple[int, ...]
    scale_min: float
    scale_max: float
    rel_error: float | None = None  # ||deq - w|| / ||w||
    max_abs_error: float | None = None
    snr_db: float | None = None  # 20 log10(||w|| / ||deq - w||); inf when exact
    flagged: str | None = None  # why this row is a problem


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
    path: str | Path | HubStream,
    source: str | Path | HubStream | None = None,
    *,
    on_event: EventCallback | None = None,
) -> VerifyReport:
    """Check the FP8 checkpoint at PATH, and compare it with SOURCE (the checkpoint it was made from) if given.

    Args:
        path: an FP8 checkpoint folder (or one `.safetensors` file), or a streamed Hub repo
            (`fp8q.engine.api.open_source`): its shards are downloaded as they are read, at most two on disk.
        source: the bf16/fp16/fp32 checkpoint PATH was quantized from (the same kinds); tensors are matched by name.
        on_event: called with `Started` once, then `TensorDone` per quantized weight.

    Returns:
        A report whose `problems` list every finding as one line naming the tensor; empty when all is well.

    Raises:
        Fp8qError: PATH does not exist, or SOURCE cannot be read. Problems with PATH itself are reported.
    """
    started = time.perf_counter()
    if isinstance(path, (str, Path)) and not Path(path).exists():
        raise CheckpointError(f"{path}: no such file or folder; give an FP8 checkpoint folder or a .safetensors file")
    report = VerifyReport(_name(path), _name(source) if source is not None else None)
    src = _read(source) if source is not None else None
    with _fetch(path) as fetch, _fetch(source) as src_fetch:
        try:
            checkpoint = _read(path)
            detected = _detect(checkpoint)
        except CheckpointError as e:
            report.problems.append(str(e))
        else:
            # A folder or a Hub repo fp8q made: every file against fp8q.json, on a thread beside the checks below.
            is_folder = not isinstance(path, (str, Path)) or Path(path).is_dir()
            stream = None if isinstance(path, (str, Path)) else path
            hashes = FileHashes(checkpoint, stream) if is_folder else None
            if detected.weights:
                report.format = detected.format.value
                for qw in detected.weights:
                    report.layouts[layout_words(qw.layout)] = report.layouts.get(layout_words(qw.layout), 0) + 1
                report.problems += _check_config(checkpoint, detected, is_folder)
                report.problems += detected.problems
                report.problems += _check_coverage(checkpoint, detected)
                report.problems += _check_rules(checkpoint, detected)
                # Where each output tensor comes from (a quantized source's weights decoded): read once, used twice.
                sources = _source_tensors(src) if src is not None else {}
                if src is not None:
                    report.problems += _check_against_source(checkpoint, sources, detected)
                readers = ShardReader(checkpoint, fetch), ShardReader(src or checkpoint, src_fetch)
                emit = on_event or (lambda event: None)
                _check_values(report, checkpoint, detected, src, sources, readers, emit)
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


def _name(checkpoint: str | Path | HubStream) -> str:
    return str(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint.repo_id


def _read(checkpoint: str | Path | HubStream) -> Checkpoint:
    if isinstance(checkpoint, (str, Path)):
        return read_checkpoint(Path(checkpoint))
    return read_checkpoint(checkpoint.folder, checkpoint.remote)


@contextmanager
def _fetch(checkpoint: str | Path | HubStream | None) -> Iterator[ShardsOnDemand | None]:
    """A streamed repo's shards, downloaded as they are read into a temporary folder (TMPDIR) deleted at the end."""
    if checkpoint is None or isinstance(checkpoint, (str, Path)):
        yield None
        return
    from fp8q.source.hub import explain
    from fp8q.source.streaming import ShardsOnDemand

    fetch = ShardsOnDemand(checkpoint, Path(tempfile.mkdtemp(prefix="fp8q-verify-")), explain)
    try:
        yield fetch
    finally:
        fetch.close()


def _detect(checkpoint: Checkpoint) -> DetectedLayout:
    try:
        return detect_layout(checkpoint.config, checkpoint.tensors)
    except CheckpointError as e:  # detect_layout does not know where the config came from
        raise CheckpointError(f"{checkpoint.root / CONFIG_FILE}: {e}") from None


def _check_values(
    report: VerifyReport,
    checkpoint: Checkpoint,
    detected: DetectedLayout,
    src: Checkpoint | None,
    sources: dict[str, _SourceTensor],
    readers: tuple[ShardReader, ShardReader],
    emit: EventCallback,
) -> None:
    """Read every scale (and with a source every weight, and every tensor that must not change), one tensor at a
    time, shard after shard, into rows and problems: a streamed repo's shards are each downloaded once. `sources`:
    `_source_tensors(src)`."""
    usable = [qw for qw in detected.weights if qw.scale is not None and qw.layout is not None]
    emit(Started(len(usable), sum(_nbytes(qw) for qw in usable)))
    exact = _exact_pairs(checkpoint, src, detected) if src is not None else []
    shards = sorted({qw.weight.shard for qw in usable} | {meta.shard for meta, _ in exact}, key=natural_key)
    # The order each checkpoint's shards are read in: a streamed repo fetches the next while one is checked.
    src_order = []
    for shard in shards:
        src_order += [origin.shard for meta, origin in exact if meta.shard == shard]
        src_order += [s.source.shard for qw in usable if qw.weight.shard == shard if (s := _source_of(sources, qw))]
    for reader, order in zip(readers, (shards, src_order), strict=True):
        if reader.fetch is not None:
            reader.fetch.expect(order)
    exact_problems: list[str] = []  # said before the values', as they were when read in a pass of their own
    value_problems: list[str] = []
    with readers[0] as reader, readers[1] as src_reader:
        for shard in shards:
            for meta, origin in (pair for pair in exact if pair[0].shard == shard):
                if not torch.equal(reader.read(meta).view(torch.uint8), src_reader.read(origin).view(torch.uint8)):
                    exact_problems.append(
                        f"tensor {meta.name} in {meta.shard} differs from the source; it must be copied bit for bit "
                        "(engines use it as it is stored)"
                    )
            for qw in (qw for qw in usable if qw.weight.shard == shard):
                row, problem = _check_weight(qw, reader, src_reader, _source_of(sources, qw))
                report.rows.append(row)
                if problem:
                    value_problems.append(problem)
                emit(TensorDone(qw.weight.name, _nbytes(qw)))
    report.problems += exact_problems + value_problems
    report.tensors_checked = len(report.rows)
    if src is not None:
        report.rows = _flag_outliers(report.rows)
        report.problems += [f"tensor {r.name}: {r.flagged}" for r in report.rows if r.flagged]
        report.rows.sort(key=lambda r: -(r.rel_error or 0.0))
    else:
        report.rows.sort(key=lambda r: natural_key(r.name))


def _nbytes(qw: QuantizedWeight) -> int:
    return qw.weight.nbytes + (qw.scale.nbytes if qw.scale is not None else 0)


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


# Tensors engines use as they are stored, which a conversion must copy bit for bit: MoE routing biases and gates
# (a downcast e_score_correction_bias mis-routes tokens), SSM and conv parameters, attention sinks, scales of
# norms and experts.
_EXACT = re.compile(
    r"(e_score_correction_bias|\.sinks|A_log|dt_bias|\.D|conv1d\.(weight|bias)|per_expert_scale|router\.scale"
    r"|shared_expert_gate\.weight|\.gate\.weight|router(\.layer)?\.(weight|bias)|layer_scalar)$"
)
_EXACT_MAX_BYTES = 64 << 20


def _exact_pairs(
    checkpoint: Checkpoint, src: Checkpoint, detected: DetectedLayout
) -> list[tuple[TensorMeta, TensorMeta]]:
    """Every tensor that must not change (1-D ones, routers, SSM parameters, ...) with the source tensor it must
    equal byte for byte; read and compared with the weights, shard by shard."""
    fp8, dropped = {qw.weight.name for qw in detected.weights}, detected.dropped
    pairs = []
    for name, meta in sorted(checkpoint.tensors.items(), key=lambda kv: natural_key(kv[0])):
        origin = src.tensors.get(name)
        exact = len(meta.shape) <= 1 or _EXACT.search(name)
        if not exact or name in fp8 or name in dropped or origin is None or meta.nbytes > _EXACT_MAX_BYTES:
            continue
        if (origin.dtype, origin.shape) != (meta.dtype, meta.shape):
            continue  # reported by _check_against_source
        pairs.append((meta, origin))
    return pairs


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


@dataclass(frozen=True)
class _SourceTensor:
    """Where an output tensor comes from in the source: a tensor, or one expert's part of a fused one."""

    source: TensorMeta  # the bytes to read (one expert's slice of a fused tensor)
    shape: tuple[int, ...]
    dtype: str
    part: Part | None = None
    fused: str | None = None  # the fused source tensor it was split from
    coded: QuantizedWeight | None = None  # a quantized source weight (convert's source): compared decoded

    def load(self, reader: ShardReader) -> torch.Tensor:
        """Its values: read, decoded as its format's client decodes them (float32) where the source is quantized."""
        w = reader.read(self.source)
        if self.coded is not None and self.coded.scale is not None and self.coded.layout is not None:
            second = reader.read(self.coded.second) if self.coded.second is not None else None
            w = self.coded.layout.dequantize(w, reader.read(self.coded.scale), torch.float32, second)
        return w if self.part is None else self.part.take(w)


def _source_tensors(src: Checkpoint) -> dict[str, _SourceTensor]:
    """Every tensor name a conversion of `src` can write, with where it comes from: each source tensor by
    its own name, and fused 3-D experts (and their biases) also by the per-expert names fp8q splits them into."""
    found = {name: _SourceTensor(meta, meta.shape, meta.dtype) for name, meta in src.tensors.items()}
    coded = _quantized_source(src)
    if coded is not None:  # a conversion's source: its weights by the names they decode to, its scales gone
        for name in coded.dropped | {qw.weight.name for qw in coded.weights}:
            found.pop(name, None)
        for qw in coded.weights:
            found[qw.name] = _SourceTensor(qw.weight, qw.shape, "F32", coded=qw)
    for meta in src.tensors.values():
        if not (is_fused_expert_weight(meta) or fused_weight_of(meta)):
            continue
        try:
            slices = split(meta, src.config)
        except Fp8qError:
            continue  # a fused tensor that cannot be split is compared whole
        for piece in slices:
            for part in piece.parts:
                shape = part.shape(piece.input.shape)
                found[part.name] = _SourceTensor(piece.input, shape, meta.dtype, part, meta.name)
    return found


def _quantized_source(src: Checkpoint) -> DetectedLayout | None:
    """A source with a `quantization_config` (an FP8 or FP4 checkpoint `convert` read): its weights, each with a
    scale to decode it by; None for a plain source, or one whose quantization fp8q cannot read."""
    if not quantization_config(src.config):
        return None
    try:
        detected = detect_layout(src.config, src.tensors)
    except CheckpointError:
        return None
    return replace(detected, weights=tuple(qw for qw in detected.weights if qw.layout is not None))


def _check_against_source(
    checkpoint: Checkpoint, sources: dict[str, _SourceTensor], detected: DetectedLayout
) -> list[str]:
    """Names, shapes and dtypes against the source's tensors (`_source_tensors`); values are compared weight by
    weight later. A fused expert tensor may be in the output whole, or split per expert (as fp8q writes it)."""
    problems = []
    dropped = detected.dropped
    fp8 = {qw.weight.name for qw in detected.weights}
    split_in_output = {s.fused for name, s in sources.items() if s.fused and name in checkpoint.tensors}
    for name, origin in sorted(sources.items(), key=lambda kv: natural_key(kv[0])):
        got = checkpoint.tensors.get(name)
        if got is None:
            if origin.fused is None and name not in split_in_output:
                problems.append(f"tensor {name} of the source ({origin.source.shard}) is missing")
            elif origin.fused in split_in_output:  # split, but not into this part
                problems.append(f"tensor {name} (split from {origin.fused} of the source) is missing")
        elif got.shape != origin.shape:
            problems.append(
                f"tensor {name} in {got.shard} has shape {list(got.shape)}, the source {list(origin.shape)}"
            )
        elif name not in fp8 and got.dtype != origin.dtype:
            problems.append(f"tensor {name} in {got.shard} is {got.dtype}, the source {origin.dtype}")
    for name, meta in sorted(checkpoint.tensors.items(), key=lambda kv: natural_key(kv[0])):
        if name not in sources and name not in dropped:
            problems.append(f"tensor {name} in {meta.shard} is not in the source")
    return problems


def _check_weight(
    qw: QuantizedWeight, reader: ShardReader, src_reader: ShardReader, src_meta: _SourceTensor | None
) -> tuple[TensorCheck, str | None]:
    """Scale and weight values, with a source the error of the dequantized weight; one tensor at a time.

    The weight is dequantized as its client computes it (`strict`: an overflow of the client's dtype stays
    inf), so a scale that makes any weight non-finite in the client is named.
    """
    assert qw.scale is not None and qw.layout is not None
    scale = reader.read(qw.scale)
    values = scale.float()
    finite = values[torch.isfinite(values)]
    row = TensorCheck(
        qw.weight.name,
        layout_words(qw.layout),
        qw.weight.shape,
        float(finite.min()) if finite.numel() else math.nan,
        float(finite.max()) if finite.numel() else math.nan,
    )
    q = reader.read(qw.weight)
    problem = value_problem(qw, q, scale)
    if problem:
        return row, problem
    w = src_meta.load(src_reader) if src_meta is not None else None
    diff_sq = ref_sq = 0.0
    max_abs = 0.0
    rows, cols = q.shape
    for r0, r1, scale_rows in numerics.row_bands(rows, cols, qw.layout):
        deq = numerics.dequantize(q[r0:r1], scale[scale_rows], qw.layout, torch.float64, strict=True)
        if not bool(torch.isfinite(deq).all()):
            client = qw.layout.client_dtype(scale.dtype)
            return row, (
                f"tensor {qw.scale.name} in {qw.scale.shard} makes {qw.weight.name} overflow to inf in the "
                f"{str(client).removeprefix('torch.')} its client computes in; quantize it again"
            )
        if w is None or src_meta is None:
            continue
        ref = w[r0:r1].double()
        diff = deq - ref
        diff_sq += float(diff.square().sum())
        ref_sq += float(ref.square().sum())
        if diff.numel():
            max_abs = max(max_abs, float(diff.abs().max()))
    if w is None:
        return row, None
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    snr = math.inf if diff_sq == 0 else (10 * math.log10(ref_sq / diff_sq) if ref_sq > 0 else -math.inf)
    return replace(row, rel_error=rel, max_abs_error=max_abs, snr_db=snr), None


def _source_of(sources: dict[str, _SourceTensor], qw: QuantizedWeight) -> _SourceTensor | None:
    origin = sources.get(qw.weight.name)
    if origin is None or origin.shape != qw.weight.shape or origin.dtype in FP8_NAMES:
        return None  # reported by _check_against_source
    return origin


def _flag_outliers(rows: list[TensorCheck]) -> list[TensorCheck]:
    """Flag errors that are large outright, or far above the checkpoint's median."""
    errors = [r.rel_error for r in rows if r.rel_error is not None and math.isfinite(r.rel_error)]
    median = statistics.median(errors) if errors else 0.0
    flagged = []
    for r in rows:
        why = None
        if r.rel_error is not None and r.snr_db is not None:
            numbers = f"relative error {r.rel_error:.4f}, SNR {r.snr_db:.1f} dB, max abs error {r.max_abs_error:.4g}"
            if r.rel_error > MAX_REL_ERROR or r.snr_db < MIN_SNR_DB:
                why = f"{numbers}: far from the source (limits {MAX_REL_ERROR} / {MIN_SNR_DB} dB)"
            elif r.rel_error > max(OUTLIER_FACTOR * median, OUTLIER_FLOOR):
                why = f"{numbers}: more than {OUTLIER_FACTOR:g}x the median {median:.4f} of the checkpoint"
        flagged.append(replace(r, flagged=why))
    return flagged


__all__ = ["TensorCheck", "VerifyReport", "verify"]
