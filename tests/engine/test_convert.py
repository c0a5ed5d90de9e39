"""`fp8q convert`, MXFP8 and power-of-two (ue8m0) block scales.

convert is dequantize then quantize in one streaming pass: for every source layout and every target layout, its
files are byte for byte those of `fp8q dequantize` followed by `fp8q quantize`. MXFP8 is byte for byte what
llm-compressor's `model_free_ptq(scheme="MXFP8")` writes; ue8m0 block scales are vLLM's
`per_block_cast_to_fp8(..., use_ue8m0=True)` (restated in tests/support/references.py from vllm/utils/deep_gemm.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8q import QuantizeOptions, quantize
from fp8q.cli import app
from fp8q.engine.api import convert, dequantize
from fp8q.errors import CheckpointError, UsageError
from fp8q.layouts import find
from fp8q.layouts.numerics import quantize as quantize_tensor
from fp8q.verification import verify
from tests.engine.test_resume import killed_after
from tests.support.factories import as_bytes, assert_same_tensors, load_all, tiny_llama, tiny_qwen3_moe
from tests.support.references import llmcompressor_quantize, vllm_per_block
from tests.support.runs import _peak_rss_kib

# name -> options: every layout fp8q writes.
LAYOUTS = {
    "ct-channel": {"scheme": "channel"},
    "ct-block": {"scheme": "block"},
    "ct-tensor": {"scheme": "tensor"},
    "ct-mx": {"scheme": "mx"},
    "fp8-tensor": {"scheme": "tensor", "format": "fp8"},
    "fp8-block": {"scheme": "block", "format": "fp8"},
    "fp8-block-ue8m0": {"scheme": "block", "format": "fp8", "scale_format": "ue8m0"},
}


def _options(name: str, **more: object) -> QuantizeOptions:
    return QuantizeOptions(device="cpu", load_check=False, **LAYOUTS[name], **more)  # type: ignore[arg-type]


def _files(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        # The manifest and the model card say which command made it (tests/output/test_model_card.py).
        if p.is_file() and p.name not in ("fp8q.json", "README.md")
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A bf16 dense model and a MoE (dims multiples of 32, for MXFP8), each in every layout fp8q writes."""
    torch.manual_seed(0)  # module fixtures come before the per-test seed: the same weights in any test order
    root = tmp_path_factory.mktemp("convert")
    models = {
        "dense": tiny_llama(root / "dense", hidden=128, intermediate=224),
        "moe": tiny_qwen3_moe(root / "moe", hidden=64, intermediate=96),
    }
    found = {}
    for model, src in models.items():
        found[f"{model}/bf16"] = src
        for name in LAYOUTS:
            quantize(src, root / f"{model}-{name}", _options(name))
            found[f"{model}/{name}"] = root / f"{model}-{name}"
    return found


PAIRS = [(s, t) for s in LAYOUTS for t in LAYOUTS if s != t]


@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_convert_equals_dequantize_then_quantize(sources, tmp_path, source, target):
    for model in ("dense", "moe") if target in ("ct-channel", "fp8-block") or source == "ct-mx" else ("dense",):
        fp8 = sources[f"{model}/{source}"]
        convert(fp8, tmp_path / f"{model}-converted", _options(target))
        dequantize(fp8, tmp_path / f"{model}-bf16")
        quantize(tmp_path / f"{model}-bf16", tmp_path / f"{model}-requantized", _options(target))
        assert _files(tmp_path / f"{model}-converted") == _files(tmp_path / f"{model}-requantized")
        manifest = json.loads((tmp_path / f"{model}-converted" / "fp8q.json").read_text())
        assert manifest["options"]["command"] == "convert" and manifest["options"]["dtype"] == "bfloat16"


def test_convert_dtype_option_and_llm_compressor_source(sources, tmp_path):
    llmcompressor = pytest.importorskip("llmcompressor")
    src = sources["dense/bf16"]
    llmcompressor.model_free_ptq(
        str(src), str(tmp_path / "llmc"), scheme="FP8_DYNAMIC", ignore=["lm_head", "model.embed_tokens"], device="cpu"
    )
    options = _options("fp8-block", dtype="float32")
    convert(tmp_path / "llmc", tmp_path / "converted", options)
    dequantize(tmp_path / "llmc", tmp_path / "f32", dtype="float32")
    quantize(tmp_path / "f32", tmp_path / "requantized", options)
    assert _files(tmp_path / "converted") == _files(tmp_path / "requantized")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["dtype"] == "float32"


