"""--block-size: written where the engines read it (the config and the scales' shape), checked against the
weights, and never padded past a weight by the kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from fp8q import QuantizeOptions, quantize
from tests.support.runs import _cli, _layers, _refused, _source


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fp8"])
def test_block_size_is_carried_into_config_and_scales(tmp_path, fmt):
    src = _layers(tmp_path / "src", 1, width=256)
    options = QuantizeOptions(device="cpu", scheme="block", format=fmt, block_size=(64, 32))
    quantize(src, tmp_path / "out", options)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    if fmt == "fp8":
        assert qc["weight_block_size"] == [64, 32]
        suffix = "weight_scale_inv"
    else:
        group = qc["config_groups"]["group_0"]
        assert group["weights"]["block_structure"] == [64, 32] and group["input_activations"]["group_size"] == 32
        suffix = "weight_scale"
    with safe_open(tmp_path / "out" / "model-00001-of-00001.safetensors", "pt") as f:
        assert tuple(f.get_slice(f"model.layers.0.mlp.up_proj.{suffix}").get_shape()) == (512 // 64, 256 // 32)


def test_a_block_larger_than_every_weight_is_a_problem_and_the_kernel_never_pads_past_the_weight(tmp_path):
    import subprocess
    import sys

    src = _source(tmp_path / "src")
    for block in ("99999999x1", "1x99999999"):
        code, lines = _cli("inspect", src, "--scheme", "block", "--block-size", block, "--no-load-check")
        assert code == 1 and any(
            line.startswith("problem: --block-size") and "more than any weight has (the largest: 128)" in line
            for line in lines
        ), lines
        args = ("--scheme", "block", "--block-size", block, "--no-load-check", "--device", "cpu")
        _refused(_cli("quantize", src, tmp_path / "out", *args), f"--block-size {block}: 9999")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # The kernel itself, with 2 GB of address space (torch takes under 1 GB): a tile as tall as the block would be
    # 2 GB of zeros; the weight's own rows make the same scales and bytes.
    script = """
import resource, torch
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from fp8q.layouts import numerics
from fp8q.layouts import find
w = (torch.randn(64, 128) * 0.05).to(torch.bfloat16)
for fmt in ("compressed-tensors", "fp8"):
    q, s = numerics.quantize(w, find("block", fmt, block=(1 << 23, 1)))
    q2, s2 = numerics.quantize(w, find("block", fmt, block=(64, 1)))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    back = numerics.dequantize(q, s, find("block", fmt, block=(1 << 23, 1)))
    assert torch.equal(back, numerics.dequantize(q2, s2, find("block", fmt, block=(64, 1))))
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
