"""The pure planner: from a validated `Checkpoint` and the options, the complete output.

Imports: errors, dtypes, source.checkpoint, plan (selection, fp8_source), layouts (base, detect, inputs), models
(architectures, experts). Before any tensor data is read the plan fixes every output tensor's name, dtype, shape and
byte offset, every shard header, the index and the config, so the writer can stream and `inspect` can show the whole
result.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from fp8q.dtypes import ITEMSIZE, ORDER, config_name
from fp8q.errors import CheckpointError
from fp8q.layouts.base import Layout
from fp8q.layouts.detect import QUANTIZATION_ONLY, DetectedLayout, QuantizedWeight
from fp8q.layouts.inputs import InputLayout
from fp8q.models.architectures import GENERIC, Architecture, groups
from fp8q.models.experts import Part, fused_weight_of, is_fused_expert_weight, split
from fp8q.plan.fp8_source import already_in, source_outlook
from fp8q.plan.selection import Selection, check_not_quantized, natural_key, select
from fp8q.source.checkpoint import CONFIG_FILE, Checkpoint, Shard, TensorMeta

SHARD_METADATA = {"format": "pt"}


class Action(str, Enum):
    KEEP = "keep"
    QUANTIZE = "quantize"
    DEQUANTIZE = "dequantize"  # an FP8 weight of the source, written in high precision
    REQUANTIZE = "requantize"  # an FP8 weight of the source, dequantized, then quantized in the new layout

    @property
    def quantizes(self) -> bool:
        return self in (Action.QUANTIZE, Action.REQUANTIZE)

    @property
    def dequantizes(self) -> bool:
        return self in (Action.DEQUANTIZE, Action.REQUANTIZE)


@dataclass(frozen=True, slots=True)
class OutTensor:
    """One tensor of an output shard; `start` is an absolute offset in the output file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int = 0
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class Piece:
    """One output of a job: a kept tensor, or a quantized weight and its scale. `part` says how it
    is cut from the source when the source is one expert's slice of a fused tensor."""

    out: OutTensor
    scale: OutTensor | None = None
    part: Part | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """One source tensor (or one expert's slice of a fused one) and the tensors made from it."""

    input: TensorMeta  # the source tensor it reads (or one expert's slice of it)
    action: Action
    pieces: tuple[Piece, ...]
    # A quantized source weight's scale (in whichever shard holds it) and the layout they are in; FP4's second,
    # per-tensor scale where it has one.
    scale: TensorMeta | None = None
    input_layout: Layout | None = None
    second: TensorMeta | None = None

    @property
    def decoded_shape(self) -> tuple[int, ...]:
        """The source weight's shape once decoded (FP4 packs two values a byte)."""
        return self.pieces[0].out.shape if self.action.dequantizes else self.input.shape

    @property
    def outputs(self) -> tuple[OutTensor, ...]:
        return tuple(t for p in self.pieces for t in (p.out, p.scale) if t is not None)

    @property
    def is_copy(self) -> bool:
        """Kept whole: its bytes are copied file to file, never read into memory."""
        return self.action is Action.KEEP and self.pieces[0].part is None


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One output shard, mirroring one input shard; `jobs` are in input file order."""

    input: Shard  # the source shard it mirrors
    name: str
    header: bytes
    size: int
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Plan:
    checkpoint: Checkpoint
    layout: Layout | None  # None: nothing is quantized (dequantize)
    shards: tuple[ShardPlan, ...]
    ignored: tuple[str, ...]
    quantization_config: dict[str, Any]
    config: dict[str, Any] | None = field(repr=False)
    # Why this output must not be written (no config, nothing quantized, layers an engine could not load):
    # `quantize` refuses, `inspect` and `--dry-run` exit 1. See fp8q.plan.checks.
    problems: tuple[str, ...] = ()
    # One line each that a user should read but that does not stop the run (a client that mis-loads the layout,
    # files left out).
    notes: tuple[str, ...] = ()
    architecture: Architecture = GENERIC  # the table entry whose rules applied
    kept: tuple[tuple[str, str], ...] = ()  # (module, why) for each Linear a rule kept
    detected: DetectedLayout | None = None  # an FP8 source's layout (dequantize, convert)
    dtype: str | None = None  # the high-precision dtype FP8 source weights are dequantized to
    source: str = ""  # SRC as a user names it: a Hub repo as `org/name@commit`, else the folder ("": the folder)

    @property
    def jobs(self) -> list[Job]:
        return [job for shard in self.shards for job in shard.jobs]

    @property
    def n_quantized(self) -> int:
        """Quantized weights written (a fused expert tensor counts once per expert and projection)."""
        return sum(len(job.pieces) for job in self.jobs if job.action.quantizes)

    @property
    def n_kept(self) -> int:
        """Tensors written as they were (a dequantized weight counts as dequantized, not kept)."""
        return sum(len(job.pieces) for job in self.jobs if job.action is Action.KEEP)

    @property
    def n_dequantized(self) -> int:
        return sum(1 for job in self.jobs if job.action.dequantizes)

    @property
    def n_copied(self) -> int:
        """Quantized source weights already in the target layout, copied with their scales byte for byte."""
        quantized = {qw.weight.name for qw in self.detected.weights} if self.detected else set()
        return sum(1 for job in self.jobs if job.action is Action.KEEP and job.input.name in quantized)

    @property
    def bytes_in(self) -> int:
        return self.checkpoint.total_bytes

    @property
    def bytes_out(self) -> int:
        return sum(shard.size for shard in self.shards)

    @property
    def largest_quantized(self) -> int:
        """The largest source tensor read into memory to be transformed (the others are copied file to file)."""
        return max((j.input.nbytes for j in self.jobs if j.action is not Action.KEEP), default=0)

    def index(self) -> dict[str, Any]:
        """`model.safetensors.index.json`: every output tensor, scales included."""
        weight_map = {t.name: s.name for s in self.shards for j in s.jobs for t in j.outputs}
        total = sum(t.nbytes for s in self.shards for j in s.jobs for t in j.outputs)
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def make_plan(
    checkpoint: Checkpoint,
    layout: Layout | None,
    ignore: tuple[str, ...] = (),
    targets: tuple[str, ...] = (),
    *,
    detected: DetectedLayout | None = None,
    dtype: str | None = None,
) -> Plan:
    """Plan the conversion; pure apart from reading nothing at all.

    Args:
        layout: the FP8 layout to write, or None to quantize nothing (dequantize).
        detected: for an FP8 checkpoint, its detected layout: its FP8 weights are dequantized to `dtype`, their
            scales dropped, and the rest planned as for a checkpoint that held those weights in `dtype`
            (so converting equals dequantizing, then quantizing).

    Raises:
        CheckpointError / UnsupportedTensorError: from the tensor selection.
    """
    config = checkpoint.config
    tensors = list(checkpoint.tensors.values())
    fp8: dict[str, QuantizedWeight] = {}
    if detected is None:
        check_not_quantized(config, str(checkpoint.root / CONFIG_FILE))
    else:
        assert dtype is not None
        fp8 = {qw.weight.name: qw for qw in detected.weights}
        config = plain_config(config, dtype) if config is not None else None
        # What a read-only format keeps beside its quantization_config (DeepSeek-V4's expert_dtype), set for the output.
        codecs = {type(qw.layout): qw.layout for qw in detected.weights if isinstance(qw.layout, InputLayout)}
        for codec in codecs.values():
            config = codec.output_config(config, layout is not None) if config is not None else None
        tensors = [
            replace(m, name=fp8[m.name].name, dtype=dtype, shape=fp8[m.name].shape) if m.name in fp8 else m
            for m in tensors
            if m.name not in detected.dropped
        ]
    if layout is None:
        selection = Selection((), ())
    else:
        # From a format fp8q only reads (FP4, DeepSeek-V4's), what its source quantized and nothing else: the rest
        # the release keeps in high precision for a reason (DeepSeek-V4's compressors and indexers, say).
        read_only = detected is not None and any(isinstance(qw.layout, InputLayout) for qw in detected.weights)
        only = {qw.name.rpartition(".")[0] for qw in fp8.values()} if read_only else None
        selection = select(tensors, config, ignore, targets, only)
    to_quantize = set(selection.quantize)
    copied = {name for name, qw in fp8.items() if qw.name in to_quantize and already_in(qw, layout, dtype)}
    jobs = [
        (shard, _plan_jobs(shard, layout, to_quantize, config, fp8, dtype, detected, copied))
        for shard in checkpoint.shards
    ]
    check_output_names([job for _, shard_jobs in jobs for job in shard_jobs])
    # A shard of nothing but scales has nothing left to write.
    shards = [_place_shard(shard, shard_jobs) for shard, shard_jobs in jobs if shard_jobs]
    qconfig: dict[str, Any] = {}
    if layout is not None:
        qconfig = layout.quantization_config(list(selection.ignored))
    if config is not None and layout is not None:
        # Every other key keeps its place and value; the torch_dtype stays the compute dtype.
        config = {**config, "quantization_config": qconfig}
    return Plan(
        checkpoint,
        layout,
        tuple(shards),
        selection.ignored,
        qconfig,
        config,
        architecture=selection.architecture,
        kept=selection.kept,
        detected=detected,
        dtype=dtype,
    )


def plain_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json without its quantization section, saying the dtype the weights now have (under the key it
    already has: `dtype` in transformers 5, `torch_dtype` before); every other key keeps its place and value."""
    plain = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    for key in ("dtype", "torch_dtype"):
        if key in plain:
            plain[key] = config_name(dtype)
    return plain


