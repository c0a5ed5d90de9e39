"""Which tensors get quantized: the Linear weights (models/linear.py) but those kept, by rule or by the user.

Imports: errors, dtypes, source.checkpoint (types), models (architectures, experts, linear). Decided from names, shapes
and dtypes alone (no model code): of the Linear weights (linear.py) and fused 3-D expert tensors (experts.py), what
linear.py keeps for every architecture (lm_head, MoE routers, encoders), what the architecture's table entry keeps (MTP
heads, layers its engines build unquantized) and user `--ignore` matches stay as they are; `--targets` narrows the rest.
Every Linear left unquantized is listed by exact module name, and layers that vLLM loads as one (q/k/v, gate/up, ...)
are quantized alike or refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fp8q.dtypes import FP8_NAMES, QUANTIZABLE
from fp8q.errors import CheckpointError, UnsupportedTensorError, UsageError
from fp8q.models.architectures import GENERIC, Architecture, architecture_of, groups, model_types
from fp8q.models.experts import is_fused_expert_weight
from fp8q.models.linear import FLOAT_DTYPES, is_linear_weight, keep_reason
from fp8q.source.checkpoint import TensorMeta

# What to do with an FP8 checkpoint given to quantize.
ALREADY_QUANTIZED = (
    "`fp8q verify` checks it, `fp8q convert` writes it in another FP8 layout, `fp8q dequantize` makes it bf16; "
    "or give the bf16/fp16/fp32 checkpoint"
)


@dataclass(frozen=True, slots=True)
class Selection:
    """`quantize`: tensor names to quantize. `ignored`: Linear modules left as they are. `kept`: why, for each
    module kept by a rule rather than by the user's patterns. `architecture`: the table entry that applied."""

    quantize: tuple[str, ...]
    ignored: tuple[str, ...]
    kept: tuple[tuple[str, str], ...] = ()
    architecture: Architecture = GENERIC


def natural_key(name: str) -> list[str | int]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def select(
    tensors: Iterable[TensorMeta],
    config: Mapping[str, object] | None,
    ignore: Iterable[str] = (),
    targets: Iterable[str] = (),
    only: set[str] | None = None,
) -> Selection:
    """Decide, for every tensor, whether it is a Linear weight to quantize; `only`: the modules that may be (a
    conversion of a format fp8q only reads requantizes what its source quantized, and keeps what it kept).

    Raises:
        CheckpointError: the input is already quantized.
        UnsupportedTensorError: a Linear weight in a dtype that cannot be quantized.
    """
    ignore_res = [re.compile(p) for p in ignore]
    target_res = [re.compile(p) for p in targets]
    arch = architecture_of(config)
    quantize: list[str] = []
    ignored: list[str] = []
    kept: list[tuple[str, str]] = []
    metas = sorted(tensors, key=lambda m: natural_key(m.name))
    for meta in metas:
        if meta.dtype in FP8_NAMES:
            raise CheckpointError(
                f"tensor {meta.name} in {meta.shard} is already {meta.dtype}: the input is already quantized; "
                f"{ALREADY_QUANTIZED}"
            )
        fused = is_fused_expert_weight(meta) and meta.dtype in FLOAT_DTYPES
        if not (fused or is_linear_weight(meta)):
            continue
        # A fused 3-D expert tensor (split into per-expert Linear weights when planned) goes by its own name.
        module = meta.name if fused else meta.module
        reason = keep_reason(module, arch)
        if reason is not None:
            kept.append((module, reason))
        wanted = (
            reason is None
            and not any(r.search(module) for r in ignore_res)
            and (not target_res or any(r.search(module) for r in target_res))
            and (only is None or module in only)
        )
        if not wanted:
            if not fused:  # kept fused, it is no Linear module an engine would look up
                ignored.append(module)
            continue
        if meta.dtype not in QUANTIZABLE:
            raise UnsupportedTensorError(
                f"tensor {meta.name} in {meta.shard} has dtype {meta.dtype}; fp8q quantizes "
                f"{'/'.join(QUANTIZABLE)} weights: convert it, or pass --ignore '^{re.escape(module)}$'"
            )
        quantize.append(meta.name)
    names = {m.name for m in metas}
    if _ties_embeddings(config) and "lm_head.weight" not in names and "lm_head" not in ignored:
        # The engine still builds an lm_head Linear (sharing the embedding): it must not be quantized.
        ignored.append("lm_head")
    _check_groups(set(quantize), set(ignored), arch, bool(ignore_res or target_res))
    return Selection(tuple(quantize), tuple(sorted(ignored, key=natural_key)), tuple(kept), arch)


def _check_groups(quantized: set[str], ignored: set[str], arch: Architecture, patterns: bool) -> None:
    """Layers that vLLM loads as one (q/k/v, gate/up, ...) must be all quantized or all kept.

    Raises:
        UsageError: a group split, naming it (by --ignore/--targets, or by no rule at all: a checkpoint whose
            own layout breaks the rule).
    """
    modules = {name.removesuffix(".weight") for name in quantized} | ignored
    for group in groups(arch):
        parents = {m.rpartition(".")[0] for m in modules if m.rpartition(".")[2] in group}
        for parent in sorted(parents, key=natural_key):
            members = [f"{parent}.{part}" for part in group if f"{parent}.{part}" in modules]
            split = {m in ignored for m in members}
            if len(members) > 1 and len(split) > 1:
                kept_ones = [m.rpartition(".")[2] for m in members if m in ignored]
                cause = "--ignore/--targets" if patterns else "the checkpoint's own layout"
                raise UsageError(
                    f"{cause} would keep {', '.join(kept_ones)} but quantize the rest of {parent}."
                    f"{{{','.join(m.rpartition('.')[2] for m in members)}}}, which vLLM loads as one layer and refuses "
                    "half quantized: keep all of them or none (for example --ignore "
                    f"'^{re.escape(parent)}\\.({'|'.join(m.rpartition('.')[2] for m in members)})$')"
                )


def unknown_architecture_note(config: Mapping[str, object] | None, arch: Architecture) -> str | None:
    """A note when the architecture is not in fp8q's table: generic rules were applied."""
    if arch is not GENERIC:
        return None
    types = model_types(config)
    what = f"model_type {types[0]!r}" if types else "a config with no model_type"
    return (
        f"{what} is not in fp8q's architecture table: generic rules apply (lm_head, routers, encoders and MTP "
        "heads kept); check the kept layers with `fp8q inspect`"
    )


def _ties_embeddings(config: Mapping[str, object] | None) -> bool:
    if not config:
        return False
    text = config.get("text_config")
    for c in (config, text if isinstance(text, Mapping) else {}):
        if c.get("tie_word_embeddings") is True:
            return True
    return False


def check_not_quantized(config: Mapping[str, object] | None, config_name: str) -> None:
    if config and "quantization_config" in config:
        method = config["quantization_config"]
        method = method.get("quant_method", "?") if isinstance(method, Mapping) else "?"
        raise CheckpointError(
            f"{config_name}: has a quantization_config ({method}): the input is already quantized; {ALREADY_QUANTIZED}"
        )
