"""`make bench-scale`: the size claims measured, Hub to Hub, on repos as large as the real ones, on a small disk.

The stand-in Hub (tests/support/hub_server.py) serves a repo whose shards are made as they are downloaded
(deterministic: their data cycles through one 64 MiB block of bf16 numbers drawn N(0, 0.02) from a fixed seed, each
tensor from its own phase; never stored whole), and takes the uploads by hashing them as they come (their size and
sha256 checked against what the client declared, as the Hub does) and dropping their bytes. Then, as a user runs it:

    fp8q quantize org/SHAPE --push-to-hub me/SHAPE-FP8 --device cpu --json

with classic LFS uploads (Xet would keep every chunk in hf_xet's local store on this disk), while a thread samples
the local disk the run holds (its staging folder, HF_HOME, TMPDIR) every half second. Reported per shape: wall time,
GB/s in (downloaded) and out (uploaded), peak local disk against the bound (two source shards, two output shards),
peak RSS, time per tensor, and the commit.

Shapes (`--shape`, repeatable):
- `llama-70b`: Llama-3.1-70B (hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 KV heads, vocab 128256,
  untied), 141 GB of bf16 in 30 shards, as the release is sharded;
- `deepseek-v3`: DeepSeek-V3's shape (671B: MLA attention, 3 dense layers then MoE layers of 256 routed experts and
  one shared, vocab 129280) in bf16, sharded as 163 shards hold all 61 layers; `--layers N` keeps the first N
  layers, every tensor of them at full size (16: 43 shards, 308 GB).

    python bench/scale.py [--shape llama-70b] [--shape deepseek-v3] [--layers 16] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fp8q.source.reader import byte_view  # noqa: E402
from tests.support.hub_server import HubServer  # noqa: E402
from tests.support.hub_server import disk_bytes as _disk  # noqa: E402

TOKENS = {"hf_write": ("me", "write")}
ITEMSIZE = {"BF16": 2, "F32": 4}
BLOCK_BYTES = 64 << 20
SEND_BYTES = 4 << 20


# The bytes every generated tensor cycles through: bf16 numbers N(0, 0.02), fixed seed.
_VALUES = (torch.randn(BLOCK_BYTES // 2, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
BLOCK = byte_view(_VALUES.view(torch.uint8))


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "BF16"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


class GeneratedShard:
    """A safetensors file made as it is read: its header, then each tensor's bytes from the block at the tensor's
    own phase (4-byte aligned: every value a finite number of its dtype, bf16 pairs for F32)."""

    def __init__(self, name: str, tensors: list[Tensor]) -> None:
        self.name = name
        entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
        self.layout: list[tuple[int, int, int]] = []  # (start in the file, length, phase in the block)
        offset = 0
        for t in tensors:
            entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            phase = int(hashlib.sha256(t.name.encode()).hexdigest()[:12], 16) % BLOCK_BYTES // 4 * 4
            self.layout.append((offset, t.nbytes, phase))
            offset += t.nbytes
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        self.header = struct.pack("<Q", len(header)) + header
        self.layout = [(len(self.header) + start, n, phase) for start, n, phase in self.layout]
        self.size = len(self.header) + offset
        # Made up (hashing terabytes would take the bench's hour): no download checks the bytes against it
        # (huggingface_hub checks the size, fp8q the header); the output's sha256s are the real ones.
        self.sha256 = hashlib.sha256(self.header + str(self.size).encode()).hexdigest()

    def chunks(self, start: int, length: int) -> Iterator[memoryview | bytes]:
        end = start + length
        if start < len(self.header):
            yield self.header[start : min(end, len(self.header))]
        for begin, n, phase in self.layout:
            a, b = max(start, begin), min(end, begin + n)
            while a < b:
                at = (phase + a - begin) % BLOCK_BYTES
                step = min(b - a, BLOCK_BYTES - at, SEND_BYTES)
                yield BLOCK[at : at + step]
                a += step


def llama_70b(n: int) -> tuple[list[Tensor], dict[str, object]]:
    """Llama-3.1-70B's tensors (its first `n` layers) in the release's order, and its config."""
    h, i, kv, vocab = 8192, 28672, 1024, 128256
    tensors = [Tensor("model.embed_tokens.weight", (vocab, h))]
    for k in range(n):
        p = f"model.layers.{k}"
        tensors += [
            Tensor(f"{p}.input_layernorm.weight", (h,)),
            Tensor(f"{p}.mlp.down_proj.weight", (h, i)),
            Tensor(f"{p}.mlp.gate_proj.weight", (i, h)),
            Tensor(f"{p}.mlp.up_proj.weight", (i, h)),
            Tensor(f"{p}.post_attention_layernorm.weight", (h,)),
            Tensor(f"{p}.self_attn.k_proj.weight", (kv, h)),
            Tensor(f"{p}.self_attn.o_proj.weight", (h, h)),
            Tensor(f"{p}.self_attn.q_proj.weight", (h, h)),
            Tensor(f"{p}.self_attn.v_proj.weight", (kv, h)),
        ]
    tensors += [Tensor("model.norm.weight", (h,)), Tensor("lm_head.weight", (vocab, h))]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": n,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    return tensors, config


def deepseek_v3(n: int) -> tuple[list[Tensor], dict[str, object]]:
    """DeepSeek-V3's tensors (its first `n` layers), and its config."""
    h, dense, moe, experts, vocab = 7168, 18432, 2048, 256, 129280
    heads, q_rank, kv_rank, nope, rope, v = 128, 1536, 512, 128, 64, 128
    tensors = [Tensor("model.embed_tokens.weight", (vocab, h))]
    for k in range(n):
        p = f"model.layers.{k}"
        tensors += [
            Tensor(f"{p}.input_layernorm.weight", (h,)),
            Tensor(f"{p}.post_attention_layernorm.weight", (h,)),
            Tensor(f"{p}.self_attn.q_a_proj.weight", (q_rank, h)),
            Tensor(f"{p}.self_attn.q_a_layernorm.weight", (q_rank,)),
            Tensor(f"{p}.self_attn.q_b_proj.weight", (heads * (nope + rope), q_rank)),
            Tensor(f"{p}.self_attn.kv_a_proj_with_mqa.weight", (kv_rank + rope, h)),
            Tensor(f"{p}.self_attn.kv_a_layernorm.weight", (kv_rank,)),
            Tensor(f"{p}.self_attn.kv_b_proj.weight", (heads * (nope + v), kv_rank)),
            Tensor(f"{p}.self_attn.o_proj.weight", (h, heads * v)),
        ]
        if k < 3:
            mlps = [(f"{p}.mlp", dense)]
        else:
            tensors += [
                Tensor(f"{p}.mlp.gate.weight", (experts, h)),
                Tensor(f"{p}.mlp.gate.e_score_correction_bias", (experts,), "F32"),
            ]
            mlps = [(f"{p}.mlp.experts.{e}", moe) for e in range(experts)] + [(f"{p}.mlp.shared_experts", moe)]
        for mlp, inter in mlps:
            tensors += [
                Tensor(f"{mlp}.gate_proj.weight", (inter, h)),
                Tensor(f"{mlp}.up_proj.weight", (inter, h)),
                Tensor(f"{mlp}.down_proj.weight", (h, inter)),
            ]
    tensors += [Tensor("model.norm.weight", (h,)), Tensor("lm_head.weight", (vocab, h))]
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": h,
        "intermediate_size": dense,
        "moe_intermediate_size": moe,
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "n_shared_experts": 1,
        "n_routed_experts": experts,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "q_lora_rank": q_rank,
        "kv_lora_rank": kv_rank,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v,
        "vocab_size": vocab,
        "num_nextn_predict_layers": 0,  # the MTP layer (61) is left out with the layers after the first N
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    return tensors, config