def _plan_jobs(
    shard: Shard,
    layout: Layout | None,
    to_quantize: set[str],
    config: dict[str, Any] | None,
    fp8: dict[str, QuantizedWeight],
    dtype: str | None,
    detected: DetectedLayout | None,
    copied: set[str],
) -> list[Job]:
    """What becomes of each tensor of one source shard, in file order; no offsets yet. `copied`: quantized source
    weights already in the target layout, kept with their scales as they are."""
    jobs: list[Job] = []
    kept_scales = {s.name for name in copied if (s := fp8[name].scale) is not None}
    for meta in shard.tensors:
        if detected is not None and meta.name in detected.dropped and meta.name not in kept_scales:
            continue
        fused_weight = fused_weight_of(meta)
        qw = fp8.get(meta.name)
        if meta.name in copied:
            jobs.append(Job(meta, Action.KEEP, (Piece(OutTensor(meta.name, meta.dtype, meta.shape)),)))
        elif qw is not None:
            assert dtype is not None
            if qw.name in to_quantize:
                assert layout is not None
                pieces: tuple[Piece, ...] = (_quantized(qw.name, dtype, qw.shape, layout),)
                action = Action.REQUANTIZE
            else:
                pieces, action = (Piece(OutTensor(qw.name, dtype, qw.shape)),), Action.DEQUANTIZE
            jobs.append(Job(meta, action, pieces, qw.scale, qw.layout, qw.second))
        elif meta.name in to_quantize and is_fused_expert_weight(meta):
            assert layout is not None
            for piece in split(meta, config):
                pieces = tuple(
                    _quantized(p.name, meta.dtype, p.shape(piece.input.shape), layout, p) for p in piece.parts
                )
                jobs.append(Job(piece.input, Action.QUANTIZE, pieces))
        elif fused_weight is not None and fused_weight in to_quantize:
            # The biases of split experts are split the same way, to sit beside their weights.
            for piece in split(meta, config):
                pieces = tuple(
                    Piece(OutTensor(p.name, meta.dtype, p.shape(piece.input.shape)), part=p) for p in piece.parts
                )
                jobs.append(Job(piece.input, Action.KEEP, pieces))
        elif meta.name in to_quantize:
            assert layout is not None
            jobs.append(Job(meta, Action.QUANTIZE, (_quantized(meta.name, meta.dtype, meta.shape, layout),)))
        else:
            jobs.append(Job(meta, Action.KEEP, (Piece(OutTensor(meta.name, meta.dtype, meta.shape)),)))
    return jobs


