"""`make bench`: fp8q against `cp` and llm-compressor `model_free_ptq` on synthetic Llama-shaped checkpoints.

Builds bf16 checkpoints of two sizes (hidden 4096, intermediate 11008, 4 and 12 layers, two layers
per shard, safetensors only) in a temp folder, then runs each contender in its own process and
reports wall time, GB/s of bf16 input, ratios measured in this same run, and each process's peak
RSS (from wait4). Before each contender the machine is settled: dirty pages flushed and, where
allowed (root), the page cache dropped, so every contender reads the checkpoint (and its own
libraries) from disk; `--warm` keeps the cache instead. Each contender runs `--repeat` times, in
turns, and the median is reported (these machines are noisy).

    python bench/bench.py [--layers 4 12] [--repeat 3] [--warm] [--keep DIR] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, VOCAB = 4096, 11008, 32000
PYTHON = sys.executable


def build_checkpoint(folder: Path, layers: int) -> int:
    """A Llama-shaped bf16 checkpoint; returns its size in bytes."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (HIDDEN, HIDDEN),
        "self_attn.v_proj": (HIDDEN, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": randn(VOCAB, HIDDEN)}]
    for layer in range(layers):
        if layer % 2 == 0 and layer:
            shards.append({})
        prefix = f"model.layers.{layer}"
        for name, shape in shapes.items():
            shards[-1][f"{prefix}.{name}.weight"] = randn(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shards[-1][f"{prefix}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    shards[-1]["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    shards[-1]["lm_head.weight"] = randn(VOCAB, HIDDEN)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.nbytes
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# Peak RSS comes from wait4 in a small intermediate process: a child forked straight from this
# (large) process would inherit its high-water mark into ru_maxrss.
_TIMER = (
    "import os, subprocess, sys, time; t = time.perf_counter(); "
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "_, st, ru = os.wait4(p.pid, 0); print(time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(st))"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (seconds, peak RSS in MiB) of that process alone."""
    done = subprocess.run([PYTHON, "-c", _TIMER, *cmd], capture_output=True, text=True)
    try:
        seconds, rss_kib, code = done.stdout.split()[-3:]
    except ValueError:
        code = "?"
    if code != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return float(seconds), int(rss_kib) / 1024


def settle(warm: bool) -> None:
    """Before each contender: flush dirty pages (so none pays for another's writeback) and, unless
    `warm`, drop the page cache where allowed (root) so every contender reads from disk."""
    os.sync()
    if warm:
        return
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass


@dataclass(frozen=True)
class Timing:
    exit_s: float  # until the process exited
    durable_s: float  # ... and until `sync` returned: its output is on disk
    rss: float  # peak RSS, MiB


def timed(cmd: list[str], out: Path, warm: bool) -> Timing:
    """One contender from a settled machine: its time to exit, its time until its writes are on disk
    (fp8q fsyncs its shards itself; cp and model_free_ptq leave theirs in the page cache), and its RSS.
    Its output is removed afterwards."""
    settle(warm)
    seconds, rss = measure(cmd)
    start = time.perf_counter()
    os.sync()
    durable = seconds + time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return Timing(seconds, durable, rss)


def median(timings: list[Timing]) -> Timing:
    """Median times; the largest peak RSS."""
    exit_s = statistics.median(t.exit_s for t in timings)
    return Timing(exit_s, statistics.median(t.durable_s for t in timings), max(t.rss for t in timings))


def cold_cache_possible() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def has_llmcompressor() -> bool:
    return subprocess.run([PYTHON, "-c", "import llmcompressor"], capture_output=True).returncode == 0


LABELS = {"ref": "model_free_ptq"}
MODEL_FREE = (
    "import sys; from llmcompressor import model_free_ptq; "
    "model_free_ptq(sys.argv[1], sys.argv[2], scheme='FP8_DYNAMIC', "
    "ignore=['lm_head', 'model.embed_tokens'], device='cpu')"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it")
    parser.add_argument("--no-reference", action="store_true", help="skip llm-compressor model_free_ptq")
    parser.add_argument("--extra", nargs="*", default=[], help="extra fp8q quantize options")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender; the median is reported")
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: drop it before each run)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="fp8q-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    reference = not args.no_reference and has_llmcompressor()
    _, baseline_rss = measure([PYTHON, "-c", "import torch, fp8q"])
    largest = INTERMEDIATE * HIDDEN * 2
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"RSS of `import torch, fp8q`: {baseline_rss:.0f} MiB")
    if args.warm or not cold_cache_possible():
        cache = "warm (the checkpoint stays in the page cache)"
    else:
        cache = "cold (page cache dropped before each run)"
    print(f"page cache: {cache}; median of {args.repeat} run(s) per contender, in turns; peak RSS: the largest")
    rows = []
    every_run: list[tuple[int, dict[str, list[Timing]]]] = []
    try:
        for layers in args.layers:
            src = root / f"llama-{layers}L"
            if not src.exists():
                print(f"building {src} ...", flush=True)
                build_checkpoint(src, layers)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            outs = {name: root / name for name in ("cp", "fp8q", "ref")}
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
            commands = {
                "cp": ["cp", "-r", str(src), str(outs["cp"])],
                "fp8q": [PYTHON, "-m", "fp8q", "quantize", str(src), str(outs["fp8q"]), "--quiet", "--device", "cpu"]
                + args.extra,
            }
            if reference:
                commands["ref"] = [PYTHON, "-c", MODEL_FREE, str(src), str(outs["ref"])]
            runs: dict[str, list[Timing]] = {name: [] for name in commands}
            for _ in range(args.repeat):
                for name, cmd in commands.items():
                    runs[name].append(timed(cmd, outs[name], args.warm))
            ref = median(runs["ref"]) if reference else None
            rows.append((layers, size, median(runs["cp"]), median(runs["fp8q"]), ref))
            every_run.append((layers, runs))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    for title, pick in (
        ("until the process exits", lambda r: r.exit_s),
        ("until its output is on disk (exit, then `sync`)", lambda r: r.durable_s),
    ):
        print(f"\n{title}:\n")
        print(
            "| layers | bf16 GB | cp s | fp8q s | fp8q GB/s | fp8q / cp | model_free_ptq s | fp8q speed-up "
            "| fp8q peak RSS MiB | model_free_ptq RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for layers, size, cp, fp8q, ref in rows:
            s = pick(fp8q)
            ref_cells = f"{pick(ref):.1f} | {pick(ref) / s:.1f}x" if ref else "n/a | n/a"
            print(
                f"| {layers} | {size / 1e9:.2f} | {pick(cp):.1f} | {s:.1f} | {size / s / 1e9:.2f} "
                f"| {s / pick(cp):.1f}x | {ref_cells} | {fp8q.rss:.0f} | {f'{ref.rss:.0f}' if ref else 'n/a'} |"
            )
    print("\nevery run, seconds to exit:")
    for layers, runs in every_run:
        cells = "; ".join(
            f"{LABELS.get(name, name)} {' '.join(f'{t.exit_s:.1f}' for t in timings)}" for name, timings in runs.items()
        )
        print(f"  {layers} layers: {cells}")
    if len(rows) >= 2:
        small, big = rows[0][3].rss, rows[-1][3].rss
        budget = baseline_rss + 4 * largest / 2**20 + 256
        print(
            f"\npeak RSS {rows[-1][0]} vs {rows[0][0]} layers: {big / small - 1:+.1%}; "
            f"budget (import RSS + 4 x largest tensor + 256 MiB) = {budget:.0f} MiB, used {big:.0f} MiB"
        )


if __name__ == "__main__":
    main()
