"""The bytes of every output fp8q makes, for checking that a change of the code changes none of them.

    python bench/output_digest.py DIR > digest.json     # on one commit, then on another: the two must be equal

Builds fixed inputs in DIR (a dense Llama with odd and with 128-multiple dims, a Qwen3-MoE, a checkpoint of fused
3-D experts), then runs every command on them: `quantize` in every layout (and a 64x64 block), `dequantize` of each
output, and `convert` from every layout to two others; prints {case: {file: sha256}} with fp8q.json's timings left
out (they are the one thing a run may not repeat). Runs in the project's environment; the code imported is the
one `PYTHONPATH` (or the checkout it sits in) gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(os.environ.get("FP8Q_ROOT", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(ROOT))

from fp8q import QuantizeOptions, convert, dequantize, quantize  # noqa: E402
from tests.support.factories import tiny_llama, tiny_qwen3_moe, write_shards  # noqa: E402

# (scheme, format, scale format, block) of every layout, by its short name.
LAYOUTS = {
    "ct-channel": ("channel", "compressed-tensors", "float", (128, 128)),
    "ct-tensor": ("tensor", "compressed-tensors", "float", (128, 128)),
    "ct-block": ("block", "compressed-tensors", "float", (128, 128)),
    "ct-block-64": ("block", "compressed-tensors", "float", (64, 64)),
    "ct-mx": ("mx", "compressed-tensors", "float", (128, 128)),
    "fp8-tensor": ("tensor", "fp8", "float", (128, 128)),
    "fp8-block": ("block", "fp8", "float", (128, 128)),
    "fp8-block-ue8m0": ("block", "fp8", "ue8m0", (128, 128)),
}


def _options(name: str, **extra: object) -> QuantizeOptions:
    scheme, fmt, scale_format, block = LAYOUTS[name]
    return QuantizeOptions(
        scheme=scheme, format=fmt, scale_format=scale_format, block_size=block, device="cpu", load_check=False, **extra
    )  # type: ignore[arg-type]


def _digest(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "fp8q.json":
            manifest = json.loads(data)
            manifest.pop("timings", None)
            data = json.dumps(manifest, sort_keys=True).encode()
        found[path.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    return found


def _fused(folder: Path) -> Path:
    E, H, I = 4, 128, 96  # noqa: E741
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": (torch.randn(E, H, 2 * I) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": (torch.randn(E, I, H) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.router.weight": torch.randn(E, H).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": (torch.randn(H, H) * 0.05).to(torch.bfloat16),
    }
    config = {"model_type": "llama4_text", "hidden_size": H, "architectures": ["Llama4ForCausalLM"]}
    return write_shards(folder, {"model.safetensors": tensors}, index=False, config=config)


def main(root: Path) -> dict[str, dict[str, str]]:
    torch.manual_seed(0)
    sources = {
        "dense-odd": tiny_llama(root / "src" / "dense-odd"),
        "dense-128": tiny_llama(root / "src" / "dense-128", hidden=128, intermediate=256),
        "moe": tiny_qwen3_moe(root / "src" / "moe", hidden=128, intermediate=128),
        "fused": _fused(root / "src" / "fused"),
    }
    digests: dict[str, dict[str, str]] = {}
    for model, src in sources.items():
        for name in LAYOUTS:
            if name == "ct-mx" and model == "dense-odd":
                continue  # dims that are not multiples of 32: refused
            out = root / "out" / model / name / "model-fp8"
            quantize(src, out, _options(name))
            digests[f"quantize {model} {name}"] = _digest(out)
            back = root / "out" / model / name / "model-bf16"
            dequantize(out, back)
            digests[f"dequantize {model} {name}"] = _digest(back)
            for target in ("ct-channel", "fp8-block"):
                if target != name and not (model == "dense-odd" and target == "fp8-block"):
                    converted = root / "out" / model / name / f"to-{target}"
                    convert(out, converted, _options(target))
                    digests[f"convert {model} {name} -> {target}"] = _digest(converted)
    return digests


if __name__ == "__main__":
    json.dump(main(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
