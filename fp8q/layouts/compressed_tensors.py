"""What the compressed-tensors layouts share: the `quantization_config` they write (llm-compressor's, as
`model_free_ptq` writes it), the client's arithmetic (compressed-tensors' `dequantize`: q times the scale, in the
scale's dtype), the rules for scale names and dtypes, and how its config is read back (config groups, `ignore`).

Imports: torch, layouts (base, inputs, kernels, vocabulary), models.linear, source.checkpoint (types, for type
checking), compressed-tensors (optional, to validate a config read back).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fp8q.layouts.base import Layout
from fp8q.layouts.inputs import ConfigReading, InputLayout
from fp8q.layouts.kernels import over_fp8_max
from fp8q.layouts.vocabulary import Format
from fp8q.models.linear import is_linear_weight

if TYPE_CHECKING:
    from fp8q.source.checkpoint import TensorMeta

# The scale dtypes compressed-tensors takes for float layouts.
_CT_DTYPES = ("F32", "BF16", "F16")


def match_name(module: str, pattern: str) -> bool:
    """compressed-tensors' rule: `re:` patterns are `re.match`ed (anchored at the start only), others compared."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern


def ct_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in amax's dtype, as compressed-tensors' calculate_qparams computes it (bf16 scales for bf16), a
    zero scale guarded with the dtype's eps."""
    scale = over_fp8_max(amax)
    eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def quant_args(strategy: str, dynamic: bool, **extra: Any) -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs as llm-compressor writes them: only keys every release accepts
    (they forbid unknown keys)."""
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


class CompressedTensorsLayout(Layout):
    format = Format.COMPRESSED_TENSORS
    ct_format: ClassVar[str] = "float-quantized"  # the config's `format`
    ignore_key: ClassVar[str] = "ignore"
    # Its `ignore` names exactly the modules engines build unquantized: an FP8 weight there is a problem.
    ignore_is_exact: ClassVar[bool] = True

    def scale_dtype(self, weight_dtype: str) -> str:
        return weight_dtype  # computed in the weight's own dtype, as compressed-tensors does

    def client_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return scale_dtype

    def args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The config group's `weights` and `input_activations`."""
        raise NotImplementedError

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Layout | None:
        """The layout a config group's `weights` arguments ask for, where they are this layout's."""
        return None

    def quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        weights, inputs = self.args()
        return {
            "quant_method": "compressed-tensors",
            "format": self.ct_format,
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": inputs,
                    "output_activations": None,
                    "format": self.ct_format,
                }
            },
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
        }

    def rule_problem(self, weight: TensorMeta, scale: TensorMeta) -> str | None:
        where = f"tensor {scale.name} in {scale.shard}"
        if scale.name.rpartition(".")[2] != "weight_scale":
            return f"{where}: compressed-tensors names the scale {weight.module}.weight_scale"
        if scale.dtype not in _CT_DTYPES:
            return f"{where} is {scale.dtype}; compressed-tensors scales are {'/'.join(_CT_DTYPES)}"
        return None

    def scales_text(self) -> str:
        return f"`{self.scale_suffix}`, {self.granularity()}, in the source weight's dtype"

    def activations_text(self, quantization_config: dict[str, Any] | None) -> str:
        if not quantization_config:
            return "as the engine decides"
        for group in (quantization_config.get("config_groups") or {}).values():
            act = group.get("input_activations")
            if act:
                how = "dynamic" if act.get("dynamic") else "static"
                return f"FP8, {how} scales per {act.get('strategy')}, computed by the engine at run time"
        return "not quantized (weights only)"

    def transformers_lead(self) -> str:
        return "transformers loads it with the `compressed-tensors` package installed:"

    # ── the family's config, read back ──

    @classmethod
    def read_config(cls, qc: Mapping[str, Any], codecs: list[type[Layout]]) -> ConfigReading:
        """Each config group's rule (its targets and the layout of the first codec, in `codecs`' order, its weight
        arguments describe), in compressed-tensors' order: a module takes the first group whose targets match it;
        the groups whose weights no codec reads (INT4 `pack-quantized`, say) in words."""
        rules: list[tuple[tuple[str, ...], Layout | None]] = []
        unread: list[str] = []
        groups = qc.get("config_groups") or {}
        for name, group in groups.items() if isinstance(groups, dict) else ():
            if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
                continue
            args = group["weights"]
            # The FP8 codecs read a group's strategy only, so a group of other widths is for the input codecs alone.
            tried = codecs if args.get("num_bits", 8) == 8 else [c for c in codecs if issubclass(c, InputLayout)]
            layout = next((found for c in tried if (found := c.from_args(args)) is not None), None)  # type: ignore[attr-defined]
            rules.append((tuple(group.get("targets") or ()), layout))
            if layout is None:
                fmt = group.get("format") or qc.get("format") or "?"
                unread.append(f"{name} ({fmt}, {args.get('num_bits')}-bit {args.get('type')})")

        def expected(meta: TensorMeta) -> Layout | None:
            # A packed weight (`X.weight_packed`, U8) is targeted as the Linear weight it decodes to.
            if meta.name.rpartition(".")[2] != "weight":
                meta = replace(meta, name=f"{meta.module}.weight", dtype="BF16")
            return next((layout for targets, layout in rules if cls.targeted(meta, targets)), None)

        targets = tuple(t for rule_targets, _ in rules for t in rule_targets)
        return ConfigReading(expected, (), tuple(qc.get("ignore") or ()), targets, tuple(unread))

    @staticmethod
    def targeted(meta: TensorMeta, targets: tuple[str, ...]) -> bool:
        """Whether a config group's targets take this weight: the class target `Linear` every Linear (from the
        files alone: every 2-D non-embedding weight), else a module name or `re:` pattern."""
        return any(is_linear_weight(meta) if t == "Linear" else match_name(meta.module, t) for t in targets)

    @staticmethod
    def ignores(module: str, patterns: tuple[str, ...]) -> bool:
        """Whether the config's `ignore` leaves this module unquantized."""
        return any(match_name(module, pattern) for pattern in patterns)

    @staticmethod
    def config_problems(quantization_config: dict[str, Any], where: Path) -> list[str]:
        """What compressed-tensors' own classes (which vLLM and transformers run) refuse in the config, where the
        library is installed."""
        try:
            from compressed_tensors.quantization import QuantizationConfig
        except ImportError:  # optional: the structural checks still run
            return []
        try:
            QuantizationConfig.model_validate(quantization_config)
        except Exception as e:  # pydantic's ValidationError, or whatever an older release raises
            first = " ".join(str(e).split("\n")[:3])
            return [f"{where}: compressed-tensors refuses the quantization_config: {first}"]
        return []


__all__ = ["CompressedTensorsLayout", "ct_scale", "match_name", "quant_args"]
