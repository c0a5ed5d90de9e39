"""AutoRound's FP8 (`quant_method: auto-round`, `packing_format: auto_round:fp8`): F8_E4M3 weights with an F32
`weight_scale_inv` per 128x128 tile, built here from that spec (FORMATS.md section 8, from vLLM's loader) on a tiny
Llama. Dequantized as w times its tile's scale; into fp8 block 128x128 (the layout it is in) copied byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fp8q import QuantizeOptions
from fp8q.engine.api import convert, dequantize
from tests.support.factories import auto_round_fp8, load_all


@pytest.fixture(scope="module")
def auto_round(tmp_path_factory) -> Path:
    return auto_round_fp8(tmp_path_factory.mktemp("auto-round") / "model")


def test_dequantize_is_w_times_its_tiles_scale(auto_round, tmp_path):
    dequantize(auto_round, tmp_path / "out")
    source, ours = load_all(auto_round), load_all(tmp_path / "out")
    weights = [n for n in ours if n.endswith("proj.weight")]
    assert len(weights) == 14 and not any(n.endswith("_scale_inv") for n in ours)
    for name in weights:
        q, scale = source[name], source[name.removesuffix("weight") + "weight_scale_inv"]
        rows, cols = q.shape
        tiles = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        expected = (q.double() * tiles.double()).float().to(torch.bfloat16)  # vLLM multiplies in float32
        assert torch.equal(ours[name].view(torch.int16), expected.view(torch.int16)), name


def test_into_its_own_layout_every_weight_is_copied_byte_for_byte(auto_round, tmp_path):
    report = convert(auto_round, tmp_path / "out", QuantizeOptions(device="cpu", scheme="block", format="fp8"))
    source, out = load_all(auto_round), load_all(tmp_path / "out")
    for name in (n for n in source if n.endswith("proj.weight") or n.endswith("_scale_inv")):
        assert out[name].dtype == source[name].dtype
        assert torch.equal(out[name].view(torch.uint8), source[name].view(torch.uint8)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    line = next(f for f in report.findings if f.startswith("exact:"))
    assert line == "exact: 14 of 14 weights came through bit for bit (14 already in the layout, copied)"


def test_into_another_layout_every_weight_is_checked(auto_round, tmp_path):
    report = convert(auto_round, tmp_path / "out", QuantizeOptions(device="cpu"))
    stats = json.loads((tmp_path / "out" / "fp8q.json").read_text())["tensors"]
    assert len(stats) == 14 and all("exact" in s for s in stats.values())
    assert any(f.startswith("exact: ") and "of 14 weights" in f for f in report.findings)