def _place_shard(shard: Shard, jobs: list[Job]) -> ShardPlan:
    """The output shard of a source shard's jobs: its header, and every output tensor at its offset."""
    header, placed = build_header([t for job in jobs for t in job.outputs], SHARD_METADATA)
    placed_jobs = tuple(_place(job, placed) for job in jobs)
    size = len(header) + sum(t.nbytes for t in placed.values())
    return ShardPlan(shard, shard.name, header, size, placed_jobs)


def check_output_names(jobs: list[Job]) -> None:
    """Every output tensor has a name of its own, and a weight fp8q quantizes has no scale but the one fp8q makes.

    A source holding both `X.weight` (to quantize) and `X.weight_scale`, or a fused expert tensor beside
    per-expert tensors of the names it splits into, would give a shard whose header holds one of the two (a hole
    in the file), or a weight with two scales: engines fail on either, or load the wrong one.

    Raises:
        CheckpointError: naming both sources of the clash.
    """
    made: dict[str, Job] = {}
    for job in jobs:
        for t in job.outputs:
            if t.name in made:
                first = made[t.name]
                raise CheckpointError(
                    f"output tensor {t.name} would be written twice: {_origin(first, t.name)} and "
                    f"{_origin(job, t.name)}; a checkpoint holds one tensor per name: remove one of them from the "
                    f"source{_keep_hint(first, job)}"
                )
            made[t.name] = job
    quantized = {p.out.name.removesuffix(".weight") for job in jobs if job.action.quantizes for p in job.pieces}
    for job in jobs:
        for t in job.outputs:
            module, _, suffix = t.name.rpartition(".")
            if not job.action.quantizes and module in quantized and suffix in QUANTIZATION_ONLY:
                raise CheckpointError(
                    f"tensor {t.name} in {job.input.shard} of the source is a quantization tensor of "
                    f"{module}.weight, which fp8q quantizes with a scale of its own: the output would hold two "
                    f"scales for one weight; remove the stray tensor from the source, or keep {module} as it is "
                    f"with --ignore '^{re.escape(module)}$'"
                )


