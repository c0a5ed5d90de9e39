"""Build small checkpoints for tests: real transformers models, or hand-made safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

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
