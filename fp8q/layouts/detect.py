"""Recognize the FP8 layout of an existing checkpoint, weight by weight, from its config and headers alone.

Imports: torch, errors, dtypes, layouts (the registry's find), layouts (base, compressed_tensors, fp8, numerics,
vocabulary), source.checkpoint (types). Used by `verify` and `dequantize`, which read checkpoints fp8q did not write
(llm-compressor, AutoFP8, DeepSeek's own release), so nothing here assumes fp8q's conventions: every FP8 `X.weight` is
paired with `X.weight_scale` or `X.weight_scale_inv` through the tensor map (the scale may sit in another shard), and
its layout is read off the scale's shape, checked against what the `quantization_config` promises:

- compressed-tensors: scale `[1]` or 0-d (tensor), `[out, 1]` (channel), `[ceil(out/bh), ceil(in/bw)]` (block,
  `block_structure` from the config group; a `group` strategy is a block of `1 x group_size`).
- fp8 (vLLM / AutoFP8 / DeepSeek-V3): `weight_scale` F32 0-d or `[1]` (tensor), `weight_scale_inv` F32
  `[ceil(out/bh), ceil(in/bw)]` with `weight_block_size` (block). transformers names even its per-tensor
  scale `weight_scale_inv`, which is accepted too.

What is wrong with a weight is recorded as a one-line `problem` instead of raised, so `verify` can list every
problem at once while `dequantize` refuses on the first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fp8q.dtypes import FP8_NAMES
from fp8q.errors import CheckpointError
from fp8q.layouts import of_format, readers
from fp8q.layouts.base import Layout
from fp8q.layouts.compressed_tensors import CompressedTensorsLayout, match_name
from fp8q.layouts.fp8 import Fp8Layout
from fp8q.layouts.inputs import InputLayout
from fp8q.layouts.numerics import float_scale_problem, nan_codes
from fp8q.layouts.vocabulary import Format
from fp8q.source.checkpoint import TensorMeta

# Each format's family base: it reads the format's config (`read_config`) and its ignore list (`ignores`).
FAMILIES: dict[Format, type[CompressedTensorsLayout] | type[Fp8Layout]] = {
    Format.COMPRESSED_TENSORS: CompressedTensorsLayout,
    Format.FP8: Fp8Layout,
}
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")
# Tensors that only exist for quantization besides the weight scales: static activation scales, zero points
# (never needed for symmetric FP8, but some tools write them), and the KV-cache scales.
AUX_SUFFIXES = (
    "input_scale",
    "activation_scale",
    "output_scale",
    "weight_zero_point",
    "input_zero_point",
    "k_scale",
    "v_scale",
    "kv_scale",
    "weight_global_scale",  # NVFP4's per-tensor scale (paired with its weight where it has one)
    "input_global_scale",  # NVFP4's static activation scale, for FP4 activations: nothing to carry into FP8
)
# Every tensor that only serves quantization, by the last part of its name.
QUANTIZATION_ONLY = (*SCALE_SUFFIXES, *AUX_SUFFIXES)


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """One FP8 weight, its scale, and the layout the scale's shape says it has.

    `layout` is set exactly when the weight can be dequantized with `scale` (one scale, of a shape that fits a
    layout). `problem` is one line naming the tensor when something would stop an engine from loading it as
    it stands (a name or dtype problem leaves `layout` set: the values can still be checked).
    """

    weight: TensorMeta
    scale: TensorMeta | None
    layout: Layout | None
    problem: str | None = None
    second: TensorMeta | None = None  # FP4's per-tensor scale beside its group scale (NVFP4's global scale)

    @property
    def name(self) -> str:
        """The weight's name once decoded (`X.weight`)."""
        return self.weight.name if self.layout is None else self.layout.output_name(self.weight.name)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape once decoded."""
        return self.weight.shape if self.layout is None else self.layout.decoded_shape(self.weight.shape)


@dataclass(frozen=True)
class DetectedLayout:
    """The quantization of a whole checkpoint, as far as its config and headers tell."""

    format: Format
    quantization_config: dict[str, Any]
    weights: tuple[QuantizedWeight, ...]
    # Quantization-only tensors that are not the scale of an FP8 weight: input scales, zero points, KV-cache
    # scales and orphan weight scales. Dequantizing drops them with the scales.
    extras: tuple[TensorMeta, ...]
    # Module names and `re:` patterns the config leaves unquantized (compressed-tensors `ignore`, fp8
    # `ignored_layers` / `modules_to_not_convert`).
    ignore: tuple[str, ...]
    # compressed-tensors group targets (class names like "Linear", module names, `re:` patterns); empty for fp8.
    targets: tuple[str, ...]
    # compressed-tensors config groups in a layout no codec reads, in words: `group_0 (pack-quantized, 4-bit int)`.
    unread: tuple[str, ...] = ()

    @property
    def problems(self) -> list[str]:
        """Every problem found from names, shapes and dtypes: per-weight ones, then orphan scales."""
        found = [w.problem for w in self.weights if w.problem]
        weight_names = {w.weight.name for w in self.weights}
        for meta in self.extras:
            base, _, suffix = meta.name.rpartition(".")
            if suffix in SCALE_SUFFIXES and f"{base}.weight" not in weight_names:
                found.append(
                    f"tensor {meta.name} in {meta.shard} is a weight scale but {base}.weight is not FP8; "
                    "engines fail on a scale without its FP8 weight"
                )
        return found

    @property
    def dropped(self) -> set[str]:
        """Names of every tensor that only serves quantization (what a dequantized checkpoint leaves out)."""
        scales = {s.name for w in self.weights for s in (w.scale, w.second) if s is not None}
        return scales | {m.name for m in self.extras}

    @property
    def family(self) -> type[CompressedTensorsLayout] | type[Fp8Layout]:
        """What the checkpoint's format says: its config's rules, its ignore list's matching."""
        return FAMILIES[self.format]

    def is_ignored(self, module: str) -> bool:
        """Whether the config leaves this module unquantized."""
        return self.family.ignores(module, self.ignore)

    def is_targeted(self, meta: TensorMeta) -> bool:
        """Whether the config asks for this tensor's module to be quantized (before `ignore`)."""
        return bool(self.quantization_config) and self.family.targeted(meta, self.targets)  # no config, no promise