def test_convert_refuses_a_no_op_and_static_scales(sources, tmp_path):
    with pytest.raises(UsageError, match="already compressed-tensors channel; nothing to convert"):
        convert(sources["dense/ct-channel"], tmp_path / "same", _options("ct-channel"))
    static = tmp_path / "static"
    static.mkdir()
    for p in sources["dense/ct-tensor"].iterdir():
        (static / p.name).write_bytes(p.read_bytes())
    from safetensors.torch import load_file, save_file

    index = json.loads((static / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(static / shard)
    tensors["model.layers.0.self_attn.q_proj.input_scale"] = torch.ones(1, dtype=torch.bfloat16)
    save_file(tensors, static / shard, metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.self_attn.q_proj.input_scale"] = shard
    (static / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="q_proj.input_scale .* is a static activation or KV-cache scale"):
        convert(static, tmp_path / "out", _options("fp8-block"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_convert_command_and_resume_after_kill(sources, tmp_path):
    fp8 = sources["dense/fp8-block"]
    result = CliRunner().invoke(app, ["convert", str(fp8), str(tmp_path / "ref"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    # Killed after one of its shards, then resumed: the same files, and the finished shard reused.
    killed_after(fp8, tmp_path / "out", 1, command="convert")
    report = convert(fp8, tmp_path / "out", QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == 1
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_convert_memory_does_not_grow_with_the_model(tmp_path):
    from tests.support.runs import _layers

    rss = {}
    for layers in (4, 16):
        src = _layers(tmp_path / f"src{layers}", layers, width=1024)
        quantize(src, tmp_path / f"fp8-{layers}", QuantizeOptions(device="cpu", scheme="block", format="fp8"))
        # The small model's peak is the highest of two runs: a short run under load may end before its buffer
        # pools have all filled (seen once in CI: 417 MiB against 485-501 in every other run), which would
        # make the bounded pools look like growth.
        runs = 2 if layers == 4 else 1
        rss[layers] = max(
            _peak_rss_kib(tmp_path / f"fp8-{layers}", tmp_path / f"out{layers}-{run}", command="convert") / 1024
            for run in range(runs)
        )
    # 12 more layers are 96 MiB more once dequantized; a run that held them would grow by that much. (Peak RSS
    # moves by a few tens of MiB from run to run with how malloc's per-thread arenas meet the temporaries.)
    assert rss[16] - rss[4] < 64, rss


# ── MXFP8 ──


def _mx_weight(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(shape) * 0.05
    w[0] *= 20
    w[1, :32] = 0  # an all-zero group
    w[2, :32] *= 1e-6  # a tiny group (float16: its scale underflows, compressed-tensors guards it with 1)
    w[3, 0], w[3, 1:32] = 1.75, 0.1  # amax whose mantissa is exactly 0.75: rounded up
    w[4, 0], w[4, 1:32] = 1.7421875, 0.1  # just below it: rounded down
    w[5, 0] = 448.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 64), (33, 96), (129, 256)])
def test_mx_matches_llmcompressor(shape, dtype):
    pytest.importorskip("llmcompressor")
    w = _mx_weight(shape, dtype)
    ref = llmcompressor_quantize({"layer.weight": w}, "MXFP8", [])
    q, s = quantize_tensor(w, find("mx", "compressed-tensors"))
    assert s.dtype == ref["layer.weight_scale"].dtype == torch.uint8 and s.shape == (shape[0], shape[1] // 32)
    assert torch.equal(s, ref["layer.weight_scale"])
    assert torch.equal(as_bytes(q), as_bytes(ref["layer.weight"]))


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_mx_checkpoint_matches_model_free_ptq(sources, tmp_path, model):
    llmcompressor = pytest.importorskip("llmcompressor")
    ignore = ["lm_head", "model.embed_tokens"] + (["re:.*mlp.gate$"] if model == "moe" else [])
    llmcompressor.model_free_ptq(str(sources[f"{model}/bf16"]), str(tmp_path / "ref"), scheme="MXFP8", ignore=ignore)
    assert_same_tensors(load_all(sources[f"{model}/ct-mx"]), load_all(tmp_path / "ref"))
    qc = json.loads((sources[f"{model}/ct-mx"] / "config.json").read_text())["quantization_config"]
    assert (
        qc["format"] == "mxfp8-quantized" and qc["config_groups"]["group_0"]["weights"]["scale_dtype"] == "torch.uint8"
    )
    assert verify(sources[f"{model}/ct-mx"], source=sources[f"{model}/bf16"]).ok


def test_mx_refuses_dims_not_in_groups_of_32(tmp_path):
    src = tiny_llama(tmp_path / "src")  # hidden 80
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--scheme", "mx"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "input size 80 is not a multiple of 32" in lines[0] and "--ignore" in lines[0]
    assert not (tmp_path / "out").exists()


def test_mx_loads_and_runs_in_transformers(sources):
    hf = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")

    def logits(path: Path, **kwargs: object) -> torch.Tensor:
        model = hf.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        with torch.no_grad():
            return model(torch.arange(3, 30).reshape(1, -1)).logits.float()

    base = logits(sources["dense/bf16"], dtype=torch.bfloat16)
    got = logits(sources["dense/ct-mx"], quantization_config=hf.CompressedTensorsConfig(dequantize=True))
    assert torch.nn.functional.cosine_similarity(got.flatten(), base.flatten(), dim=0).item() > 0.95


def test_mx_dequantizes_as_compressed_tensors_does(sources, tmp_path):
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale

    dequantize(sources["dense/ct-mx"], tmp_path / "bf16")
    fp8, back = load_all(sources["dense/ct-mx"]), load_all(tmp_path / "bf16")
    name = "model.layers.0.mlp.down_proj.weight"
    scale = decompress_mx_scale(fp8[f"{name}_scale"])  # compressed-tensors' own E8M0 decoding, bfloat16
    expected = (fp8[name].unflatten(-1, (-1, 32)).to(scale.dtype) * scale.unsqueeze(-1)).flatten(-2)
    assert torch.equal(back[name], expected.to(torch.bfloat16))


# ── ue8m0 ──


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 130), (256, 256), (1, 7), (129, 257)])
def test_ue8m0_matches_vllm(shape, dtype):
    torch.manual_seed(0)
    layout = find("block", "fp8", "ue8m0")
    for magnitude in (1e-3, 0.05, 3.0):
        w = torch.randn(shape) * magnitude
        if shape[0] > 128:
            w[128:256] *= 1e-4  # tiles under the 1e-4 amax floor
        w = w.to(dtype)
        q_ref, s_ref = vllm_per_block(w, use_ue8m0=True)
        q, s = quantize_tensor(w, layout)
        assert torch.equal(s, s_ref) and torch.equal(as_bytes(q), as_bytes(q_ref))
        mantissa, _ = torch.frexp(s)
        assert bool((mantissa == 0.5).all()), "every scale an exact power of two"


def test_ue8m0_at_powers_of_two_and_just_above():
    layout = find("block", "fp8", "ue8m0")
    for k in range(-20, 4):
        amax = torch.tensor(448.0 * 2.0**k)
        for _ in range(4):  # exactly 448 x 2^k, then a few float32 ulps above it
            w = torch.zeros(128, 128)
            w[0, 0], w[5, 7] = amax, -amax / 3
            q_ref, s_ref = vllm_per_block(w, use_ue8m0=True)
            q, s = quantize_tensor(w, layout)
            assert torch.equal(s, s_ref) and torch.equal(as_bytes(q), as_bytes(q_ref)), (k, float(amax))
            amax = torch.nextafter(amax, torch.tensor(float("inf")))


def test_ue8m0_checkpoint_config_verify_and_a_broken_scale(sources, tmp_path):
    out = sources["dense/fp8-block-ue8m0"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and qc["weight_block_size"] == [128, 128]
    report = verify(out, source=sources["dense/bf16"])
    assert report.ok and report.layouts == {"fp8 block 128x128 ue8m0": 14}
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in out.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    from safetensors.torch import load_file, save_file

    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.up_proj.weight_scale_inv"
    tensors = load_file(broken / index[name])
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, broken / index[name], metadata={"format": "pt"})
    problems = verify(broken).problems
    assert any(name in p and "not-a-power-of-two (ue8m0)" in p for p in problems), problems
