"""DeepSeek-V4 as released: its own tensor names (`layers.N.attn.wq_a.weight`, `embed.weight`, `head.weight`), its
linears and shared experts F8_E4M3 with an F8_E8M0 `.scale` per 128x128 tile, its routed experts FP4 pairs in I8
[out, in/2] with an F8_E8M0 `.scale` per 32 inputs, `quant_method: fp8` with `scale_fmt: ue8m0` and a top-level
`expert_dtype: fp4`. Built here from that spec on a tiny DeepseekV4 of transformers (whose conversion mapping loads the
release's names): the FP8 ones quantized with power-of-two tile scales, the experts random codes with scales near 2^0.

The decoding the test holds fp8q to is written out below (FORMATS.md section 8, from vLLM's
`models/deepseek_v4` loader and DeepSeek's inference code): an FP8 weight times 2^(byte - 127) of its tile, an FP4 code
(low nibble first) times 2^(byte - 127) of its group of 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8q import QuantizeOptions
from fp8q.engine.api import convert, dequantize
from fp8q.errors import CheckpointError
from tests.support.factories import DEEPSEEK_V4_FP4, DEEPSEEK_V4_FP8, load_all, tiny_deepseek_v4

FP8_LINEAR, ROUTED = DEEPSEEK_V4_FP8, DEEPSEEK_V4_FP4


def _reference(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The release's decoding, written out on its own (see the module's docstring), in float32."""
    stored, scale = tensors[name], tensors[name.removesuffix("weight") + "scale"]
    factor = torch.pow(2.0, scale.view(torch.uint8).float() - 127)
    if stored.dtype == torch.float8_e4m3fn:
        rows, cols = stored.shape
        return stored.float() * factor.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    lut = torch.tensor(table + [-v for v in table])
    as_bytes = stored.view(torch.uint8)
    codes = lut[torch.stack([as_bytes & 15, as_bytes >> 4], dim=-1).reshape(as_bytes.shape[0], -1).long()]
    return codes * factor.repeat_interleave(32, 1)


@pytest.fixture(scope="module")
def deepseek_v4(tmp_path_factory) -> Path:
    if not hasattr(pytest.importorskip("transformers"), "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepseekV4")
    return tiny_deepseek_v4(tmp_path_factory.mktemp("dsv4") / "release")


def test_the_source_has_the_releases_names_and_dtypes(deepseek_v4):
    tensors = load_all(deepseek_v4)
    assert tensors["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert tensors["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert tensors["layers.0.ffn.experts.3.w1.weight"].dtype == torch.int8
    assert tensors["layers.0.ffn.experts.3.w1.scale"].shape == (128, 256 // 32)
    assert "embed.weight" in tensors and "head.weight" in tensors


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dequantize_gives_the_releases_values_under_its_own_names(deepseek_v4, tmp_path, dtype):
    dequantize(deepseek_v4, tmp_path / "out", dtype=dtype)
    source, ours = load_all(deepseek_v4), load_all(tmp_path / "out")
    decoded = [n for n in source if FP8_LINEAR.search(n) or ROUTED.search(n)]
    assert len(decoded) == 2 * (5 + 3 + 4 * 3)
    for name in decoded:
        expected = _reference(source, name).to(getattr(torch, dtype))
        assert ours[name].dtype == expected.dtype and torch.equal(ours[name], expected), name
    assert not any(n.endswith(".scale") for n in ours)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and "expert_dtype" not in config


def test_transformers_loads_the_bf16_output_as_a_plain_deepseek_v4(deepseek_v4, tmp_path):
    hf = pytest.importorskip("transformers")
    dequantize(deepseek_v4, tmp_path / "out")
    # Run in float32: transformers' DeepseekV4 mixes float32 activations into its bf16 linears on the CPU.
    model, info = hf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 20).reshape(1, -1)).logits).all()


def test_a_nan_e8m0_scale_is_refused_naming_the_tensor(deepseek_v4, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in deepseek_v4.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    scale = tensors["layers.1.attn.wo_b.scale"].view(torch.uint8).clone()
    scale[0, 1] = 255
    tensors["layers.1.attn.wo_b.scale"] = scale.view(torch.float8_e8m0fnu)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor layers\.1\.attn\.wo_b\.scale in model\.safetensors has 1 NaN"):
        dequantize(broken, tmp_path / "out")


def test_convert_to_block_fp8_keeps_the_fp8_linears_bytes_and_says_fp8_experts(deepseek_v4, tmp_path):
    """Into fp8 block 128x128 with ue8m0 scales, what vLLM's DeepSeek-V4 FP8 path loads: F32 `weight_scale_inv`,
    `expert_dtype: fp8` (without it vLLM takes the experts for FP4). The FP8 linears were in that very layout: their
    bytes come through unchanged; the FP4 experts (group scales within 2^8 of each other) come through exactly.
    What the release keeps in bf16 (compressors, indexers, routers, the head) stays bf16, listed as ignored."""
    options = QuantizeOptions(device="cpu", scheme="block", format="fp8", scale_format="ue8m0")
    report = convert(deepseek_v4, tmp_path / "out", options)
    source, out = load_all(deepseek_v4), load_all(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["expert_dtype"] == "fp8" and config["quantization_config"]["scale_fmt"] == "ue8m0"
    decoded = [n for n in source if FP8_LINEAR.search(n) or ROUTED.search(n)]
    for name in decoded:
        scale = out[name.removesuffix("weight") + "weight_scale_inv"]
        assert scale.dtype == torch.float32, name
        if FP8_LINEAR.search(name):
            assert torch.equal(out[name].view(torch.uint8), source[name].view(torch.uint8)), name
            e8m0 = source[name.removesuffix("weight") + "scale"].view(torch.uint8)
            assert torch.equal(scale, torch.pow(2.0, e8m0.float() - 127)), name
    stats = json.loads((tmp_path / "out" / "fp8q.json").read_text())["tensors"]
    assert sorted(stats) == sorted(decoded) and all(s["exact"] for s in stats.values())
    assert any(f.startswith(f"exact: {len(decoded)} of {len(decoded)} weights") for f in report.findings)
    kept = [n for n, t in out.items() if n.endswith(".weight") and t.dtype == torch.bfloat16 and t.dim() == 2]
    assert "head.weight" in kept and "layers.1.attn.indexer.wq_b.weight" in kept
    assert "head" in config["quantization_config"]["ignored_layers"]
