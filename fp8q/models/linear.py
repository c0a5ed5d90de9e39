"""Which tensors are the weights of Linear layers, and which Linear modules every architecture keeps in high
precision: decided from names, shapes and dtypes alone (no model code). A Linear weight is a 2-D float `*.weight`
that is not an embedding; lm_head, MoE routers and gates, vision and audio towers and their projectors, and what
an architecture's table entry adds are kept.

Imports: dtypes, models.architectures, source.checkpoint (types).
"""

from __future__ import annotations

import re

from fp8q.dtypes import FP8_NAMES, QUANTIZABLE
from fp8q.models.architectures import GENERIC, Architecture, keep_rules
from fp8q.source.checkpoint import TensorMeta

FLOAT_DTYPES = (*QUANTIZABLE, "F64", *FP8_NAMES)
# Embedding tables are nn.Embedding, not Linear: kept and not listed in `ignore`.
_EMBEDDING = re.compile(r"(^|\.)([^.]*embed[^.]*|wte|wpe|shared|relative_attention_bias)$")
_LM_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)$|^output$")
# MoE routers stay in high precision in every engine (vLLM builds them with quant_config=None).
_ROUTER = re.compile(r"(^|\.)(gate|shared_expert_gate|router)$|(^|\.)router\.")
# Vision and audio encoders and their projectors into the language model.
_ENCODER = re.compile(
    r"(^|\.)(vision_tower|vision_model|visual|vision|vision_encoder|image_encoder|vision_proj|"
    r"multi_modal_projector|mm_projector|connector|audio_tower|audio_model|audio_encoder)(\.|$)"
)


def is_linear_weight(meta: TensorMeta) -> bool:
    return (
        meta.name.endswith(".weight")
        and len(meta.shape) == 2
        and meta.dtype in FLOAT_DTYPES
        and not _EMBEDDING.search(meta.module)
    )


def keep_reason(module: str, arch: Architecture = GENERIC) -> str | None:
    """Why a Linear module is kept by default, or None when it is quantized."""
    if _LM_HEAD.search(module):
        return "lm_head"
    if _ROUTER.search(module):
        return "router"
    if _ENCODER.search(module):
        return "encoder"
    for rule in keep_rules(arch):
        if rule.pattern.search(module):
            return rule.why
    return None


__all__ = ["FLOAT_DTYPES", "is_linear_weight", "keep_reason"]