def _keep_hint(*jobs: Job) -> str:
    """How to keep the quantized one of two clashing jobs as it is, where one quantizes."""
    for job in jobs:
        if job.action.quantizes:
            # A fused expert tensor is ignored by its own name, a Linear weight by its module's.
            fused = job.input.name.partition(" (expert ")[0]
            module = fused if fused != job.input.name else job.input.module
            return f", or keep {module} as it is with --ignore '^{re.escape(module)}$'"
    return ""


def _origin(job: Job, name: str) -> str:
    """Where an output tensor comes from, in words."""
    tensor = job.input
    where = f"in {tensor.shard} of the source"
    if " (expert " in tensor.name:
        fused, _, expert = tensor.name.partition(" (expert ")
        return f"split from expert {expert.rstrip(')')} of {fused} {where}"
    if job.action.quantizes and name != tensor.name:
        return f"the scale fp8q makes for {tensor.name} {where}"
    return f"tensor {tensor.name} {where}"


def _quantized(name: str, dtype: str, shape: tuple[int, ...], layout: Layout, part: Part | None = None) -> Piece:
    rows, cols = shape
    module = name.removesuffix(".weight")
    scale = OutTensor(f"{module}.{layout.scale_suffix}", layout.scale_dtype(dtype), layout.scale_shape(rows, cols))
    return Piece(OutTensor(name, "F8_E4M3", shape), scale, part)


def _place(job: Job, placed: dict[str, OutTensor]) -> Job:
    pieces = tuple(Piece(placed[p.out.name], placed[p.scale.name] if p.scale else None, p.part) for p in job.pieces)
    return replace(job, pieces=pieces)


def build_header(tensors: list[OutTensor], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, OutTensor]]:
    """The exact header `safetensors.torch.save_file` writes for these tensors, and their offsets.

    safetensors orders data by dtype (its enum order, highest first) then by name, writes compact
    JSON in that same order after `__metadata__`, and pads the JSON with spaces to a multiple of 8.
    """
    ordered = sorted(tensors, key=lambda t: (-ORDER[t.dtype], t.name))
    entries: dict[str, Any] = {}
    if metadata is not None:
        entries["__metadata__"] = metadata
    offset = 0
    sized = []
    for t in ordered:
        nbytes = math.prod(t.shape) * ITEMSIZE[t.dtype]
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        sized.append((t, offset, nbytes))
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    header = len(text).to_bytes(8, "little") + text
    placed = {t.name: OutTensor(t.name, t.dtype, t.shape, len(header) + off, nbytes) for t, off, nbytes in sized}
    return header, placed


