"""The output loads and runs in transformers + compressed-tensors on the CPU, as close to bf16 as
llm-compressor's own output."""

from __future__ import annotations

import pytest
import torch

from fp8q import QuantizeOptions, quantize
from tests.support.factories import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


def _logits(path, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)  # module fixtures come before the per-test seed: the same weights in any test order
    root = tmp_path_factory.mktemp("load")
    src = tiny_llama(root / "src")
    quantize(src, root / "fp8q", QuantizeOptions(device="cpu"))
    ref = None
    try:
        from llmcompressor import model_free_ptq

        model_free_ptq(
            str(src), str(root / "ref"), scheme="FP8_DYNAMIC", ignore=["lm_head", "model.embed_tokens"], device="cpu"
        )
        ref = root / "ref"
    except ImportError:
        pass
    return src, root / "fp8q", ref


@pytest.mark.parametrize("dequantize", [False, True], ids=["compressed", "dequantized"])
def test_logits_close_to_bf16(converted, dequantize):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src, ours, ref = converted
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    base = _logits(src, dtype=torch.bfloat16)
    got = _logits(ours, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(ours, **kwargs)
    down = model.model.layers[0].mlp.down_proj.weight
    assert down.dtype == (torch.bfloat16 if dequantize else torch.float8_e4m3fn)
    # A random tiny model amplifies weight error; what matters is matching the reference tool.
    assert torch.nn.functional.cosine_similarity(got.flatten(), base.flatten(), dim=0) > 0.9
    err = ((got - base).norm() / base.norm()).item()
    if ref is not None:
        ref_err = ((_logits(ref, **kwargs) - base).norm() / base.norm()).item()
        assert err <= ref_err + 1e-6
