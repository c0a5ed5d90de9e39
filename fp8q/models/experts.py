"""Fused 3-D MoE expert tensors, split into the per-expert 2-D Linear weights engines know.

Imports: torch, errors, models.architectures, source.checkpoint (types). Some checkpoints store all experts of a layer
in one tensor per projection, under one of two namings:

- `experts.gate_up_proj` and `experts.down_proj` (gpt-oss, Llama 4, Gemma-4, Qwen3-VL-MoE, Qwen3.5, and
  transformers 5's in-memory form), with biases `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H];
  written as `experts.N.gate_proj.weight`, `experts.N.up_proj.weight`, `experts.N.down_proj.weight`;
- `block_sparse_moe.input_linear.weight` and `output_linear.weight` (GraniteMoE); written as
  `block_sparse_moe.experts.N.w1.weight` (gate), `w3` (up) and `w2` (down), the names vLLM's granitemoe.py
  turns them into at load.

A fused tensor is [E, out, in] (Linear orientation: [E, 2I, H] and [E, H, I]) or [E, in, out] (applied as
x @ W: [E, H, 2I] and [E, I, H]). The hidden size tells which where the two dims differ; where they do not
(gpt-oss's square down_proj) the architecture's table entry does. gpt-oss interleaves gate and up along the
2I axis (gate = even, up = odd); the others put all of gate first. Each expert is a contiguous byte range
of the fused tensor, so it is read and quantized on its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from fp8q.errors import UnsupportedTensorError
from fp8q.models.architectures import architecture_of
from fp8q.source.checkpoint import TensorMeta

# The fused projection of gate and up, and the down projection, under each naming: (pattern, output names).
_NAMINGS = (
    (
        re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?$"),
        {"gate": "{prefix}.{e}.gate_proj", "up": "{prefix}.{e}.up_proj", "down": "{prefix}.{e}.down_proj"},
    ),
    (
        re.compile(r"^(?P<prefix>.*\.block_sparse_moe)\.(?P<proj>input_linear|output_linear)\.weight(?P<bias>)$"),
        {"gate": "{prefix}.experts.{e}.w1", "up": "{prefix}.experts.{e}.w3", "down": "{prefix}.experts.{e}.w2"},
    ),
)
_GATE_UP = ("gate_up_proj", "input_linear")


@dataclass(frozen=True, slots=True)
class Part:
    """How one output tensor is taken from one expert's slice of a fused tensor."""

    name: str
    transpose: bool = False
    half: int | None = None  # 0: gate, 1: up, None: the whole slice
    interleaved: bool = False

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            x = x.t()
        if self.half is not None:
            x = x[self.half :: 2] if self.interleaved else x.chunk(2, dim=0)[self.half]
        return x.contiguous()

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.transpose:
            shape = shape[::-1]
        if self.half is not None:
            shape = (shape[0] // 2, *shape[1:])
        return shape


@dataclass(frozen=True, slots=True)
class ExpertSlice:
    """One expert's bytes inside a fused tensor, and the tensors made from it."""

    input: TensorMeta  # one expert's bytes, as a tensor of their own
    parts: tuple[Part, ...]


def _match(name: str) -> tuple[re.Match[str], dict[str, str]] | None:
    for pattern, names in _NAMINGS:
        m = pattern.match(name)
        if m:
            return m, names
    return None


def is_fused_expert_weight(meta: TensorMeta) -> bool:
    found = _match(meta.name)
    return found is not None and not found[0]["bias"] and len(meta.shape) == 3


def fused_weight_of(meta: TensorMeta) -> str | None:
    """For a fused expert bias, the name of its fused weight."""
    found = _match(meta.name)
    if found is None or not found[0]["bias"] or len(meta.shape) != 2:
        return None
    return f"{found[0]['prefix']}.{found[0]['proj']}"


def split(meta: TensorMeta, config: Mapping[str, Any] | None) -> list[ExpertSlice]:
    """The per-expert slices of a fused expert weight or bias and the output tensors of each.

    Raises:
        UnsupportedTensorError: an odd fused gate+up dim, or an orientation neither the shape nor the
            architecture can tell.
    """
    found = _match(meta.name)
    assert found is not None
    m, names = found
    gate_up = m["proj"] in _GATE_UP
    is_bias = bool(m["bias"])
    arch = architecture_of(config)
    transpose = False if is_bias else _transposed(meta, gate_up, _hidden_size(config), arch.experts)
    if gate_up:
        fused_width = meta.shape[1] if is_bias or not transpose else meta.shape[2]
        if fused_width % 2:
            raise UnsupportedTensorError(
                f"tensor {meta.name} in {meta.shard} has shape {list(meta.shape)}: its fused gate+up dim "
                f"{fused_width} is odd, so it cannot be split into gate and up halves; the checkpoint is malformed "
                f"(or keep it as it is with --ignore '^{re.escape(fused_weight_of(meta) or meta.name)}$')"
            )
    experts = meta.shape[0]
    per_expert = meta.nbytes // experts if experts else 0
    suffix = "bias" if is_bias else "weight"
    slices = []
    for e in range(experts):
        fmt = {"prefix": m["prefix"], "e": e}
        if gate_up:
            parts = tuple(
                Part(f"{names[which].format(**fmt)}.{suffix}", transpose, half, arch.interleaved)
                for half, which in ((0, "gate"), (1, "up"))
            )
        else:
            parts = (Part(f"{names['down'].format(**fmt)}.{suffix}", transpose),)
        source = replace(
            meta,
            name=f"{meta.name} (expert {e})",
            shape=meta.shape[1:],
            start=meta.start + e * per_expert,
            nbytes=per_expert,
        )
        slices.append(ExpertSlice(source, parts))
    return slices


def _transposed(meta: TensorMeta, gate_up: bool, hidden: int | None, orientation: str) -> bool:
    """Whether a fused weight is [E, in, out]: from the hidden size where the shape tells, else the table."""
    rows, cols = meta.shape[1:]
    if hidden is not None and (rows == hidden) != (cols == hidden):
        # gate_up: [H, 2I] is [in, out]; down: [I, H] is [in, out].
        return rows == hidden if gate_up else cols == hidden
    if orientation in ("out_in", "in_out"):
        return orientation == "in_out"
    raise UnsupportedTensorError(
        f"tensor {meta.name} in {meta.shard} has shape {list(meta.shape)}, which could be [experts, out, in] or "
        "[experts, in, out], and its architecture does not say (config.json's hidden_size and model_type): "
        "fix the config, or keep it as it is with --ignore"
    )


def _hidden_size(config: Mapping[str, Any] | None) -> int | None:
    if not config:
        return None
    text = config.get("text_config")
    hidden = (text.get("hidden_size") if isinstance(text, Mapping) else None) or config.get("hidden_size")
    return hidden if isinstance(hidden, int) and not isinstance(hidden, bool) else None
