"""What each layout writes: scale tensor names, dtypes and shapes, and the `quantization_config`.

Imports: stdlib only. Exact names and keys follow FORMATS.md (compressed-tensors `float-quantized`,
vLLM/AutoFP8 `fp8` per-tensor, DeepSeek-V3 `fp8` block), compressed-tensors `mxfp8-quantized` as
llm-compressor's `model_free_ptq(scheme="MXFP8")` writes it, and DeepSeek-V3.1's power-of-two block
scales (`"scale_fmt": "ue8m0"`).
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
    MX = "mx"  # MXFP8: groups of 32 along the input dim, E8M0 (power-of-two) scales stored as uint8


class ScaleFormat(str, Enum):
    FLOAT = "float"
    UE8M0 = "ue8m0"  # block scales rounded up to a power of two (DeepGEMM on Blackwell, DeepSeek-V3.1)


MX_GROUP = 32


class Format(str, Enum):
    COMPRESSED_TENSORS = "compressed-tensors"
    FP8 = "fp8"


@dataclass(frozen=True, slots=True)
class Layout:
    """A scheme in a format: everything about the output that does not depend on the data."""

    scheme: Scheme
    format: Format
    block: tuple[int, int] = (128, 128)
    scale_format: ScaleFormat = ScaleFormat.FLOAT

    @property
    def scale_suffix(self) -> str:
        # DeepSeek-V3 named the block scale `weight_scale_inv` although it multiplies, like every other.
        if self.format is Format.FP8 and self.scheme is Scheme.BLOCK:
            return "weight_scale_inv"
        return "weight_scale"

    def scale_dtype(self, weight_dtype: str) -> str:
        """compressed-tensors keeps the weight's dtype for scales (MX: the E8M0 exponent, one byte); vLLM's fp8
        format wants float32."""
        if self.scheme is Scheme.MX:
            return "U8"
        return weight_dtype if self.format is Format.COMPRESSED_TENSORS else "F32"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.scheme is Scheme.CHANNEL:
            return (rows, 1)
        if self.scheme is Scheme.MX:
            return (rows, cols // MX_GROUP)
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
        if layout.scale_format is ScaleFormat.UE8M0:
            config["scale_fmt"] = "ue8m0"  # as DeepSeek-V3.1's config says it
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
    # Only keys every compressed-tensors release accepts: QuantizationArgs forbids unknown keys. MXFP8 needs
    # `scale_dtype` (which only the releases that have MX know): the keys llm-compressor writes for it.
    fmt = "float-quantized"
    if layout.scheme is Scheme.MX:
        fmt = "mxfp8-quantized"
        mx = {"group_size": MX_GROUP, "scale_dtype": "torch.uint8", "zp_dtype": None, "observer": None}
        weights = _quant_args("group", False, **mx)
        inputs = _quant_args("group", True, **mx)
    elif layout.scheme is Scheme.BLOCK:
        weights = _quant_args("block", False, block_structure=list(layout.block))
        inputs = _quant_args("group", True, group_size=layout.block[1])
    else:
        weights = _quant_args(layout.scheme.value, False)
        inputs = _quant_args("token", True)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
