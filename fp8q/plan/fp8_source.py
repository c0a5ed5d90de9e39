"""An FP8 checkpoint as the source of a conversion (dequantize, convert): its layout, checked, and what it turns into.

Imports: errors, source.checkpoint, layouts (base, detect, inputs). Pure: everything here is decided from
config and headers, before any data is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fp8q.errors import CheckpointError, UsageError
from fp8q.layouts.base import Layout
from fp8q.layouts.detect import DetectedLayout, QuantizedWeight, detect_layout, layout_words
from fp8q.layouts.inputs import InputLayout
from fp8q.source.checkpoint import CONFIG_FILE, Checkpoint

# The --dtype choices, by the names configs use, and their safetensors names.
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Calibrated tensors of a static layout, which fp8q's dynamic layouts have no place for.
STATIC_SUFFIXES = ("input_scale", "activation_scale", "output_scale", "k_scale", "v_scale", "kv_scale")


def detect_fp8(checkpoint: Checkpoint) -> DetectedLayout:
    """The checkpoint's FP8 weights, each with a scale it can be dequantized with.

    A scale an engine would refuse for its name or dtype still dequantizes (rescuing such checkpoints is one use
    of `dequantize`); a weight without one usable scale cannot.

    Raises:
        CheckpointError: no FP8 weight, a quantization method fp8q does not read, or a weight without a usable
            scale, naming it.
    """
    try:
        detected = detect_layout(checkpoint.config, checkpoint.tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint.root / CONFIG_FILE}: {e}") from None
    if not detected.weights:
        if detected.unread:
            raise CheckpointError(
                f"{checkpoint.root / CONFIG_FILE}: quantization_config group {', '.join(detected.unread)} is a layout "
                "fp8q does not read (it reads FP8, MXFP4 and NVFP4 weights); nothing to dequantize or convert"
            )
        raise CheckpointError(f"{checkpoint.root}: no FP8 tensors, nothing to dequantize or convert")
    for qw in detected.weights:
        if qw.layout is None:
            raise CheckpointError(f"{checkpoint.root}: {qw.problem}")
        if qw.weight.dtype != "F8_E4M3" and not isinstance(qw.layout, InputLayout):
            raise CheckpointError(
                f"tensor {qw.weight.name} in {qw.weight.shard} is {qw.weight.dtype}; fp8q reads float8_e4m3fn weights"
            )
    return detected


def output_dtype(dtype: str | None, config: Mapping[str, Any] | None) -> str:
    """The safetensors dtype FP8 weights are dequantized to: `dtype` (bfloat16, float16 or float32), else the
    config's own (`dtype`, or `torch_dtype` before transformers 5), else BF16.

    Raises:
        UsageError: a dtype that is not one of the three.
    """
    if dtype is None:
        found = (config or {}).get("dtype", (config or {}).get("torch_dtype"))
        dtype = found if isinstance(found, str) and found in DTYPES else "bfloat16"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_convertible(checkpoint: Checkpoint, source: DetectedLayout, layout: Layout) -> None:
    """Refuse a conversion that would silently lose what the source holds, or that would change nothing.

    Raises:
        CheckpointError: the source has static activation or KV-cache scales (fp8q's layouts are dynamic, so
            they would be dropped: calibrated values lost, and the engine's behaviour changed).
        UsageError: every weight is already in the target layout.
    """
    # An FP4 layer's activation scales are for FP4 activations: nothing an FP8 layer could use, so not lost.
    fp4 = {qw.weight.module for qw in source.weights if isinstance(qw.layout, InputLayout)}
    static = [m for m in source.extras if m.name.rpartition(".")[2] in STATIC_SUFFIXES and m.module not in fp4]
    for qw in source.weights:
        if isinstance(qw.layout, InputLayout) and qw.layout.convert_refusal:
            raise UsageError(f"{checkpoint.root}: {qw.layout.describe()}: {qw.layout.convert_refusal}")
    if static:
        first = static[0]
        raise CheckpointError(
            f"tensor {first.name} in {first.shard} is a static activation or KV-cache scale ({len(static)} such); "
            "fp8q's layouts compute activation scales at run time, so converting would drop these calibrated "
            "values: `fp8q dequantize` then `fp8q quantize` if you mean to"
        )
    if all(qw.layout == layout for qw in source.weights):
        raise UsageError(f"{checkpoint.root}: already {layout_words(layout)}; nothing to convert")


def source_outlook(source: DetectedLayout, target: Layout | None) -> dict[str, dict[str, Any]]:
    """The source's layouts in words, with how many weights each and (converted into `target`) what it keeps of them
    (`inspect --json`, the manifest)."""
    found: dict[str, dict[str, Any]] = {words: {"weights": n} for words, n in source_layouts(source).items()}
    if target is None:
        return found
    for qw in source.weights:
        # An FP8 layout fp8q writes, read back: no rule tells in advance; the conversion compares every value.
        keeps = "each weight checked value by value"
        found[layout_words(qw.layout)]["exact"] = (
            qw.layout.outlook(target) if isinstance(qw.layout, InputLayout) else keeps
        )
    return found


def already_in(qw: QuantizedWeight, layout: Layout | None, dtype: str | None) -> bool:
    """Whether a quantized source weight is stored as `layout` writes it, scale name and dtype too: then its bytes
    are copied (a requantization could move a value: its dequantized form is rounded to `dtype` first)."""
    if layout is None or dtype is None or qw.scale is None or qw.layout is None or qw.weight.dtype != "F8_E4M3":
        return False
    same = qw.layout == layout or (isinstance(qw.layout, InputLayout) and qw.layout.same_as(layout))
    named = qw.scale.name == f"{qw.weight.module}.{layout.scale_suffix}"
    return same and named and qw.scale.dtype == layout.scale_dtype(dtype)


def source_layouts(source: DetectedLayout | None) -> dict[str, int]:
    """The source's FP8 layouts in words, with how many weights each."""
    found: dict[str, int] = {}
    for qw in source.weights if source else ():
        found[layout_words(qw.layout)] = found.get(layout_words(qw.layout), 0) + 1
    return found


__all__ = [
    "DTYPES",
    "already_in",
    "check_convertible",
    "detect_fp8",
    "output_dtype",
    "source_layouts",
    "source_outlook",
]