def as_data(plan: Plan) -> dict[str, Any]:
    """The plan as plain data, for `inspect --json` and the manifest."""
    return {
        "source": plan.source or str(plan.checkpoint.root),
        "source_folder": str(plan.checkpoint.root),
        "scheme": plan.layout.scheme.value if plan.layout else None,
        "format": plan.layout.format.value if plan.layout else None,
        "block_size": list(plan.layout.block) if plan.layout and plan.layout.block else None,
        "tensors_quantized": plan.n_quantized,
        "tensors_kept": plan.n_kept,
        "ignored_modules": list(plan.ignored),
        "shards": [s.name for s in plan.shards],
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "largest_quantized_tensor_bytes": plan.largest_quantized,
        "side_files": list(plan.checkpoint.side_files),
        "skipped_files": list(plan.checkpoint.skipped_files),
        "problems": list(plan.problems),
        "notes": list(plan.notes),
        "architecture": plan.architecture.name,
        "kept_by_rule": dict(plan.kept),
        "split_experts": split_experts(plan),
        "fused_groups": fused_groups(plan),
        "mtp": mtp_summary(plan),
        **({"source_layouts": source_outlook(plan.detected, plan.layout)} if plan.detected is not None else {}),
    }


def fused_groups(plan: Plan) -> dict[str, int]:
    """How many instances of each group of layers that vLLM loads as one there are (all quantized alike)."""
    modules = {p.out.name.removesuffix(".weight") for j in plan.jobs if j.action is Action.QUANTIZE for p in j.pieces}
    modules |= set(plan.ignored)
    found = {}
    for group in groups(plan.architecture):
        parents = {m.rpartition(".")[0] for m in modules if m.rpartition(".")[2] in group}
        count = sum(1 for parent in parents if sum(f"{parent}.{g}" in modules for g in group) > 1)
        if count:
            found["+".join(group)] = count
    return found


def split_experts(plan: Plan) -> dict[str, int]:
    """Each fused 3-D expert tensor that is split, with the number of per-expert weights made from it."""
    found: dict[str, int] = {}
    for job in plan.jobs:
        if job.action is Action.QUANTIZE and job.pieces[0].part is not None:
            fused = job.input.name.rpartition(" (expert ")[0]
            found[fused] = found.get(fused, 0) + len(job.pieces)
    return found


def mtp_summary(plan: Plan) -> dict[str, list[str]]:
    """The MTP / nextn draft layers' Linear modules, quantized and kept."""
    quantized = []
    config = plan.checkpoint.config or {}
    text = config.get("text_config")
    layers = config.get("num_hidden_layers", text.get("num_hidden_layers") if isinstance(text, dict) else None)
    for job in plan.jobs:
        for piece in job.pieces:
            module = piece.out.name.removesuffix(".weight")
            if not is_mtp(module, layers) or not piece.out.name.endswith(".weight"):
                continue
            if job.action is Action.QUANTIZE:
                quantized.append(module)
    kept = [m for m in plan.ignored if is_mtp(m, layers)]
    return {"quantized": quantized, "kept": kept} if quantized or kept else {}


def is_mtp(module: str, layers: Any) -> bool:
    """An MTP / nextn draft layer's module: under `mtp.`, or in a decoder layer past num_hidden_layers."""
    if module.startswith("mtp.") or ".mtp." in module:
        return True
    m = re.search(r"(^|\.)layers\.(\d+)\.", module)
    return m is not None and isinstance(layers, int) and int(m[2]) >= layers


__all__ = [
    "Action",
    "Job",
    "OutTensor",
    "Piece",
    "Plan",
    "ShardPlan",
    "build_header",
    "as_data",
    "make_plan",
    "natural_key",
]
