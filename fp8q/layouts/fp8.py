"""What vLLM's `fp8` layouts share (AutoFP8 per-tensor, DeepSeek-V3 blocks): the `quantization_config` they write,
the client's arithmetic (q times the scale in float32: transformers' `Fp8Dequantize`, DeepSeek's `weight_dequant`),
the rules for scale names and dtypes, and how its config is read back (`weight_block_size`, `ignored_layers`).

Imports: torch, layouts (base, compressed_tensors, inputs, vocabulary), models.linear, source.checkpoint (types, for
type checking).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fp8q.layouts.base import Layout
from fp8q.layouts.compressed_tensors import match_name
from fp8q.layouts.inputs import ConfigReading, InputLayout
from fp8q.layouts.vocabulary import Format
from fp8q.models.linear import is_linear_weight, keep_reason

if TYPE_CHECKING:
    from fp8q.source.checkpoint import TensorMeta


def pair_of_ints(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)


class Fp8Layout(Layout):
    format = Format.FP8
    ignore_key: ClassVar[str] = "ignored_layers"
    # Engines match `ignored_layers` each their own way (see `ignores`): nothing follows from an FP8 weight there.
    ignore_is_exact: ClassVar[bool] = False
    # What vLLM's fp8 format has no place for, by --scheme: the line that says why it is no layout.
    missing: ClassVar[dict[str, str]] = {"channel": "per-channel", "mx": "MX"}

    def scale_dtype(self, weight_dtype: str) -> str:
        return "F32"

    def client_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def config_keys(self) -> dict[str, Any]:
        """The keys between `activation_scheme` and `ignored_layers`, in the order vLLM's releases write them."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> Layout | None:
        """The layout an fp8 `quantization_config` says, where it is this one."""
        return None

    def quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        return {"quant_method": "fp8", "activation_scheme": "dynamic", **self.config_keys(), "ignored_layers": ignore}

    def rule_problem(self, weight: TensorMeta, scale: TensorMeta) -> str | None:
        if scale.dtype != "F32":
            return f"tensor {scale.name} in {scale.shard} is {scale.dtype}; fp8 scales are F32"
        return None

    def scales_text(self) -> str:
        return f"`{self.scale_suffix}`, {self.granularity()}, in float32"

    def activations_text(self, quantization_config: dict[str, Any] | None) -> str:
        if quantization_config and quantization_config.get("activation_scheme"):
            return f"FP8, {quantization_config['activation_scheme']} scales, computed by the engine at run time"
        return "as the engine decides"

    def transformers_lead(self) -> str:
        return "transformers loads it (its built-in FP8 support; weight dims must be multiples of the block):"

    # ── the family's config, read back ──

    @classmethod
    def read_config(cls, qc: Mapping[str, Any], codecs: list[type[Layout]]) -> ConfigReading:
        """The one layout the config promises every weight (vLLM reads a missing `weight_block_size` as per-tensor,
        transformers as 128x128: then the scale decides), the input codecs of the family (fp8, modelopt, mxfp4)
        its weights may be in, each found by the codec's own reading of the config (which tensors are theirs their
        names and dtypes then tell: `is_packed`), and its ignore list under any of the names the family uses."""
        written = [c for c in codecs if not issubclass(c, InputLayout)]
        layout = next((found for c in written if (found := c.from_config(dict(qc))) is not None), None)  # type: ignore[attr-defined]
        claimed = (c.from_config(dict(qc)) for c in codecs if issubclass(c, InputLayout))
        # vLLM's name, then transformers', then ModelOpt's.
        ignore = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or qc.get("exclude_modules")
        ignore = ignore or qc.get("ignore")
        return ConfigReading(lambda meta: layout, tuple(c for c in claimed if c is not None), tuple(ignore or ()))

    @staticmethod
    def targeted(meta: TensorMeta, targets: tuple[str, ...]) -> bool:
        """An fp8 config quantizes every Linear layer it does not ignore."""
        return is_linear_weight(meta)

    @staticmethod
    def ignores(module: str, patterns: tuple[str, ...]) -> bool:
        """Whether `ignored_layers` leaves this module unquantized. vLLM matches them exactly, SGLang on dot
        boundaries, transformers by substring; the dot-boundary rule sits between them. lm_head and MoE routers
        are never FP8 layers in vLLM."""
        if keep_reason(module) in ("lm_head", "router"):
            return True
        return any(match_name(module, p) or re.search(rf"(^|\.){re.escape(p)}(\.|$)", module) for p in patterns)

    @staticmethod
    def config_problems(quantization_config: dict[str, Any], where: Path) -> list[str]:
        """vLLM's `Fp8Config.from_config` rules."""
        qc = quantization_config
        problems = []
        if qc.get("activation_scheme") not in ("static", "dynamic"):
            problems.append(
                f"{where}: quantization_config.activation_scheme is {qc.get('activation_scheme')!r}; "
                "vLLM needs 'dynamic' or 'static'"
            )
        block = qc.get("weight_block_size")
        if block is not None:
            if not pair_of_ints(block):
                problems.append(f"{where}: weight_block_size {block!r} must be two positive integers, or null")
            elif qc.get("activation_scheme") != "dynamic":
                problems.append(f"{where}: vLLM needs activation_scheme 'dynamic' with weight_block_size")
        return problems


__all__ = ["Fp8Layout", "pair_of_ints"]
