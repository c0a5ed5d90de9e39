"""`make bench`: fp8q against `cp`, its own ceiling and llm-compressor `model_free_ptq`, on synthetic Llama checkpoints.

Models (bf16, safetensors only, built once in a temp folder or `--keep DIR`):
- `--model small` (default): hidden 4096, intermediate 11008, `--layers 4 12`, two layers a shard. The 4-layer
  row is the start-up figure (importing torch is a fixed cost); throughput is judged at 12 layers.
- `--model 8b`: Llama-3.1-8B's shape (hidden 4096, intermediate 14336, 8 KV heads, vocab 128256, 32 layers),
  16.06 GB in 5 shards.

Contenders, each in its own process, in turns, `--repeat` times (median reported; these machines are noisy):
- `cp`: `cp -r` of the folder, the floor any converter that reads and writes every byte sits on;
- `fp8q`: `fp8q quantize --device DEVICE`;
- `fp8q-ceiling`: the whole fp8q pipeline with the quantization replaced by a stand-in that costs nothing and
  writes outputs of the right dtypes and shapes (bench/ceiling.py): what reading, writing, hashing and
  statistics cost, the most any device's kernels can reach;
- `model_free_ptq`: llm-compressor's converter (FP8_DYNAMIC, on cuda:0 with `--device cuda`), where installed;
- `fp8q-verify-source` and `fp8q-verify`: `fp8q verify OUT --source SRC` and `fp8q verify OUT` of the output
  `fp8q quantize` made (made once, untimed, before the runs); the table gives each beside `fp8q` ("x fp8q").

Before each run the machine is settled: dirty pages flushed and, unless `--warm`, the page cache dropped where
allowed (root). Reported per contender: wall time to exit (and until its output is on disk: exit, then `sync`),
peak RSS of the process (from wait4), and with `--device cuda` the peak GPU memory in use (NVML, sampled).

    python bench/bench.py [--device cpu|cuda] [--model small|8b] [--layers 4 12] [--only fp8q,cp]
                          [--repeat 3] [--warm] [--json] [--keep DIR]
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PYTHON = sys.executable
CONTENDERS = ("cp", "fp8q", "fp8q-ceiling", "model_free_ptq", "fp8q-verify-source", "fp8q-verify")
VERIFIERS = ("fp8q-verify-source", "fp8q-verify")  # they read the output fp8q made, and leave it


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    kv_heads: int
    vocab: int
    layers_per_shard: int


SMALL = Shape(hidden=4096, intermediate=11008, kv_heads=32, vocab=32000, layers_per_shard=2)
EIGHT_B = Shape(hidden=4096, intermediate=14336, kv_heads=8, vocab=128256, layers_per_shard=8)  # 32 layers: 5 shards


def build_checkpoint(folder: Path, layers: int, shape: Shape) -> int:
    """A Llama-shaped bf16 checkpoint; returns its size in bytes. The embedding opens the first shard and the
    final norm and lm_head close the last, as in the real releases."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * (shape.hidden // 32)

    def randn(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=gen) * 0.02).to(torch.bfloat16)

    linears = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": randn(shape.vocab, h)}]
    for layer in range(layers):
        if layer % shape.layers_per_shard == 0 and layer:
            shards.append({})
        prefix = f"model.layers.{layer}"
        for name, dims in linears.items():
            shards[-1][f"{prefix}.{name}.weight"] = randn(*dims)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shards[-1][f"{prefix}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    shards.append({"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": randn(shape.vocab, h)})
    weight_map, total = {}, 0
    for n, tensors in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.nbytes
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# Peak RSS comes from wait4 in a small intermediate process: a child forked straight from this (large)
# process would inherit its high-water mark into ru_maxrss.
_TIMER = (
    "import os, subprocess, sys, time; t = time.perf_counter(); "
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "_, st, ru = os.wait4(p.pid, 0); print(time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(st))"
)


class GpuPeak:
    """Peak GPU memory in use while a contender runs, above what was in use before (NVML every 20 ms, else
    nvidia-smi every 100 ms); None where neither is there."""

    def __init__(self, enabled: bool) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._nvml = None
        if enabled:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self._base = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
                self.peak = 0
            except Exception:  # noqa: BLE001 - no NVML bindings: ask nvidia-smi instead
                self._nvml = None
                self._base = self._smi_used()
                self.peak = None if self._base is None else 0

    @staticmethod
    def _smi_used() -> int | None:
        """Memory in use on GPU 0 in bytes, from nvidia-smi (slower than NVML, so sampled less often)."""
        try:
            mib = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            ).stdout
            return int(mib.strip()) << 20
        except (OSError, subprocess.SubprocessError, ValueError):
            return None

    def _used(self) -> int | None:
        if self._nvml is not None:
            return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        return self._smi_used()

    def __enter__(self) -> GpuPeak:
        if self.peak is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        period = 0.02 if self._nvml is not None else 0.1
        while not self._stop.wait(period):
            used = self._used()
            if used is not None:
                self.peak = max(self.peak or 0, used - self._base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


@dataclass(frozen=True)
class Timing:
    exit_s: float  # until the process exited
    durable_s: float  # ... and until `sync` returned: its output is on disk
    rss_mib: float
    gpu_mib: float | None


def settle(warm: bool) -> None:
    """Flush dirty pages (so no contender pays for another's write-back) and, unless `warm`, drop the page
    cache where allowed (root) so every contender reads from disk."""
    os.sync()
    if not warm:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError:
            pass


def timed(cmd: list[str], out: Path | None, warm: bool, cuda: bool, env: dict[str, str]) -> Timing:
    settle(warm)
    with GpuPeak(cuda) as gpu:
        done = subprocess.run([PYTHON, "-c", _TIMER, *cmd], capture_output=True, text=True, env=env)
    try:
        seconds, rss_kib, code = done.stdout.split()[-3:]
    except ValueError:
        code = "?"
    if code != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    start = time.perf_counter()
    os.sync()
    durable = float(seconds) + time.perf_counter() - start
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    gpu_mib = gpu.peak / 2**20 if gpu.peak is not None else None
    return Timing(float(seconds), durable, int(rss_kib) / 1024, gpu_mib)


def commands(
    src: Path, outs: dict[str, Path], device: str, verified: Path
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each contender's command line; `verified`: the fp8q output the verify contenders check."""
    env = dict(os.environ)
    quantize = [PYTHON, "-m", "fp8q", "quantize", str(src)]
    verify = [PYTHON, "-m", "fp8q", "verify", str(verified), "--top", "0"]
    model_free = (
        "import sys; from llmcompressor import model_free_ptq; model_free_ptq(sys.argv[1], sys.argv[2], "
        "scheme='FP8_DYNAMIC', ignore=['lm_head', 'model.embed_tokens'], device=sys.argv[3])"
    )
    return {
        "cp": (["cp", "-r", str(src), str(outs["cp"])], env),
        "fp8q": ([*quantize, str(outs["fp8q"]), "--quiet", "--device", device], env),
        "fp8q-ceiling": (
            [
                PYTHON,
                str(Path(__file__).with_name("ceiling.py")),
                "quantize",
                str(src),
                str(outs["fp8q-ceiling"]),
                "--quiet",
                "--device",
                device,
            ],
            env,
        ),
        "model_free_ptq": (
            [PYTHON, "-c", model_free, str(src), str(outs["model_free_ptq"]), "cuda:0" if device == "cuda" else "cpu"],
            env,
        ),
        "fp8q-verify-source": ([*verify, "--source", str(src)], env),
        "fp8q-verify": (verify, env),
    }


def has_llmcompressor() -> bool:
    return subprocess.run([PYTHON, "-c", "import llmcompressor"], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("small", "8b"), default="small")
    parser.add_argument("--layers", type=int, nargs="+", help="layer counts of the small model (default 4 12)")
    parser.add_argument("--only", help=f"comma-separated contenders, of {', '.join(CONTENDERS)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender; the median is reported")
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: drop it before each run)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(CONTENDERS)
    unknown = sorted(set(chosen) - set(CONTENDERS))
    if unknown:
        parser.error(f"--only: unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if "model_free_ptq" in chosen and not has_llmcompressor():
        chosen.remove("model_free_ptq")
        print("model_free_ptq: llm-compressor is not installed here, left out", file=sys.stderr)
    if args.model == "8b":
        shape, sizes = EIGHT_B, [32]
    else:
        shape, sizes = SMALL, args.layers or [4, 12]
    say = sys.stderr if args.json else sys.stdout
    root = args.keep or Path(tempfile.mkdtemp(prefix="fp8q-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = "warm (kept)" if args.warm or not os.access("/proc/sys/vm/drop_caches", os.W_OK) else "cold (dropped)"
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}", file=say)
    print(f"page cache: {cache}; median of {args.repeat} run(s) per contender, in turns", file=say)
    results = []
    try:
        for layers in sizes:
            src = root / f"llama-{args.model}-{layers}L"
            if not src.exists():
                print(f"building {src} ...", file=say, flush=True)
                build_checkpoint(src, layers, shape)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            outs = {name: root / f"out-{name}" for name in CONTENDERS}
            verified = root / f"verified-{layers}L"
            cmds = commands(src, outs, args.device, verified)
            if set(VERIFIERS) & set(chosen) and not verified.exists():
                print(f"quantizing {src} for the verify runs ...", file=say, flush=True)
                quantize = cmds["fp8q"][0]
                subprocess.run([*quantize[:5], str(verified), *quantize[6:]], check=True)
            runs: dict[str, list[Timing]] = {name: [] for name in chosen}
            for _ in range(args.repeat):
                for name in chosen:
                    cmd, env = cmds[name]
                    cuda = args.device == "cuda" and name not in ("cp", *VERIFIERS)
                    runs[name].append(timed(cmd, None if name in VERIFIERS else outs[name], args.warm, cuda, env))
            for name, timings in runs.items():
                gpu = [t.gpu_mib for t in timings if t.gpu_mib is not None]
                results.append(
                    {
                        "layers": layers,
                        "bytes": size,
                        "contender": name,
                        "seconds": [round(t.exit_s, 3) for t in timings],
                        "median_s": round(statistics.median(t.exit_s for t in timings), 3),
                        "median_durable_s": round(statistics.median(t.durable_s for t in timings), 3),
                        "peak_rss_mib": round(max(t.rss_mib for t in timings)),
                        "gpu_peak_mib": round(max(gpu)) if gpu else None,
                    }
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        sys.stdout.write(json.dumps({"results": results}) + "\n")
        return
    print_table(results)


def print_table(results: list[dict]) -> None:
    """One table per model size; ratios against cp and model_free_ptq measured in this same run."""
    header = ["contender", "median s (runs)", "GB/s", "x cp", "x fp8q", "model_free_ptq / it", "until on disk s"]
    header += ["peak RSS MiB", "GPU peak MiB"]
    for layers in sorted({r["layers"] for r in results}):
        rows = {r["contender"]: r for r in results if r["layers"] == layers}
        size = next(iter(rows.values()))["bytes"]
        cp, ref, fp8q = rows.get("cp"), rows.get("model_free_ptq"), rows.get("fp8q")
        print(f"\n{layers} layers, {size / 1e9:.2f} GB of bf16:\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name, r in rows.items():
            s = r["median_s"]
            cells = [
                name,
                f"{s:.1f} ({' '.join(f'{x:.1f}' for x in r['seconds'])})",
                f"{size / s / 1e9:.2f}",
                f"{s / cp['median_s']:.2f}" if cp else "n/a",
                f"{s / fp8q['median_s']:.2f}" if fp8q else "n/a",
                f"{ref['median_s'] / s:.1f}x" if ref else "n/a",
                f"{r['median_durable_s']:.1f}",
                str(r["peak_rss_mib"]),
                str(r["gpu_peak_mib"]) if r["gpu_peak_mib"] is not None else "-",
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
