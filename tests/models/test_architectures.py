"""`select` on the checkpoints that real architectures write, checked against the model's own structure.

`fp8q.plan.selection` decides from tensor names, shapes and dtypes alone. Here the answer it should give comes from the
model classes instead, and the two are compared on the files `save_pretrained` writes.

Method, for each architecture:

1. Build a tiny model (2-3 layers, dims of a few dozen) from a config written in code, on the `meta` device, then
   give it bf16 storage on the CPU with `to_empty` (no random init is needed: every value is overwritten below).
2. Tag every tensor by value, from the model's structure and module classes, never from names:
   - `QUANT` (1.0): the weight of every `nn.Linear` (subclasses included) in the language model, and the 3-D
     parameters of fused MoE expert modules (the `experts` child of a MoE block: in transformers 5 the experts
     live in memory as `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]);
   - `KEEP` (2.0): the weights of the Linear layers that stay in high precision: the output head
     (`get_output_embeddings()`), the routers (a module with a 2-D weight that is a direct child of a MoE block,
     next to `experts`: `mlp.gate`, `router`, `shared_expert_gate`), and every Linear outside the language model
     (`get_decoder()`): the vision tower and the multimodal projector;
   - 0 for everything else (embeddings, norms, biases, convolutions, buffers).
3. `save_pretrained` to a temporary folder. Transformers 5 reverts its load-time conversions on save, so the
   folder has the names and shapes of a Hub checkpoint: `mlp.` back to `block_sparse_moe.` (Mixtral),
   `model.language_model.` back to `language_model.model.` (Llava, Gemma 3) or to `model.` (Qwen2-VL), and fused
   experts split back into per-expert 2-D `experts.N.{gate,up,down}_proj.weight` (`w1`/`w3`/`w2` for Mixtral).
   One difference remains: CLIP/SigLIP towers save as `vision_tower.encoder.*`, without the `vision_model.` level
   of Hub files (transformers restores it only for models loaded with `from_pretrained`); both are `vision_tower.*`.
4. Read the folder with `fp8q.source.checkpoint.read_checkpoint`, and each tensor's tag back from its data: the tag says
   what the tensor is, whatever name and shape the save gave it. So, with no renaming table of our own:
   - expected `quantize`: the tensors tagged `QUANT`;
   - expected `ignored`: the modules (tensor name less `.weight`) of the tensors tagged `KEEP`, plus the output
     head when it is tied to the embeddings (it has no tensor of its own; `select` adds `lm_head` from the config).

Some architectures keep their experts fused on disk (GPT-OSS, Llama 4): one 3-D tensor per projection and layer.
`select` names those tensors (the planner splits them into per-expert weights; see test_experts.py), and
`FUSED_EXPERTS` records the names and shapes they have, checked below.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fp8q.plan.selection import select
from fp8q.source.checkpoint import Checkpoint, read_checkpoint

hf = pytest.importorskip("transformers")

QUANT, KEEP = 1.0, 2.0

# Distinct sizes, so that every layout on disk can be read off its shape.
HIDDEN, INTER, MOE_INTER, EXPERTS = 32, 48, 24, 3
TEXT = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
MOE = {"moe_intermediate_size": MOE_INTER, "num_experts_per_tok": 2}
# One-layer vision towers.
CLIP_LIKE = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}
IMAGE = {"image_size": 16, "patch_size": 8}


def _llava() -> tuple[type, object]:
    vision = hf.CLIPVisionConfig(**CLIP_LIKE, **IMAGE)
    config = hf.LlavaConfig(vision_config=vision, text_config=hf.LlamaConfig(**TEXT), image_token_index=63)
    return hf.LlavaForConditionalGeneration, config


def _gemma3_vlm() -> tuple[type, object]:
    vision = hf.SiglipVisionConfig(**CLIP_LIKE, **IMAGE, vision_use_head=False)
    text = hf.Gemma3TextConfig(**TEXT)
    tokens = {"image_token_index": 63, "boi_token_index": 61, "eoi_token_index": 62}
    config = hf.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4, **tokens)
    return hf.Gemma3ForConditionalGeneration, config


def _qwen2_vl() -> tuple[type, object]:
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": HIDDEN, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2}
    text = {**TEXT, "model_type": "qwen2_vl_text"}
    return hf.Qwen2VLForConditionalGeneration, hf.Qwen2VLConfig(text_config=text, vision_config=vision)


def _deepseek_v3() -> tuple[type, object]:
    """MLA attention (q_a/q_b, kv_a_proj_with_mqa/kv_b), one dense layer, then two MoE layers with a shared expert."""
    mla = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}
    moe = {**MOE, "n_routed_experts": EXPERTS, "n_shared_experts": 1, "n_group": 1, "topk_group": 1}
    text = {**TEXT, "num_hidden_layers": 3, "num_key_value_heads": 2}
    return hf.DeepseekV3ForCausalLM, hf.DeepseekV3Config(**text, **mla, **moe, first_k_dense_replace=1)


# Mixtral-style configs size their experts with `intermediate_size`.
EXPERT_TEXT = {**TEXT, "intermediate_size": MOE_INTER}

# id -> () -> (model class, config)
ARCHITECTURES: dict[str, Callable[[], tuple[type, object]]] = {
    "llama": lambda: (hf.LlamaForCausalLM, hf.LlamaConfig(**TEXT)),
    "qwen2": lambda: (hf.Qwen2ForCausalLM, hf.Qwen2Config(**TEXT)),
    "qwen2-tied": lambda: (hf.Qwen2ForCausalLM, hf.Qwen2Config(**TEXT, tie_word_embeddings=True)),
    "qwen3": lambda: (hf.Qwen3ForCausalLM, hf.Qwen3Config(**TEXT)),
    "mistral": lambda: (hf.MistralForCausalLM, hf.MistralConfig(**TEXT)),
    # Gemma ties its embeddings by default, as the released checkpoints do.
    "gemma2": lambda: (hf.Gemma2ForCausalLM, hf.Gemma2Config(**TEXT)),
    "gemma3-text": lambda: (hf.Gemma3ForCausalLM, hf.Gemma3TextConfig(**TEXT)),
    # Fused qkv_proj and gate_up_proj Linears.
    "phi3": lambda: (hf.Phi3ForCausalLM, hf.Phi3Config(**TEXT)),
    # Layer 0 dense, layer 1 MoE with a shared expert and its sigmoid `shared_expert_gate` (a Linear, one output).
    "qwen2-moe": lambda: (
        hf.Qwen2MoeForCausalLM,
        hf.Qwen2MoeConfig(**TEXT, **MOE, num_experts=EXPERTS, shared_expert_intermediate_size=40, mlp_only_layers=[0]),
    ),
    "qwen3-moe": lambda: (
        hf.Qwen3MoeForCausalLM,
        hf.Qwen3MoeConfig(**TEXT, **MOE, num_experts=EXPERTS, mlp_only_layers=[0]),
    ),
    "mixtral": lambda: (
        hf.MixtralForCausalLM,
        hf.MixtralConfig(**EXPERT_TEXT, num_local_experts=EXPERTS, num_experts_per_tok=2),
    ),
    "deepseek-v3": _deepseek_v3,
    "llava": _llava,
    "gemma3-vlm": _gemma3_vlm,
    "qwen2-vl": _qwen2_vl,
    "gpt-oss": lambda: (
        hf.GptOssForCausalLM,
        hf.GptOssConfig(**EXPERT_TEXT, num_local_experts=EXPERTS, num_experts_per_tok=2),
    ),
    # Layer 0 dense (intermediate_size_mlp), layer 1 MoE with a shared expert.
    "llama4-text": lambda: (
        hf.Llama4ForCausalLM,
        hf.Llama4TextConfig(
            **EXPERT_TEXT, intermediate_size_mlp=40, num_local_experts=EXPERTS, interleave_moe_layer_step=2
        ),
    ),
}

# Fused experts as transformers 5.17 saves them: gate_up_proj [E, H, 2I] (used as x @ W, the transpose of a
# Linear weight) and down_proj [E, I, H]. GPT-OSS interleaves gate and up along the last axis (gate = [..., ::2],
# up = [..., 1::2]); Llama 4 concatenates them (gate = [..., :I], up = [..., I:]).
_FUSED = {"gate_up_proj": (EXPERTS, HIDDEN, 2 * MOE_INTER), "down_proj": (EXPERTS, MOE_INTER, HIDDEN)}
FUSED_EXPERTS = {
    "gpt-oss": {f"model.layers.{i}.mlp.experts.{p}": shape for i in (0, 1) for p, shape in _FUSED.items()},
    "llama4-text": {f"model.layers.1.feed_forward.experts.{p}": shape for p, shape in _FUSED.items()},
}


def build(arch: str) -> torch.nn.Module:
    model_class, config = ARCHITECTURES[arch]()
    with torch.device("meta"):
        model = model_class(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied parameters separate storage
    return model


def tag(model: torch.nn.Module) -> set[str]:
    """Overwrite every tensor with its tag (see the module docstring); return the names of tied output heads."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings().weight
    language_model = set(model.get_decoder().modules())
    routers, experts = set(), set()
    for module in model.modules():
        children = dict(module.named_children())
        if "experts" in children:
            experts.add(children.pop("experts"))
            routers |= {c for c in children.values() if _direct_weight_ndim(c) == 2}
    # gpt-oss keeps its attention in bf16: OpenAI's release lists `model.layers.*.self_attn` in
    # modules_to_not_convert, and vLLM's gpt_oss.py builds the attention without a quant_config.
    if type(model).__name__.startswith("GptOss"):
        for module in model.modules():
            if type(module).__name__.endswith("Attention"):
                routers |= {c for c in module.children() if isinstance(c, torch.nn.Linear)}

    tied = set()
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.zero_()
        for name, module in model.named_modules():
            outside = module not in language_model
            if module is head and head.weight is embedding:
                tied.add(name)
            elif module is head or module in routers or (isinstance(module, torch.nn.Linear) and outside):
                module.weight.fill_(KEEP)
            elif isinstance(module, torch.nn.Linear):
                module.weight.fill_(QUANT)
            elif module in experts:
                for param in module.parameters(recurse=False):
                    if param.ndim == 3:
                        param.fill_(KEEP if outside else QUANT)
    return tied