# name -> (its tensors and config for N layers, the release's layers, the release's shards)
SHAPES = {"llama-70b": (llama_70b, 80, 30), "deepseek-v3": (deepseek_v3, 61, 163)}


def shape_of(shape: str, layers: int | None) -> tuple[list[Tensor], dict[str, object], int]:
    """A shape's tensors and config, cut to `layers` (None: all), and its shard count: the release's, or, cut, as
    many as the release's shard size makes."""
    make, full_layers, full_shards = SHAPES[shape]
    tensors, config = make(layers or full_layers)
    if not layers or layers >= full_layers:
        return tensors, config, full_shards
    shard_bytes = sum(t.nbytes for t in make(full_layers)[0]) / full_shards
    return tensors, config, max(1, round(sum(t.nbytes for t in tensors) / shard_bytes))


def repo_files(tensors: list[Tensor], config: dict[str, object], shards: int) -> dict[str, GeneratedShard | bytes]:
    """The repo: tensors filled into `shards` shards of about equal size in order, the index, config.json."""
    total = sum(t.nbytes for t in tensors)
    groups: list[list[Tensor]] = [[]]
    filled = 0
    for t in tensors:
        if groups[-1] and filled + t.nbytes / 2 > total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(t)
        filled += t.nbytes
    files: dict[str, GeneratedShard | bytes] = {}
    weight_map = {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        files[name] = GeneratedShard(name, group)
        weight_map |= {t.name: name for t in group}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    files["config.json"] = json.dumps(config, indent=2).encode()
    return files


# Peak RSS from wait4 in a small intermediate process (a child forked from this one would inherit its high mark).
_TIMER = (
    "import os, subprocess, sys, time; t = time.perf_counter(); "
    "p = subprocess.Popen(sys.argv[1:]); "
    "_, st, ru = os.wait4(p.pid, 0); "
    "print(json.dumps([time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(st)]), file=sys.stderr)"
).replace("import os,", "import json, os,")


def measure(shape: str, layers: int | None, workdir: Path) -> dict[str, object]:
    tensors, config, shards = shape_of(shape, layers)
    files = repo_files(tensors, config, shards)
    largest = max(f.size for f in files.values() if isinstance(f, GeneratedShard))
    hub = HubServer(workdir / "repos", tokens=TOKENS, store=workdir / "store")
    hub.keep_uploads = False
    src = f"org/{shape}"
    hub.add_generated(src, files)  # type: ignore[arg-type]
    run = workdir / "run"
    for sub in ("hf", "cache", "tmp"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FP8Q_"))}
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(run / "hf"),
        "HF_TOKEN": "hf_write",
        "HF_HUB_DISABLE_XET": "1",
        "XDG_CACHE_HOME": str(run / "cache"),
        "TMPDIR": str(run / "tmp"),
        "PYTHONPATH": str(ROOT),
    }
    peak = [0, 0]  # all the run holds; the source shards downloaded alone
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], _disk(run / "hf", run / "cache", run / "tmp"))
            peak[1] = max(peak[1], _disk(*(run / "cache").glob("fp8q/push/*/.fp8q-downloads-*")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cmd = [sys.executable, "-m", "fp8q", "quantize", src, "--push-to-hub", f"me/{shape}-FP8", "--device", "cpu"]
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _TIMER, *cmd, "--json"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    hub.close()
    try:
        seconds, rss_kib, code = json.loads(child.stderr.strip().splitlines()[-1])
        report = json.loads(child.stdout)
    except (ValueError, IndexError):
        raise SystemExit(f"{shape}: the run failed\n{child.stderr[-4000:]}") from None
    if code != 0:
        raise SystemExit(f"{shape}: exit {code}\n{child.stderr[-4000:]}")
    n_tensors = report["tensors_quantized"] + report["tensors_kept"]
    output_shard = largest * report["bytes_out"] / report["bytes_in"]  # about: the largest output shard
    return {
        "shape": shape,
        "layers": config["num_hidden_layers"],
        "shards": shards,
        "tensors": n_tensors,
        "bytes_in": report["bytes_in"],
        "bytes_downloaded": report["bytes_downloaded"],
        "bytes_uploaded": report["bytes_uploaded"],
        "wall_s": round(wall, 1),
        "seconds_waiting": round(report["seconds_waiting"], 1),
        "gb_per_s_in": round(report["bytes_downloaded"] / wall / 1e9, 3),
        "gb_per_s_out": round(report["bytes_uploaded"] / wall / 1e9, 3),
        "peak_disk_bytes": peak[0],
        "peak_download_bytes": peak[1],
        "bytes_output": report["bytes_uploaded"],  # what an OUT of this output would hold
        "disk_bound_bytes": int(2 * largest + 2 * output_shard),
        "largest_source_shard": largest,
        "peak_rss_mib": round(rss_kib / 1024),
        "ms_per_tensor": round(1000 * report["seconds"] / n_tensors, 2),
        "commit": report["pushed"]["commit"],
        "files_committed": len(report["files"]) + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: both")
    parser.add_argument("--layers", type=int, default=16, help="deepseek-v3's layers (default 16; 61: all)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args()
    results = []
    for shape in args.shape or ["llama-70b", "deepseek-v3"]:
        layers = args.layers if shape == "deepseek-v3" and args.layers < 61 else None
        workdir = Path(tempfile.mkdtemp(prefix=f"fp8q-scale-{shape}-"))
        try:
            print(f"{shape}: running ...", file=sys.stderr, flush=True)
            results.append(measure(shape, layers, workdir))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({"results": results}))
        return
    header = ["shape", "layers", "shards", "bf16 GB", "wall s", "GB/s in", "GB/s out", "waiting on the Hub s"]
    header += ["peak disk GB (bound)", "of it downloads GB", "output GB", "peak RSS MiB", "ms/tensor", "commit"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [
            r["shape"],
            r["layers"],
            r["shards"],
            f"{r['bytes_in'] / 1e9:.1f}",
            r["wall_s"],
            r["gb_per_s_in"],
            r["gb_per_s_out"],
            r["seconds_waiting"],
            f"{r['peak_disk_bytes'] / 1e9:.1f} ({r['disk_bound_bytes'] / 1e9:.1f})",
            f"{r['peak_download_bytes'] / 1e9:.1f}",
            f"{r['bytes_output'] / 1e9:.1f}",
            r["peak_rss_mib"],
            r["ms_per_tensor"],
            f"{str(r['commit'])[:12]} ({r['files_committed']} files)",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
