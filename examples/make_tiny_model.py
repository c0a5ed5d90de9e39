"""Build a tiny bf16 Llama checkpoint (random weights, a real tokenizer trained on the spot) to convert.

python examples/make_tiny_model.py examples/tiny-llama
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXT = """FP8 checkpoints halve the memory of a model and double the speed of its matrix multiplies.
Each weight is stored in eight bits with a scale per output channel, per block or per tensor.
The quick brown fox jumps over the lazy dog while the engine serves the quantized model."""


def main(out: Path) -> None:
    torch.manual_seed(0)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        TEXT.splitlines() * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        # Whole 128x128 tiles everywhere (q 256 rows, k and v 2 heads of 64 = 128, MLP 512): the demo shows every
        # scheme, block and MXFP8 included, as vLLM loads them.
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.04)
    model.save_pretrained(out, max_shard_size="400KB")
    tokenizer.save_pretrained(out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {len(list(out.glob('*.safetensors')))} shards, {size / 1e6:.1f} MB of bf16 weights")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny-llama"))
