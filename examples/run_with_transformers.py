"""Load a bf16 model and its FP8 conversion with transformers (+ compressed-tensors) and compare them.

python examples/run_with_transformers.py examples/tiny-llama examples/tiny-llama-fp8
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(bf16_dir: str, fp8_dir: str) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(fp8_dir)
    ids = tokenizer("The quick brown fox jumps over", return_tensors="pt").input_ids
    bf16 = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
    fp8 = AutoModelForCausalLM.from_pretrained(fp8_dir)  # compressed-tensors runs the FP8 weights
    weight = fp8.model.layers[0].mlp.down_proj.weight
    print(f"layer 0 down_proj weight: {weight.dtype}, {tuple(weight.shape)}")
    with torch.no_grad():
        a, b = bf16(ids).logits.float(), fp8(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"logits cosine similarity bf16 vs fp8: {cos:.4f}; same next token at {agree:.0%} of positions")
    out = fp8.generate(ids, max_new_tokens=8, do_sample=False)
    print("fp8 greedy continuation:", repr(tokenizer.decode(out[0, ids.shape[1] :])))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