def layout_words(layout: Layout | None) -> str:
    """A layout in words, e.g. `compressed-tensors block 128x128`; "unknown" for none."""
    return "unknown" if layout is None else layout.describe()


def quantization_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `quantization_config` of a config.json (`compression_config` in old compressed-tensors)."""
    if not config:
        return None
    qc = config.get("quantization_config", config.get("compression_config"))
    return qc if isinstance(qc, dict) else None


def detect_layout(config: Mapping[str, Any] | None, tensors: Mapping[str, TensorMeta]) -> DetectedLayout:
    """Find every FP8 weight of a checkpoint, its scale and its layout.

    Args:
        config: the parsed config.json, or None (a lone `.safetensors` file): the format is then guessed
            from the scales' names, dtypes and shapes.
        tensors: the checkpoint's tensor map, every shard together.

    Raises:
        CheckpointError: a `quantization_config` of a method other than compressed-tensors or fp8.
    """
    qc = quantization_config(config) or {}
    fmt = _format(qc, tensors)
    reading = FAMILIES[fmt].read_config(qc, readers(fmt))  # what the config says, as its family reads it
    weights: list[QuantizedWeight] = []
    used: set[str] = set()
    for meta in tensors.values():
        suffix = meta.name.rpartition(".")[2]
        expected = reading.expected(meta)
        inputs = (expected,) if isinstance(expected, InputLayout) else reading.claimed
        codec = next((c for c in inputs if c.is_packed(meta, tensors)), None)
        if codec is not None:
            qw = _pair_packed(meta, tensors, codec)
        elif meta.dtype not in FP8_NAMES or suffix in QUANTIZATION_ONLY:
            continue  # FP8 zero points or KV scales are not weights
        else:
            qw = _pair(meta, tensors, fmt, None if isinstance(expected, InputLayout) else expected)
        used.update(s.name for s in (qw.scale, qw.second) if s is not None)
        weights.append(qw)
    extras = tuple(m for m in tensors.values() if m.name not in used and m.name.rpartition(".")[2] in QUANTIZATION_ONLY)
    return DetectedLayout(fmt, dict(qc), tuple(weights), extras, reading.ignore, reading.targets, reading.unread)


def _format(qc: Mapping[str, Any], tensors: Mapping[str, TensorMeta]) -> Format:
    method = qc.get("quant_method")
    # The format's own method, or one an input codec of its family reads (ModelOpt's, gpt-oss's `mxfp4`).
    methods: dict[Format, set[str]] = {}
    for fmt in Format:
        codecs = [c for c in readers(fmt) if issubclass(c, InputLayout)]
        methods[fmt] = {fmt.value, *(c.quant_method for c in codecs if c.quant_method)}
    found = next((fmt for fmt, names in methods.items() if method in names), None)
    if found is not None:
        return found
    if method is not None:
        known = sorted(name for names in methods.values() for name in names)
        raise CheckpointError(
            f"quantization_config has quant_method {method!r}; fp8q reads {', '.join(known)} checkpoints"
        )
    # No config: DeepSeek/transformers name the scale `_inv`, AutoFP8 writes 0-d F32 scales.
    scales = [m for m in tensors.values() if m.name.rpartition(".")[2] in SCALE_SUFFIXES]
    if any(m.name.endswith("_inv") for m in scales) or (scales and all(m.shape == () for m in scales)):
        return Format.FP8
    return Format.COMPRESSED_TENSORS


def _pair(meta: TensorMeta, tensors: Mapping[str, TensorMeta], fmt: Format, expected: Layout | None) -> QuantizedWeight:
    """Find an FP8 tensor's scale and tell its layout, or say what is wrong."""
    where = f"tensor {meta.name} in {meta.shard}"
    if not meta.name.endswith(".weight") or len(meta.shape) != 2:
        return QuantizedWeight(
            meta, None, None, f"{where} is {meta.dtype} with shape {list(meta.shape)}; fp8q handles 2-D FP8 weights"
        )
    module = meta.module
    found = [tensors[f"{module}.{s}"] for s in SCALE_SUFFIXES if f"{module}.{s}" in tensors]
    if not found:
        what = f"{module}.{expected.scale_suffix if expected else 'weight_scale'}"
        return QuantizedWeight(meta, None, None, f"{where} is FP8 but has no scale: {what} is missing")
    if len(found) > 1:
        names = " and ".join(s.name for s in found)
        return QuantizedWeight(meta, found[0], None, f"{where} has two scales, {names}; keep one")
    scale = found[0]
    rows, cols = meta.shape
    layout = _from_shape(scale.shape, rows, cols, fmt, expected)
    if layout is not None:
        # A scale whose dtype tells its layout (MXFP8's E8M0 exponents, uint8), where its shape fits that too.
        claimed = [cls() for cls in of_format(fmt) if cls.claims(scale.dtype)]
        layout = next((c for c in claimed if c.fits_scale(scale.shape, rows, cols)), layout)
    problem: str | None
    if layout is None:
        want = f"; {layout_words(expected)} needs {list(expected.scale_shape(rows, cols))}" if expected else ""
        problem = (
            f"tensor {scale.name} in {scale.shard} has shape {list(scale.shape)}, "
            f"which fits no FP8 layout of its {rows}x{cols} weight{want}"
        )
    elif expected is not None and layout != expected:
        problem = (
            f"tensor {scale.name} in {scale.shard} has shape {list(scale.shape)} ({layout_words(layout)}) "
            f"but the quantization_config says {layout_words(expected)}"
        )
    elif meta.dtype != "F8_E4M3":
        problem = f"tensor {meta.name} in {meta.shard} is {meta.dtype}; engines load F8_E4M3 weights"
    else:
        problem = layout.rule_problem(meta, scale)
    return QuantizedWeight(meta, scale, layout, problem)


