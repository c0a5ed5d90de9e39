"""gpt-oss as OpenAI released it: MXFP4 experts (`*_blocks` U8 [E, out, in/32, 16], `*_scales` U8 [E, out, in/32]),
everything else bf16, `quant_method: mxfp4` with `modules_to_not_convert`. Built here from that spec on a tiny
GptOss (random codes, scales near 2^0). `dequantize` gives transformers' own `convert_moe_packed_tensors` bits under
the bf16 model's names and shapes; `convert` is refused before any work (no engine loads FP8 gpt-oss experts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fp8q import QuantizeOptions
from fp8q.engine.api import convert, dequantize
from fp8q.errors import UsageError
from tests.support.factories import load_all, tiny_gpt_oss_mxfp4

HIDDEN, INTERMEDIATE, EXPERTS = 64, 96, 4


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    return tiny_gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt-oss") / "mxfp4", HIDDEN, INTERMEDIATE, EXPERTS)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dequantize_gives_transformers_bits_under_the_bf16_models_names(gpt_oss, tmp_path, dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dequantize(gpt_oss, tmp_path / "out", dtype=dtype)
    source, ours = load_all(gpt_oss), load_all(tmp_path / "out")
    fused = [n.removesuffix("_blocks") for n in source if n.endswith("_blocks")]
    assert len(fused) == 4
    for name in fused:
        expected = convert_moe_packed_tensors(
            source[f"{name}_blocks"], source[f"{name}_scales"], dtype=ours[name].dtype
        )
        assert ours[name].dtype == getattr(torch, dtype) and ours[name].shape == expected.shape, name
        assert torch.equal(ours[name], expected), name
    assert not any(n.endswith(("_blocks", "_scales")) for n in ours)
    for name in fused:  # the biases, as they were
        assert torch.equal(ours[f"{name}_bias"], source[f"{name}_bias"]) and ours[f"{name}_bias"].abs().sum() > 0


def test_the_dequantized_model_is_a_plain_bf16_gpt_oss(gpt_oss, tmp_path):
    hf = pytest.importorskip("transformers")
    dequantize(gpt_oss, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    model, info = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (EXPERTS, HIDDEN, 2 * INTERMEDIATE)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(3, 20).reshape(1, -1)).logits).all()


def test_convert_is_refused_before_any_work_saying_what_to_do(gpt_oss, tmp_path):
    with pytest.raises(UsageError, match="no engine loads gpt-oss with FP8 experts.*fp8q dequantize"):
        convert(gpt_oss, tmp_path / "out", QuantizeOptions(device="cpu", scheme="block", format="fp8"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
