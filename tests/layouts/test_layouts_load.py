"""transformers does with every layout, for a dense and for a MoE model, exactly what fp8q says it does
(each layout's cells: the plan's notes, the model card and the README's table all say what they say): where it says
"runs", the output loads on the CPU and its logits are close to the bf16 model's; where it says "refuses", loading
or the forward pass fails; where it says "garbage", the model loads and computes far from the bf16 model. A
transformers release newer than the one measured that behaves otherwise is reported as a skip naming the cell."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

from fp8q import QuantizeOptions, quantize
from fp8q.layouts import clients, find, layouts
from fp8q.layouts.clients import Outcome
from tests.support.factories import tiny_llama, tiny_qwen3_moe

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

MEASURED = Version(transformers.__version__) <= Version(f"{clients.TRANSFORMERS_MEASURED}.999")
ODD_BLOCK_DIMS = pytest.mark.xfail(
    reason=f"transformers {transformers.__version__}: block weights whose dims are not 128-multiples crash the "
    "forward pass",
    strict=MEASURED,
)


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


def _client_config(layout):
    from transformers import CompressedTensorsConfig, FineGrainedFP8Config

    if layout.format.value == "compressed-tensors":
        return CompressedTensorsConfig(dequantize=True)
    if layout.scale_format.value == "ue8m0":
        return FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0")
    return FineGrainedFP8Config(dequantize=True)


# Close to the bf16 model: a tiny random MoE model routes on small logit differences, and ue8m0's coarser scales
# (powers of two) measured 0.894 there; a layout whose scale is ignored measured 0.103.
CLOSE = {False: 0.9, True: 0.85}


def _outcome(source, out, layout, moe: bool = False) -> tuple[Outcome, str]:
    """What transformers does with the output: it runs close to the source, computes garbage, or fails."""
    base = _logits(source, dtype=torch.bfloat16)
    try:
        got = _logits(out, quantization_config=_client_config(layout))
    except Exception as e:  # noqa: BLE001 - any failure to load or run is the client refusing
        return Outcome.REFUSES, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    cos = torch.nn.functional.cosine_similarity(got.flatten(), base.flatten(), dim=0).item()
    return (Outcome.RUNS if cos > CLOSE[moe] else Outcome.GARBAGE), f"logits cosine {cos:.3f}"


def _quantized(source, out, layout):
    options = QuantizeOptions(
        scheme=layout.scheme, format=layout.format, scale_format=layout.scale_format, device="cpu", load_check=False
    )
    quantize(source, out, options)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("layout", layouts(), ids=lambda layout: layout.name)
def test_transformers_does_what_the_table_says(sources, tmp_path, layout, moe):
    cell = layout.transformers[moe]
    assert cell.evidence is clients.Evidence.TEST
    source = sources["moe" if moe else 128]
    _quantized(source, tmp_path / "out", layout)
    outcome, detail = _outcome(source, tmp_path / "out", layout, moe)
    if outcome is not cell.outcome and not MEASURED:
        pytest.skip(f"transformers {transformers.__version__} {outcome.value} {layout.name}: update the table")
    assert outcome is cell.outcome, f"{layout.name} {'MoE' if moe else 'dense'}: {detail}"


@pytest.mark.parametrize(
    "layout",
    [find("channel", "compressed-tensors"), pytest.param(find("block", "compressed-tensors"), marks=ODD_BLOCK_DIMS)],
    ids=["channel-ct-odd-dims", "block-ct-odd-dims"],
)
def test_odd_dims_in_transformers(sources, tmp_path, layout):
    _quantized(sources[80], tmp_path / "out", layout)
    outcome, detail = _outcome(sources[80], tmp_path / "out", layout)
    assert outcome is Outcome.RUNS, detail