def _pair_packed(meta: TensorMeta, tensors: Mapping[str, TensorMeta], layout: InputLayout) -> QuantizedWeight:
    """Find a packed FP4 weight's group scale (and its second scale, where the layout has one), or say what is
    missing."""
    where = f"tensor {meta.name} in {meta.shard}"
    scale_name, second_name = layout.scale_name(meta.name), layout.second_name(meta.name)
    scale = tensors.get(scale_name)
    second = tensors.get(second_name) if second_name else None
    if scale is None:
        return QuantizedWeight(meta, None, None, f"{where} is {layout.describe()} but {scale_name} is missing")
    if second_name and second is None:
        return QuantizedWeight(meta, scale, None, f"{where} is {layout.describe()} but {second_name} is missing")
    want = layout.expected_scale(meta.shape)
    if scale.shape != want:
        needs = f"needs {list(want)}" if want else "needs inputs in whole groups"
        return QuantizedWeight(
            meta,
            scale,
            None,
            f"tensor {scale.name} in {scale.shard} has shape {list(scale.shape)}; {layout.describe()} {needs} "
            f"for its {list(meta.shape)} packed weight",
            second,
        )
    return QuantizedWeight(meta, scale, layout, layout.rule_problem(meta, scale), second)


def _from_shape(shape: tuple[int, ...], rows: int, cols: int, fmt: Format, expected: Layout | None) -> Layout | None:
    """The layout a scale of this shape gives a rows x cols weight, the config's own first."""
    candidates = [*([expected] if expected else [])]
    for cls in of_format(fmt):
        candidates += cls.shape_candidates(expected)
    return next((layout for layout in candidates if layout.fits_scale(shape, rows, cols)), None)


def value_problem(
    qw: QuantizedWeight, q: torch.Tensor, scale: torch.Tensor, second: torch.Tensor | None = None
) -> str | None:
    """What makes a quantized weight's values unusable, as one line naming the tensor, or None: a scale no client
    can use (integer, NaN, inf, zero or negative; a NaN E8M0 byte), or NaN codes in an FP8 weight itself."""
    assert qw.scale is not None and qw.layout is not None
    bad_scale = qw.layout.scale_problem(scale)
    if bad_scale:
        return (
            f"tensor {qw.scale.name} in {qw.scale.shard} has {bad_scale}; {qw.weight.name} cannot be dequantized, "
            "quantize it again"
        )
    if second is not None and qw.second is not None:
        bad_second = float_scale_problem(second)
        if bad_second:
            return f"tensor {qw.second.name} in {qw.second.shard} has {bad_second}; {qw.weight.name} cannot be decoded"
    if isinstance(qw.layout, InputLayout):
        return None  # every FP4 code is a number
    nans = nan_codes(q)
    if nans:
        return (
            f"tensor {qw.weight.name} in {qw.weight.shard} holds {nans} NaN code(s) (0x7f/0xff) among its "
            f"{q.numel()} FP8 values; the checkpoint is corrupt, quantize it again"
        )
    return None


__all__ = [
    "DetectedLayout",
    "QuantizedWeight",
    "layout_words",
    "detect_layout",
    "match_name",
    "quantization_config",
    "value_problem",
]
