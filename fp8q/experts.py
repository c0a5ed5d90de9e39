"""Fused 3-D MoE expert tensors, split into the per-expert 2-D Linear weights engines know.

Imports: checkpoint types. Some checkpoints (gpt-oss, Llama 4) store all experts of a layer in one
tensor: `experts.gate_up_proj` [E, H, 2I] (applied as x @ W, the transpose of a Linear weight) and
`experts.down_proj` [E, I, H], with biases `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H].
gpt-oss interleaves gate and up along the 2I axis (gate = even, up = odd); Llama 4 and the
transformers 5 in-memory form [E, 2I, H] (Linear orientation) put all of gate first. Each expert is
a contiguous byte range of the fused tensor, so it is read and quantized on its own, and written as
`experts.N.gate_proj.weight` [I, H], `experts.N.up_proj.weight` [I, H], `experts.N.down_proj.weight` [H, I].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from fp8q.checkpoint import TensorMeta
from fp8q.errors import UnsupportedTensorError

_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?$")
# Stored as x @ W (input dim first) when the hidden size cannot tell.
_TRANSPOSED_TYPES = ("gpt_oss", "llama4", "llama4_text")
_INTERLEAVED_TYPES = ("gpt_oss",)


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

    source: TensorMeta
    parts: tuple[Part, ...]


def is_fused_expert_weight(meta: TensorMeta) -> bool:
    m = _FUSED.match(meta.name)
    return bool(m) and not m["bias"] and len(meta.shape) == 3


def fused_weight_of(meta: TensorMeta) -> str | None:
    """For a fused expert bias, the name of its fused weight."""
    m = _FUSED.match(meta.name)
    return f"{m['prefix']}.{m['proj']}" if m and m["bias"] and len(meta.shape) == 2 else None


def split(meta: TensorMeta, config: Mapping[str, Any] | None) -> list[ExpertSlice]:
    """The per-expert slices of a fused expert weight or bias and the output tensors of each."""
    m = _FUSED.match(meta.name)
    assert m is not None
    experts = meta.shape[0]
    per_expert = meta.nbytes // experts if experts else 0
    model_type, hidden = _text_config(config)
    interleaved = model_type in _INTERLEAVED_TYPES
    is_bias = bool(m["bias"])
    transpose = False
    if not is_bias:
        rows, cols = meta.shape[1:]
        if hidden is not None and (rows == hidden) != (cols == hidden):
            # gate_up: [H, 2I] is transposed; down: [I, H] is transposed.
            transpose = rows == hidden if m["proj"] == "gate_up_proj" else cols == hidden
        else:
            transpose = model_type in _TRANSPOSED_TYPES
    if m["proj"] == "gate_up_proj":
        fused_width = meta.shape[1] if is_bias or not transpose else meta.shape[2]
        if fused_width % 2:
            raise UnsupportedTensorError(
                f"tensor {meta.name} in {meta.shard} has shape {list(meta.shape)}: its fused gate+up dim "
                f"{fused_width} is odd, so it cannot be split into gate and up halves; the checkpoint is malformed "
                f"(or keep it as it is with --ignore '^{re.escape(meta.name.removesuffix('_bias'))}$')"
            )
    suffix = "bias" if is_bias else "weight"
    slices = []
    for e in range(experts):
        base = f"{m['prefix']}.{e}"
        if m["proj"] == "gate_up_proj":
            parts = tuple(
                Part(f"{base}.{name}.{suffix}", transpose, half, interleaved)
                for half, name in ((0, "gate_proj"), (1, "up_proj"))
            )
        else:
            parts = (Part(f"{base}.down_proj.{suffix}", transpose),)
        source = replace(
            meta,
            name=f"{meta.name} (expert {e})",
            shape=meta.shape[1:],
            start=meta.start + e * per_expert,
            nbytes=per_expert,
        )
        slices.append(ExpertSlice(source, parts))
    return slices


def _text_config(config: Mapping[str, Any] | None) -> tuple[str | None, int | None]:
    if not config:
        return None, None
    text = config.get("text_config")
    text = text if isinstance(text, Mapping) else {}
    model_type = text.get("model_type") or config.get("model_type")
    hidden = text.get("hidden_size") or config.get("hidden_size")
    return model_type, hidden if isinstance(hidden, int) else None
