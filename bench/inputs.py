"""`make bench-inputs`: a measured conversion of each input format fp8q reads (README: "FP4 and mixed FP4/FP8").

Each source is built in a temp folder (or `--keep DIR`) the way its release family writes it: compressed-tensors MXFP4
and NVFP4 by llm-compressor's `model_free_ptq` (MXFP4A16, NVFP4A16) from a bf16 Llama (hidden 2048, intermediate 5632, 2
layers; llm-compressor 0.14 trips over 4); ModelOpt NVFP4 from that NVFP4 data in ModelOpt's names; gpt-oss and
DeepSeek-V4 from their specs on tiny transformers models, AutoRound FP8 from its spec on that Llama's shape
(tests/support/factories.py). Each then goes through `fp8q dequantize` (bf16) and `fp8q convert --scheme block --format
fp8 --scale-format ue8m0` (gpt-oss: refused, no engine loads it), each its own process: wall time, peak RSS, and of the
conversion how many weights came through bit for bit (fp8q.json).

    python bench/inputs.py [--keep DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.support.factories import (  # noqa: E402
    auto_round_fp8,
    modelopt_nvfp4,
    tiny_deepseek_v4,
    tiny_gpt_oss_mxfp4,
    tiny_llama,
)

CONVERT = ["--scheme", "block", "--format", "fp8", "--scale-format", "ue8m0"]


def build(root: Path) -> dict[str, Path]:
    """Every source, built once (a kept folder is reused)."""
    import llmcompressor

    made: dict[str, Path] = {}
    bf16 = root / "llama-bf16"
    if not bf16.exists():
        tiny_llama(bf16, hidden=2048, intermediate=5632, layers=2, shard_kb=200_000)
    for name, scheme in (("ct-mxfp4", "MXFP4A16"), ("ct-nvfp4", "NVFP4A16")):
        made[name] = root / name
        if not made[name].exists():
            llmcompressor.model_free_ptq(str(bf16), str(made[name]), scheme=scheme, ignore=["lm_head"])
    made["modelopt-nvfp4"] = root / "modelopt-nvfp4"
    if not made["modelopt-nvfp4"].exists():
        modelopt_nvfp4(made["ct-nvfp4"], made["modelopt-nvfp4"], beside=True)
    made["gpt-oss-mxfp4"] = root / "gpt-oss-mxfp4"
    if not made["gpt-oss-mxfp4"].exists():
        tiny_gpt_oss_mxfp4(made["gpt-oss-mxfp4"], hidden=1024, intermediate=1024, experts=16, layers=4)
    made["auto-round-fp8"] = root / "auto-round-fp8"
    if not made["auto-round-fp8"].exists():
        auto_round_fp8(made["auto-round-fp8"], hidden=2048, intermediate=5632, layers=2)
    made["deepseek-v4"] = root / "deepseek-v4"
    if not made["deepseek-v4"].exists():
        tiny_deepseek_v4(made["deepseek-v4"], layers=4, experts=64)
    return made


# Started from a small process of its own: a child forked from this one (torch, llm-compressor and the models built
# loaded) would count this process's pages as its peak RSS until it execs.
_MEASURE = """
import json, os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps([time.perf_counter() - started, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)]))
"""


def timed(args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MB) and exit code of `fp8q ARGS` in a process of its own."""
    command = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "fp8q", *args, "-q"]
    seconds, rss, code = json.loads(subprocess.run(command, cwd=ROOT, capture_output=True, text=True).stdout)
    return seconds, rss, code


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="build the sources here and keep them")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.keep or Path(tempfile.mkdtemp(prefix="fp8q-inputs-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, src in build(root).items():
        out = root / f"{name}.out"
        for folder in (out / "bf16", out / "fp8"):
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        out.mkdir(exist_ok=True)
        deq = timed(["dequantize", str(src), str(out / "bf16")])
        conv = timed(["convert", str(src), str(out / "fp8"), *CONVERT])
        row = {"input": name, "size_mb": round(size_mb(src), 1), "dequantize_s": round(deq[0], 2)}
        row["dequantize_rss_mb"] = round(deq[1])
        if conv[2] == 0:
            stats = json.loads((out / "fp8" / "fp8q.json").read_text())["tensors"]
            exact = sum(bool(s.get("exact")) for s in stats.values())
            worst = max((float(s["rel_error"]) for s in stats.values()), default=0.0)
            row.update(convert_s=round(conv[0], 2), convert_rss_mb=round(conv[1]), exact=f"{exact} of {len(stats)}")
            row["worst_rel_error"] = f"{worst:.2e}"
        else:
            row.update(convert_s=None, exact=f"refused (exit {conv[2]})")
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| input | size | dequantize (bf16) | convert (fp8 block ue8m0) | exact weights | worst rel. error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        conv_text = f"{r['convert_s']} s, {r['convert_rss_mb']} MB RSS" if r["convert_s"] is not None else "refused"
        print(
            f"| {r['input']} | {r['size_mb']} MB | {r['dequantize_s']} s, {r['dequantize_rss_mb']} MB RSS "
            f"| {conv_text} | {r['exact']} | {r.get('worst_rel_error', '')} |"
        )
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}; sources in {root}")


if __name__ == "__main__":
    main()