def _direct_weight_ndim(module: torch.nn.Module) -> int | None:
    weight = module._parameters.get("weight")
    return None if weight is None else weight.ndim


def read_tags(checkpoint: Checkpoint) -> dict[str, float]:
    """Each saved tensor's tag, read from its data (every tensor must hold a single value)."""
    tags = {}
    for shard in checkpoint.shards:
        with safe_open(shard.path, "pt") as f:
            for meta in shard.tensors:
                values = f.get_tensor(meta.name).unique().tolist()
                assert len(values) == 1, f"{meta.name} {list(meta.shape)} mixes tags {values}"
                tags[meta.name] = values[0]
    return tags


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_select_matches_model_structure(arch: str, tmp_path: Path) -> None:
    model = build(arch)
    tied = tag(model)
    model.save_pretrained(tmp_path)
    checkpoint = read_checkpoint(tmp_path)
    assert {meta.dtype for meta in checkpoint.tensors.values()} == {"BF16"}
    tags = read_tags(checkpoint)
    expected_quantize = {name for name, value in tags.items() if value == QUANT}
    expected_ignored = {name.rpartition(".")[0] for name, value in tags.items() if value == KEEP} | tied
    assert expected_quantize, "no Linear weight on disk: the tagging is broken"

    selection = select(checkpoint.tensors.values(), checkpoint.config)

    assert sorted(selection.ignored) == sorted(expected_ignored)  # as lists: no module listed twice
    assert sorted(selection.quantize) == sorted(expected_quantize)
    fused = {
        name: checkpoint.tensors[name].shape for name in selection.quantize if len(checkpoint.tensors[name].shape) == 3
    }
    assert fused == FUSED_EXPERTS.get(arch, {})
