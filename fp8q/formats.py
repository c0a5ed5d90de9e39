"""What each layout writes: scale tensor names, dtypes and shapes, and the `quantization_config`.

Imports: stdlib only. Exact names and keys follow FORMATS.md (compressed-tensors `float-quantized`,
vLLM/AutoFP8 `fp8` per-tensor, DeepSeek-V3 `fp8` block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Scheme(str, Enum):
    CHANNEL = "channel"
    BLOCK = "block"
    TENSOR = "tensor"


class Format(str, Enum):
    COMPRESSED_TENSORS = "compressed-tensors"
    FP8 = "fp8"


@dataclass(frozen=True, slots=True)
class Layout:
    """A scheme in a format: everything about the output that does not depend on the data."""

    scheme: Scheme
    format: Format
    block: tuple[int, int] = (128, 128)

    @property
    def scale_suffix(self) -> str:
        # DeepSeek-V3 named the block scale `weight_scale_inv` although it multiplies, like every other.
        if self.format is Format.FP8 and self.scheme is Scheme.BLOCK:
            return "weight_scale_inv"
        return "weight_scale"

    def scale_dtype(self, weight_dtype: str) -> str:
        """compressed-tensors keeps the weight's dtype for scales; vLLM's fp8 format wants float32."""
        return weight_dtype if self.format is Format.COMPRESSED_TENSORS else "F32"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.scheme is Scheme.CHANNEL:
            return (rows, 1)
        if self.scheme is Scheme.BLOCK:
            return (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))
        # AutoFP8 writes a 0-d scale; compressed-tensors a 1-element vector.
        return () if self.format is Format.FP8 else (1,)

    def quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        if self.format is Format.FP8:
            return _fp8_config(self, ignore)
        return _compressed_tensors_config(self, ignore)


def _fp8_config(layout: Layout, ignore: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if layout.scheme is Scheme.BLOCK:
        config["fmt"] = "e4m3"
        config["weight_block_size"] = list(layout.block)
    else:
        # transformers defaults a missing weight_block_size to [128, 128]; null means per-tensor.
        config["weight_block_size"] = None
    config["ignored_layers"] = ignore
    return config


def _quant_args(strategy: str, dynamic: bool, **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": strategy,
        "dynamic": dynamic,
        "group_size": None,
        "block_structure": None,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }
    args.update(extra)
    return args


def _compressed_tensors_config(layout: Layout, ignore: list[str]) -> dict[str, Any]:
    # Only keys every compressed-tensors release accepts: QuantizationArgs forbids unknown keys.
    if layout.scheme is Scheme.BLOCK:
        weights = _quant_args("block", False, block_structure=list(layout.block))
        inputs = _quant_args("group", True, group_size=layout.block[1])
    else:
        weights = _quant_args(layout.scheme.value, False)
        inputs = _quant_args("token", True)
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
