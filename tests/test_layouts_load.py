"""Every layout's output of a tiny dense model loads and runs in transformers on the CPU, with logits
close to the bf16 model's. The client gaps that are known (README, "Which engine loads which layout") are
strict expected failures in the transformers version they were measured with: a fix upstream, or any
other failure, shows up here instead of being skipped."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

from fp8q import QuantizeOptions, quantize
from tests.factories import tiny_llama, tiny_qwen3_moe

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

MEASURED = Version(transformers.__version__) <= Version("5.17.0")  # the gaps below were measured up to here


def _gap(reason: str):
    return pytest.mark.xfail(reason=f"transformers {transformers.__version__}: {reason}", strict=MEASURED)


ODD_BLOCK_DIMS = _gap("block weights whose dims are not 128-multiples crash the forward pass")
FP8_TENSOR_SCALE = _gap("ignores the per-tensor weight_scale of the vLLM fp8 layout")
BLOCK_MOE = _gap("fails to decompress block-quantized MoE experts")
# (scheme, format, model width): 128-multiples unless the case is about other dims.
CASES = [
    pytest.param("channel", "compressed-tensors", 128, id="channel-ct"),
    pytest.param("channel", "compressed-tensors", 80, id="channel-ct-odd-dims"),
    pytest.param("block", "compressed-tensors", 128, id="block-ct"),
    pytest.param("block", "compressed-tensors", 80, id="block-ct-odd-dims", marks=ODD_BLOCK_DIMS),
    pytest.param("tensor", "compressed-tensors", 128, id="tensor-ct"),
    pytest.param("block", "fp8", 128, id="block-fp8"),
    pytest.param("block", "fp8-ue8m0", 128, id="block-fp8-ue8m0"),
    pytest.param("mx", "compressed-tensors", 128, id="mx-ct"),
    pytest.param("tensor", "fp8", 128, id="tensor-fp8", marks=FP8_TENSOR_SCALE),
    pytest.param("channel", "compressed-tensors", "moe", id="channel-ct-moe"),
    pytest.param("block", "compressed-tensors", "moe", id="block-ct-moe", marks=BLOCK_MOE),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    torch.manual_seed(0)  # module fixtures come before the per-test seed: without this, the weights (and the
    # closeness of the logits) would depend on which tests ran before
    root = tmp_path_factory.mktemp("layouts")
    return {
        128: tiny_llama(root / "src128", hidden=128, intermediate=256),
        80: tiny_llama(root / "src80", hidden=80, intermediate=200),
        "moe": tiny_qwen3_moe(root / "moe", hidden=128, intermediate=128),
    }


def _logits(path, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    with torch.no_grad():
        return model(torch.arange(3, 40).reshape(1, -1)).logits.float()


def _client_config(fmt):
    from transformers import CompressedTensorsConfig, FineGrainedFP8Config

    if fmt == "compressed-tensors":
        return CompressedTensorsConfig(dequantize=True)
    if fmt == "fp8-ue8m0":
        return FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0")
    return FineGrainedFP8Config(dequantize=True)


@pytest.mark.parametrize("scheme,fmt,width", CASES)
def test_layout_runs_in_transformers(sources, tmp_path, scheme, fmt, width):
    out = tmp_path / "out"
    fmt_options = {"format": "fp8", "scale_format": "ue8m0"} if fmt == "fp8-ue8m0" else {"format": fmt}
    quantize(sources[width], out, QuantizeOptions(scheme=scheme, device="cpu", load_check=False, **fmt_options))
    base = _logits(sources[width], dtype=torch.bfloat16)
    got = _logits(out, quantization_config=_client_config(fmt))
    cos = torch.nn.functional.cosine_similarity(got.flatten(), base.flatten(), dim=0).item()
    assert cos > 0.9, f"{scheme}/{fmt}: logits cosine {cos:.3f}"
