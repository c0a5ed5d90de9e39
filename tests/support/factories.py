"""Build small checkpoints for tests: real transformers models, or hand-made safetensors files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": '{"model_max_length": 512}\n',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}\n",
    "special_tokens_map.json": '{"bos_token": "<s>"}\n',
    "custom_modeling.py": "# custom code shipped with the model\nX = 1\n",
    "README.md": "# tiny model\n",
}


def add_side_files(folder: Path) -> None:
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text)


def tiny_llama(
    folder: Path,
    *,
    tie: bool = False,
    shard_kb: int = 60,
    dtype: torch.dtype = torch.bfloat16,
    hidden: int = 80,
    intermediate: int = 200,
    layers: int = 2,
) -> Path:
    """A Llama with dims that are not multiples of 128, saved in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).to(dtype)
    _widen(model)
    model.save_pretrained(folder, max_shard_size=f"{shard_kb}KB")
    add_side_files(folder)
    return folder


def tiny_qwen3_moe(folder: Path, *, hidden: int = 64, intermediate: int = 96, experts: int = 4) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        moe_intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        num_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    _widen(model)
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


def _widen(model: torch.nn.Module) -> None:
    """Random init is tiny and uniform; give weights realistic spread (and outlier rows) instead."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.05)
                p[0].mul_(8)  # an outlier row, so per-channel and per-tensor scales differ


def write_shards(
    folder: Path, shards: dict[str, dict[str, torch.Tensor]], *, index: bool = True, config: dict | None = None
) -> Path:
    """Hand-made checkpoint: {shard file: {tensor name: tensor}} plus its index."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    total = 0
    for shard, tensors in shards.items():
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
    if index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, through the index when there is one."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for f in files:
        with safe_open(folder / f, "pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """torch.equal is not implemented for float8: compare raw bytes."""
    return t.contiguous().view(torch.uint8)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, (name, a[name].dtype, b[name].dtype)
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        assert torch.equal(as_bytes(a[name]), as_bytes(b[name])), f"{name} differs"


# ── 2026 releases in their own formats (issue 27) ──


def tiny_gpt_oss_mxfp4(
    folder: Path, hidden: int = 64, intermediate: int = 96, experts: int = 4, layers: int = 2
) -> Path:
    """gpt-oss as released: MXFP4 experts (random codes, scales near 2^0) and random biases, the rest bf16, from
    the spec (FORMATS.md section 8), on a tiny GptOss of transformers."""
    import transformers as hf

    config = hf.GptOssConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=experts,
        num_experts_per_tok=2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=320,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    hf.GptOssForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = tensors.pop(name).shape  # the bf16 model's [E, in, out]
        blocks = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8, generator=generator)
        scales = torch.randint(120, 128, (experts, outputs, inputs // 32), dtype=torch.uint8, generator=generator)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        tensors[f"{name}_bias"] = torch.randn(experts, outputs, generator=generator).to(torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((folder / "config.json").read_text())
    kept = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": kept}
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


DEEPSEEK_V4_QUANTIZATION = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}
DEEPSEEK_V4_FP8 = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|ffn\.shared_experts\.w[123])\.weight$")
DEEPSEEK_V4_FP4 = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")


def _native(name: str) -> str:
    """transformers' saved name -> the release's (its conversion mapping takes either)."""
    name = name.removeprefix("model.")
    name = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight"}.get(name, name)
    return re.sub(r"^hc_head\.hc_", "hc_head_", name)


def tiny_deepseek_v4(folder: Path, layers: int = 2, experts: int = 4) -> Path:
    """DeepSeek-V4 as released, from the spec (FORMATS.md section 8) on a tiny DeepseekV4 of transformers: its own
    names, the FP8 linears quantized with power-of-two tile scales (E8M0 `.scale`), the routed experts random FP4
    codes in I8 with E8M0 scales near 2^0, `expert_dtype: fp4`."""
    import transformers as hf

    from fp8q.layouts import find
    from fp8q.layouts.numerics import quantize as quantize_tensor

    kinds = ["heavily_compressed_attention", "compressed_sparse_attention"]
    config = hf.DeepseekV4Config(
        vocab_size=256,
        hidden_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        head_dim=128,
        q_lora_rank=128,
        o_lora_rank=128,
        o_groups=2,
        n_routed_experts=experts,
        num_experts_per_tok=2,
        index_n_heads=2,
        index_head_dim=64,
        index_topk=8,
        layer_types=[kinds[i % 2] for i in range(layers)],
        mlp_layer_types=["moe"] * layers,
        qk_rope_head_dim=64,
        sliding_window=16,
        max_position_embeddings=256,
        num_nextn_predict_layers=0,
    )
    torch.manual_seed(0)
    hf.DeepseekV4ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    ue8m0 = find("block", "fp8", "ue8m0")
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, value in load_file(folder / "model.safetensors").items():
        name = _native(name)
        module = name.removesuffix(".weight")
        if DEEPSEEK_V4_FP8.search(name):
            q, scale = quantize_tensor(value, ue8m0)  # power-of-two float32 scales
            exponent = torch.frexp(scale)[1].to(torch.int32) - 1 + 127
            tensors[name], tensors[f"{module}.scale"] = q, exponent.to(torch.uint8).view(torch.float8_e8m0fnu)
        elif DEEPSEEK_V4_FP4.search(name):
            rows, cols = value.shape
            tensors[name] = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=generator)
            exponents = torch.randint(118, 126, (rows, cols // 32), dtype=torch.uint8, generator=generator)
            tensors[f"{module}.scale"] = exponents.view(torch.float8_e8m0fnu)
        else:
            tensors[name] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((folder / "config.json").read_text())
    saved.update(expert_dtype="fp4", quantization_config=DEEPSEEK_V4_QUANTIZATION)
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


def modelopt_nvfp4(ct_nvfp4: Path, out: Path, *, beside: bool) -> Path:
    """A ModelOpt NVFP4 checkpoint in ModelOpt's names and dtypes, from the NVFP4 data llm-compressor wrote: `weight`
    U8 (the same packing), `weight_scale` F8_E4M3 (the same), `weight_scale_2` F32 [] (a multiplier: 1 / the global
    scale), `input_scale` F32 []. `beside`: the quantization in hf_quant_config.json (ModelOpt's exports), else in
    config.json (`quant_method: modelopt`)."""

    out.mkdir()
    weight_map = {}
    for f in ct_nvfp4.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
            continue
        tensors = {}
        for key, value in load_file(f).items():
            module, _, suffix = key.rpartition(".")
            if suffix == "weight_packed":
                tensors[f"{module}.weight"] = value
            elif suffix == "weight_global_scale":
                tensors[f"{module}.weight_scale_2"] = (1 / value.float()).reshape(())
                tensors[f"{module}.input_scale"] = torch.tensor(0.02)
            else:
                tensors[key] = value
        save_file(tensors, out / f.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f.name))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    (out / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    config = json.loads((out / "config.json").read_text())
    section = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"]}
    if beside:
        del config["quantization_config"]
        producer = {"name": "modelopt", "version": "0.37.0"}
        (out / "hf_quant_config.json").write_text(json.dumps({"producer": producer, "quantization": section}))
    else:
        config["quantization_config"] = {"quant_method": "modelopt", **section}
    (out / "config.json").write_text(json.dumps(config))
    return out


AUTO_ROUND_FP8 = {
    "quant_method": "auto-round",
    "packing_format": "auto_round:fp8",
    "group_size": [128, 128],
    "bits": 8,
    "data_type": "fp",
    "sym": True,
}


def auto_round_fp8(folder: Path, hidden: int = 128, intermediate: int = 256, layers: int = 2) -> Path:
    """AutoRound's FP8 from the spec (FORMATS.md section 8, from vLLM's loader): a tiny Llama's Linear weights in
    F8_E4M3 with an F32 `weight_scale_inv` per 128x128 tile."""
    from fp8q.layouts import find
    from fp8q.layouts.numerics import quantize as quantize_tensor

    tiny_llama(folder, hidden=hidden, intermediate=intermediate, layers=layers, shard_kb=400)
    block = find("block", "fp8")
    weight_map = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = {}
        for name, value in load_file(shard).items():
            if name.endswith("proj.weight"):
                q, scale = quantize_tensor(value, block)
                tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = q, scale
            else:
                tensors[name] = value
        save_file(tensors, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": AUTO_ROUND_FP8}))
    return folder
