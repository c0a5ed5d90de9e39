"""Where each tensor of a checked checkpoint comes from in its source: the source tensor of the same name, one
expert's part of a fused source tensor (fp8q splits those), or a quantized source's weight decoded (a conversion's
source); and the names, shapes and dtypes of the two compared.

Imports: torch, dtypes, errors, layouts.detect, models (experts), plan.selection, source (checkpoint, reader).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fp8q.dtypes import FP8_NAMES
from fp8q.errors import CheckpointError, Fp8qError
from fp8q.layouts.detect import DetectedLayout, QuantizedWeight, detect_layout, quantization_config
from fp8q.models.experts import Part, fused_weight_of, is_fused_expert_weight, split
from fp8q.plan.selection import natural_key
from fp8q.source.checkpoint import Checkpoint, TensorMeta
from fp8q.source.reader import ShardReader


@dataclass(frozen=True)
class SourceTensor:
    """Where an output tensor comes from in the source: a tensor, or one expert's part of a fused one."""

    source: TensorMeta  # the bytes to read (one expert's slice of a fused tensor)
    shape: tuple[int, ...]
    dtype: str
    part: Part | None = None
    fused: str | None = None  # the fused source tensor it was split from
    coded: QuantizedWeight | None = None  # a quantized source weight (convert's source): compared decoded

    def load(self, reader: ShardReader, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Its values: read (into `buf` when given), decoded as its format's client decodes them (float32) where the
        source is quantized."""
        w = reader.read(self.source, buf)
        if self.coded is not None and self.coded.scale is not None and self.coded.layout is not None:
            second = reader.read(self.coded.second) if self.coded.second is not None else None
            w = self.coded.layout.dequantize(w, reader.read(self.coded.scale), torch.float32, second)
        return w if self.part is None else self.part.take(w)


def source_tensors(src: Checkpoint) -> dict[str, SourceTensor]:
    """Every tensor name a conversion of `src` can write, with where it comes from: each source tensor by
    its own name, and fused 3-D experts (and their biases) also by the per-expert names fp8q splits them into."""
    found = {name: SourceTensor(meta, meta.shape, meta.dtype) for name, meta in src.tensors.items()}
    coded = _quantized_source(src)
    if coded is not None:  # a conversion's source: its weights by the names they decode to, its scales gone
        for name in coded.dropped | {qw.weight.name for qw in coded.weights}:
            found.pop(name, None)
        for qw in coded.weights:
            found[qw.name] = SourceTensor(qw.weight, qw.shape, "F32", coded=qw)
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
                found[part.name] = SourceTensor(piece.input, shape, meta.dtype, part, meta.name)
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


def source_of(sources: dict[str, SourceTensor], qw: QuantizedWeight) -> SourceTensor | None:
    """The source of a quantized weight, where its values can be compared (`check_against_source` reports the rest)."""
    origin = sources.get(qw.weight.name)
    if origin is None or origin.shape != qw.weight.shape or origin.dtype in FP8_NAMES:
        return None
    return origin


def check_against_source(
    checkpoint: Checkpoint, sources: dict[str, SourceTensor], detected: DetectedLayout
) -> list[str]:
    """Names, shapes and dtypes against the source's tensors (`source_tensors`); values are compared weight by
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


__all__ = ["SourceTensor", "check_against_source", "source_of", "source_tensors"]
