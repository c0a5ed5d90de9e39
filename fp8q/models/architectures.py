"""What each architecture's checkpoints hold beyond plain Linear layers, written once as a table.

Imports: nothing. For every architecture fp8q knows: the Linear layers that stay in high precision (and are
listed in the config's ignore list), the groups of sibling layers vLLM loads as one layer (which must be
quantized alike), how fused 3-D expert tensors are oriented, and where its MTP / nextn draft layers are. The
defaults follow the official FP8 releases and the engines' model code (vLLM, vllm/model_executor/models/), cited
at each entry. Rules every architecture shares come first; an unknown architecture gets those alone, and a note.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Keep:
    """Linear layers kept in high precision: `pattern` is searched in the module name; `why` is said to the user."""

    pattern: re.Pattern[str]
    why: str


def _keep(pattern: str, why: str) -> Keep:
    return Keep(re.compile(pattern), why)


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    keep: tuple[Keep, ...] = ()
    # Sibling module names that vLLM merges into one layer at load ("packed_modules_mapping"): all quantized or
    # all kept, or vLLM refuses ("Detected some but not all shards of ... are quantized").
    groups: tuple[tuple[str, ...], ...] = ()
    # Fused 3-D expert tensors: "out_in" is [E, out, in] (Linear orientation), "in_out" is [E, in, out] (x @ W);
    # "shape" tells them apart by the hidden size (an architecture whose checkpoints come in both).
    experts: str = "shape"
    interleaved: bool = False  # gate and up alternate along the fused axis (gpt-oss) instead of gate first
    mtp: str = ""  # where its MTP / nextn draft layers are, for `inspect`


# Every architecture: the output heads, MoE routers and gates, encoders (see linear.py) and these.
COMMON_KEEP = (
    # An MTP layer's own LM head (DeepSeek, GLM: `shared_head.head`) is an LM head: never FP8 in any engine.
    _keep(r"(^|\.)shared_head\.head$", "MTP shared_head.head: an LM head, never FP8 (deepseek_mtp.py ParallelLMHead)"),
    # The MTP projection of [embedding; hidden] (DeepSeek, GLM): a plain torch nn.Linear in vLLM, and bf16 in
    # DeepSeek's own FP8 release.
    _keep(r"(^|\.)eh_proj$", "MTP eh_proj: vLLM builds it as a plain nn.Linear (deepseek_mtp.py, glm4_moe_mtp.py)"),
    _keep(r"(^|\.)conv1d$", "conv1d: a convolution (Mamba, gated delta net), built unquantized"),
)
COMMON_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))

_TABLE = (
    Architecture(
        "DeepSeek-V3/R1/V3.1/V3.2, Kimi-K2",
        ("deepseek_v3", "deepseek_v32", "kimi_k2"),
        keep=(
            # V3.2's indexer: vLLM fuses wk and weights_proj into wk_weights_proj with quant_config=None
            # (deepseek_v2.py), and dequantizes an FP8 wk at load; DeepSeek ships weights_proj in bf16.
            _keep(r"\.indexer\.(wk|weights_proj)$", "V3.2 indexer: vLLM builds wk_weights_proj unquantized"),
        ),
        # MLA's low-rank projections load as one fused_qkv_a_proj (deepseek_v2.py packed_modules_mapping).
        groups=(("q_a_proj", "kv_a_proj_with_mqa"),),
        experts="out_in",
        mtp="model.layers.{num_hidden_layers}.. (num_nextn_predict_layers): quantized like the backbone, "
        "but eh_proj and shared_head.head stay bf16, as in DeepSeek's FP8 release",
    ),
    Architecture(
        "GLM-4.5/4.6/4.7",
        ("glm4_moe", "glm4_moe_lite", "glm_moe_dsa"),
        experts="out_in",
        mtp="model.layers.{num_hidden_layers}.. (num_nextn_predict_layers): quantized like the backbone, "
        "eh_proj and shared_head.head stay bf16 (glm4_moe_mtp.py builds them unquantized)",
    ),
    Architecture(
        "Qwen3-Next",
        ("qwen3_next",),
        keep=(
            # qwen3_next.py: "ba_proj doesn't support blockwise fp8 quantization"; Qwen's FP8 release lists every
            # layer's in_proj_ba in modules_to_not_convert.
            _keep(r"\.linear_attn\.in_proj_ba$", "in_proj_ba: not FP8 in Qwen's release (vLLM: no block FP8 for it)"),
            # qwen3_next_mtp.py builds mtp.fc with quant_config: kept bf16 as Qwen's release does, and listed.
            _keep(r"(^|\.)mtp\.fc$", "MTP fc: bf16 in Qwen's FP8 release, listed in modules_to_not_convert"),
        ),
        experts="out_in",
        mtp="mtp.layers.N.. (mtp_num_hidden_layers): quantized like the backbone; mtp.fc stays bf16",
    ),
    Architecture(
        "Qwen3.5/3.6",
        ("qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text"),
        keep=(
            _keep(
                r"\.linear_attn\.(in_proj_a|in_proj_b)$", "in_proj_a/b: vLLM's in_proj_ba, not FP8 in Qwen's release"
            ),
            _keep(r"(^|\.)mtp\.fc$", "MTP fc: bf16 in Qwen's FP8 release, listed in modules_to_not_convert"),
        ),
        # vLLM loads in_proj_qkv + in_proj_z as in_proj_qkvz, and in_proj_b + in_proj_a as in_proj_ba.
        groups=(("in_proj_qkv", "in_proj_z"), ("in_proj_b", "in_proj_a")),
        experts="out_in",
        mtp="mtp.layers.N.. (mtp_num_hidden_layers): quantized like the backbone; mtp.fc stays bf16",
    ),
    Architecture(
        "Gemma-4",
        ("gemma4", "gemma4_text", "gemma4_assistant"),
        # gemma4.py: fused experts [E, 2I, H] and [E, H, I], gate first; "checkpoint orientation already matches".
        keep=(
            _keep(r"(^|\.)masked_embedding\.centroids$", "MTP centroids: a plain nn.Linear in vLLM (gemma4_mtp.py)"),
        ),
        experts="out_in",
        mtp="a separate draft checkpoint (gemma4_assistant): its layers quantized, its centroids kept",
    ),
    # granitemoe.py: input_linear [E, 2I, H] = gate then up, output_linear [E, H, I]; loaded as experts.N.w1/w3/w2.
    Architecture("GraniteMoE", ("granitemoe", "granitemoeshared", "granitemoehybrid"), experts="out_in"),
    Architecture(
        "gpt-oss",
        ("gpt_oss",),
        keep=(
            # OpenAI's release lists model.layers.*.self_attn in modules_to_not_convert, and vLLM's gpt_oss.py
            # builds the attention without quant_config.
            _keep(r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$", "gpt-oss attention: bf16 in OpenAI's release"),
        ),
        # [E, H, 2I] with gate and up interleaved, and down [E, I, H]: square when I == H (gpt-oss-20b/120b).
        experts="in_out",
        interleaved=True,
    ),
    # llama4.py: experts.gate_up_proj [E, H, 2I] (gate first) and down_proj [E, I, H], transposed at load.
    Architecture("Llama 4", ("llama4", "llama4_text"), experts="in_out"),
    # The Hub checkpoints hold [E, H, 2I]; transformers 5 writes [E, 2I, H] (transformers PR #43201): by shape.
    Architecture("Qwen3-VL-MoE", ("qwen3_vl_moe", "qwen3_vl_moe_text"), experts="shape"),
    # minimax_m2.py: the F32 router (block_sparse_moe.gate) and e_score_correction_bias are kept as they are.
    Architecture("MiniMax-M2", ("minimax_m2", "minimax"), experts="out_in"),
    # nemotron_h.py: conv1d, A_log, D, dt_bias, norms and the MoE gate unquantized; in_proj/out_proj quantized.
    Architecture("Nemotron-H", ("nemotron_h",), experts="out_in"),
    # Checked against transformers' module trees in tests/models/test_architectures.py; the common rules suffice.
    Architecture(
        "Llama/Qwen/Mistral/Gemma/Phi family",
        (
            "llama",
            "mistral",
            "mistral3",
            "ministral",
            "qwen2",
            "qwen3",
            "qwen2_moe",
            "qwen3_moe",
            "mixtral",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "phi3",
            "phimoe",
            "llava",
            "qwen2_vl",
            "qwen2_5_vl",
            "qwen3_vl",
            "deepseek_v2",
            "olmo2",
            "olmoe",
            "granite",
            "cohere",
            "cohere2",
            "glm4",
            "starcoder2",
        ),  # fmt: skip
        experts="out_in",
    ),
)
GENERIC = Architecture("generic", ())


def architecture_of(config: Mapping[str, Any] | None) -> Architecture:
    """The table entry for a config's model_type (or its text_config's), else GENERIC."""
    for model_type in model_types(config):
        for arch in _TABLE:
            if model_type in arch.model_types:
                return arch
    return GENERIC


def model_types(config: Mapping[str, Any] | None) -> list[str]:
    """The config's model_type and its text_config's, the outer one first."""
    if not config:
        return []
    text = config.get("text_config")
    found = [config.get("model_type"), text.get("model_type") if isinstance(text, Mapping) else None]
    return [t for t in found if isinstance(t, str)]


def keep_rules(arch: Architecture) -> tuple[Keep, ...]:
    return COMMON_KEEP + arch.keep


def groups(arch: Architecture) -> tuple[tuple[str, ...], ...]:
    return COMMON_GROUPS + arch.groups


__all__ = ["Architecture", "GENERIC", "Keep", "architecture_of", "groups", "keep_rules", "model_types"]
