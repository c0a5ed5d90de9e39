"""`fp8q.dequantize` turns every FP8 layout back into a plain bf16 checkpoint: the files are what transformers
writes, the weights are exactly what each format's own client computes, and the model loads and runs like the
FP8 model does when its client dequantizes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fp8q import QuantizeOptions, quantize
from fp8q.engine.api import dequantize
from fp8q.errors import CheckpointError, OutputError
from fp8q.events import PlanReady, TensorDone
from fp8q.verification import verify
from tests.support.factories import SIDE_FILES, as_bytes, load_all, tiny_llama
from tests.verification.test_verify import INDEX, copy, deepseek_style, edit

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

# id -> (scheme, format). transformers refuses fp8 block layers whose dims are not multiples of the block, so
# that layout is made from a 128/256-wide model; the others from one with 80/200 (edge tiles, odd channels).
LAYOUTS = {
    "ct-channel": ("channel", "compressed-tensors"),
    "ct-block": ("block", "compressed-tensors"),
    "ct-tensor": ("tensor", "compressed-tensors"),
    "fp8-tensor": ("tensor", "fp8"),
    "fp8-block": ("block", "fp8"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """id -> (FP8 checkpoint, its dequantized copy)."""
    root = tmp_path_factory.mktemp("dequantize")
    narrow = tiny_llama(root / "src")
    wide = tiny_llama(root / "src128", hidden=128, intermediate=256)
    found = {}
    for key, (scheme, fmt) in LAYOUTS.items():
        src = wide if key == "fp8-block" else narrow
        fp8, deq = root / key, root / f"{key}-bf16"
        quantize(src, fp8, QuantizeOptions(scheme=scheme, format=fmt, device="cpu", load_check=False))
        dequantize(fp8, deq)
        found[key] = (fp8, deq)
    return found


def client_dequantized(fp8: Path) -> dict[str, torch.Tensor]:
    """Every FP8 weight of a checkpoint dequantized by its format's client: compressed-tensors' own `dequantize`
    with the config's QuantizationArgs; for fp8, transformers' and DeepSeek's `q.float() * scale` in bf16."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    qc = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    groups = list(qc.get("config_groups", {}).values())
    tensors = load_all(fp8)
    result = {}
    for name, q in tensors.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        module = name.removesuffix(".weight")
        if qc["quant_method"] == "compressed-tensors":
            args = QuantizationArgs.model_validate(groups[0]["weights"])  # one group, targets ["Linear"]
            result[name] = ct_dequantize(q, tensors[f"{module}.weight_scale"], args=args).to(torch.bfloat16)
        elif qc["weight_block_size"] is None:
            result[name] = fp8_client(q, tensors[f"{module}.weight_scale"], None)
        else:
            result[name] = fp8_client(q, tensors[f"{module}.weight_scale_inv"], tuple(qc["weight_block_size"]))
    return result


def fp8_client(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """transformers' `Fp8Dequantize` and DeepSeek-V3's `weight_dequant` (inference/kernel.py: `y = x * s`): the
    float8 values times the float32 scale of their tensor or 128x128 tile, in float32, then to bf16."""
    s = scale.float()
    if block is not None:
        s = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: q.shape[0], : q.shape[1]]
    return (q.float() * s).to(torch.bfloat16)


def _load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 40).reshape(1, -1)).logits


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_files(converted, layout):
    fp8, deq = converted[layout]
    # Shards keep their names, the config loses quantization_config and nothing else, side files come along
    # (but not the FP8 run's fp8q.json: the one there describes this run and lists every file it wrote).
    assert sorted(p.name for p in deq.glob("*.safetensors")) == sorted(p.name for p in fp8.glob("*.safetensors"))
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    assert list(json.loads((deq / "config.json").read_text()).items()) == list(config.items())
    for name in SIDE_FILES:
        if name != "README.md":  # the card of what was made: tests/output/test_model_card.py
            assert (deq / name).read_bytes() == (fp8 / name).read_bytes(), name
    manifest = json.loads((deq / "fp8q.json").read_text())
    assert manifest["tool"] == "fp8q" and manifest["options"] == {"command": "dequantize", "dtype": "bfloat16"}
    assert sorted(manifest["files"]) == sorted(p.name for p in deq.iterdir() if p.name != "fp8q.json")
    assert not deq.with_name(deq.name + ".partial").exists()

    # The same tensors as the bf16 source: no scale left, the index lists each where it is, with its size.
    tensors = load_all(deq)
    assert not [n for n in tensors if "scale" in n]
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    index = json.loads((deq / INDEX).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, shard in index["weight_map"].items():
        with safe_open(deq / shard, "pt") as f:
            assert name in f.keys() and f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_are_what_the_client_computes(converted, layout):
    fp8, deq = converted[layout]
    expected = client_dequantized(fp8)
    before, after = load_all(fp8), load_all(deq)
    assert len(expected) == 14
    for name, tensor in after.items():
        want = expected.get(name, before[name])
        assert torch.equal(as_bytes(tensor), as_bytes(want)), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loads_and_runs_like_the_dequantized_fp8_model(converted, layout):
    from transformers import CompressedTensorsConfig, FineGrainedFP8Config

    fp8, deq = converted[layout]
    model = _load(deq)
    assert getattr(model.config, "quantization_config", None) is None
    files = load_all(deq)
    for name, param in model.state_dict().items():
        assert param.dtype == torch.bfloat16 and torch.equal(param, files[name]), name
    if layout == "fp8-tensor":
        return  # transformers drops the per-tensor `weight_scale` of the fp8 format: its FP8 model is not a reference
    if layout.startswith("ct"):
        reference = _load(fp8, quantization_config=CompressedTensorsConfig(dequantize=True))
        # Dequantizing only touches the weights: compressed-tensors still fake-quantizes the activations in
        # forward (W8A8), which a bf16 checkpoint does not and which cannot even run on these 80-wide inputs
        # for the block layout (its activation groups must divide the width). Compare the weights' effect alone.
        for module in reference.modules():
            if getattr(module, "quantization_scheme", None) is not None:
                module.quantization_enabled = False
    else:
        reference = _load(fp8, quantization_config=FineGrainedFP8Config(dequantize=True))
    state = reference.state_dict()
    for name, param in model.state_dict().items():
        assert torch.equal(param, state[name]), name
    assert torch.equal(_logits(model), _logits(reference))


def test_scale_in_another_shard(converted, tmp_path):
    """A scale is found through the index wherever it sits, not only beside its weight."""
    fp8, deq = converted["ct-block"]
    moved = copy(fp8, tmp_path)
    weight, scale = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale"
    index = json.loads((moved / INDEX).read_text())["weight_map"]
    holder = index[scale]
    other = next(t for t, shard in index.items() if shard != holder and "layers.1" in t)
    value = load_all(fp8)[scale]
    edit(moved, scale, lambda tensors: tensors.pop(scale))
    edit(moved, other, lambda tensors: tensors.__setitem__(scale, value))
    index = json.loads((moved / INDEX).read_text())["weight_map"]
    assert index[scale] != index[weight] and index[scale] != holder
    assert verify(moved).ok

    events = []
    report = dequantize(moved, tmp_path / "out", on_event=events.append)
    got, want = load_all(tmp_path / "out"), load_all(deq)
    assert sorted(got) == sorted(want)
    for name in got:
        assert torch.equal(got[name], want[name]), name
    assert report.tensors_dequantized == 14 and report.layouts == {"compressed-tensors block 128x128": 14}
    assert isinstance(events[0], PlanReady) and all(isinstance(e, TensorDone) for e in events[1:])
    assert len(events) - 1 == len(events[0].plan.jobs) == report.tensors_dequantized + report.tensors_kept


def test_quantization_only_tensors_are_dropped(converted, tmp_path):
    fp8, deq = converted["ct-tensor"]
    extra = copy(fp8, tmp_path)
    module = "model.layers.0.self_attn.q_proj"

    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{module}.input_scale"] = torch.ones(1, dtype=torch.bfloat16)
        tensors[f"{module}.weight_zero_point"] = torch.zeros(1, dtype=torch.float8_e4m3fn)

    edit(extra, f"{module}.weight", add)
    report = dequantize(extra, tmp_path / "out")
    assert report.tensors_dropped == 16 and report.tensors_dequantized == 14
    assert sorted(load_all(tmp_path / "out")) == sorted(load_all(deq))


def test_deepseek_style_release(tmp_path):
    """DeepSeek's own layout (edge tiles here), checked against its `weight_dequant`: each 128x128 tile times its
    scale, in float32."""
    src, fp8 = deepseek_style(tmp_path)
    dequantize(fp8, tmp_path / "out")
    before, after = load_all(fp8), load_all(tmp_path / "out")
    assert sorted(after) == sorted(load_all(src))
    for name, tensor in after.items():
        if before[name].dtype != torch.float8_e4m3fn:
            assert torch.equal(as_bytes(tensor), as_bytes(before[name])), name
            continue
        q, s = before[name], before[f"{name}_scale_inv"]
        want = torch.empty(q.shape)
        for i in range(math.ceil(q.shape[0] / 128)):
            for j in range(math.ceil(q.shape[1] / 128)):
                tile = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
                want[tile] = q[tile].float() * s[i, j]
        assert torch.equal(tensor, want.to(torch.bfloat16)), name
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_float16_output(converted, tmp_path):
    fp8, _ = converted["ct-channel"]
    dequantize(fp8, tmp_path / "out", dtype="float16")
    tensors, expected = load_all(tmp_path / "out"), client_dequantized(fp8)
    for name, want in expected.items():
        assert tensors[name].dtype == torch.float16
        # compressed-tensors multiplies in the scale's dtype (bf16 here), then casts.
        assert torch.equal(tensors[name], want.to(torch.float16)), name


def test_refusals(converted, tmp_path):
    fp8, deq = converted["fp8-block"]
    with pytest.raises(CheckpointError, match="nothing to dequantize"):
        dequantize(fp8.parent / "src", tmp_path / "a")

    broken = copy(fp8, tmp_path)
    scale = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    edit(broken, scale, lambda tensors: tensors.pop(scale))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight .*no scale"):
        dequantize(broken, tmp_path / "b")

    with pytest.raises(OutputError, match="not empty"):
        dequantize(fp8, deq)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b.partial").exists()


@pytest.mark.parametrize("layout", ["fp8-tensor", "fp8-block"])
def test_fp8_float32_output_is_the_clients_float32_product(converted, tmp_path, layout):
    """In float32 the fp8 clients' product (`q.float() * scale.float()`) shows whole, no bf16 rounding after it."""
    fp8, _ = converted[layout]
    dequantize(fp8, tmp_path / "f32", dtype="float32")
    before, after = load_all(fp8), load_all(tmp_path / "f32")
    qc = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    block = qc["weight_block_size"]
    checked = 0
    for name, q in before.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        scale = before[f"{name}_scale_inv" if block else f"{name}_scale"].float()
        if block:
            scale = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: q.shape[0], : q.shape[1]]
        assert after[name].dtype == torch.float32 and torch.equal(after[name], q.float() * scale), name
        checked += 1
    assert checked == 14
