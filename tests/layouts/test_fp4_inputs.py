"""FP4 checkpoints in: compressed-tensors MXFP4 and NVFP4 as llm-compressor's `model_free_ptq` writes them (its
MXFP4A16 and NVFP4A16 presets, on a tiny Llama whose dims are whole groups). `dequantize` gives the bits
compressed-tensors' own decompression gives under transformers; `convert` requantizes every weight and records,
weight by weight, whether each value came through bit for bit.

The exactness rule checked at the end (MXFP4 into 128x128 E4M3 tiles with power-of-two scales) is the one in
../shared/docs/FORMATS.md section 8: a tile whose largest group scale is 2^a holds a group of scale 2^(a-d) exactly
for every code when d <= 14; at 15 all but +-0.5 and +-1.5; at 16 only 0, 2, 4, 6; at 17 only 0 and 4; from 18 only 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fp8q import QuantizeOptions
from fp8q.engine.api import convert, dequantize
from fp8q.errors import CheckpointError
from fp8q.layouts import find, layouts
from fp8q.layouts.ct_mxfp4 import CtMxfp4
from fp8q.layouts.fp4 import E2M1_VALUES
from fp8q.layouts.numerics import error_sums
from fp8q.layouts.numerics import quantize as quantize_tensor
from fp8q.verification import verify
from tests.support.factories import load_all, modelopt_nvfp4, tiny_llama

SCHEMES = {"mxfp4": "MXFP4A16", "nvfp4": "NVFP4A16"}
KEPT = ["lm_head", "model.embed_tokens"]
LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def fp4(tmp_path_factory) -> dict[str, Path]:
    llmcompressor = pytest.importorskip("llmcompressor")
    root = tmp_path_factory.mktemp("fp4")
    made = {"bf16": tiny_llama(root / "bf16", hidden=128, intermediate=256, shard_kb=400)}
    for name, scheme in SCHEMES.items():
        llmcompressor.model_free_ptq(str(made["bf16"]), str(root / name), scheme=scheme, ignore=KEPT)
        made[name] = root / name
    return made


@pytest.fixture(scope="module")
def dequantized(fp4, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp4-bf16")
    return {name: _dequantize(fp4[name], root / name) for name in SCHEMES}


def _dequantize(src: Path, out: Path, dtype: str = "bfloat16") -> Path:
    dequantize(src, out, dtype=dtype)
    return out


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("name", SCHEMES)
def test_the_source_is_what_llm_compressor_writes(fp4, name):
    qc = _config(fp4[name])["quantization_config"]
    assert qc["format"] == f"{name}-pack-quantized"
    tensors = load_all(fp4[name])
    packed = tensors["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.uint8 and packed.shape == (128, 128)  # [out, in / 2]
    scale = tensors["model.layers.0.mlp.down_proj.weight_scale"]
    assert scale.dtype == (torch.uint8 if name == "mxfp4" else torch.float8_e4m3fn)
    assert ("model.layers.0.mlp.down_proj.weight_global_scale" in tensors) == (name == "nvfp4")


@pytest.mark.parametrize("name", SCHEMES)
def test_dequantize_gives_the_bits_compressed_tensors_gives_under_transformers(fp4, dequantized, name):
    """transformers' `CompressedTensorsConfig(dequantize=True)` (the `run_compressed=False` of older releases) runs
    compressed-tensors' own decompression of each Linear: its weights are the reference, bit for bit."""
    hf = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = hf.AutoModelForCausalLM.from_pretrained(
        fp4[name], quantization_config=hf.CompressedTensorsConfig(dequantize=True)
    )
    reference = model.state_dict()
    ours = load_all(dequantized[name])
    compared = [k for k in ours if k.endswith("proj.weight")]
    assert len(compared) == LINEARS
    for key in compared:
        assert reference[key].dtype == ours[key].dtype == torch.bfloat16, key
        assert torch.equal(reference[key].view(torch.int16), ours[key].view(torch.int16)), key


@pytest.mark.parametrize("name", SCHEMES)
def test_the_dequantized_model_is_a_plain_bf16_llama(fp4, dequantized, name):
    hf = pytest.importorskip("transformers")
    config = _config(dequantized[name])
    assert "quantization_config" not in config
    names = set(load_all(dequantized[name]))
    assert names == set(load_all(fp4["bf16"])), names ^ set(load_all(fp4["bf16"]))
    model, info = hf.AutoModelForCausalLM.from_pretrained(dequantized[name], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = model(torch.arange(3, 30).reshape(1, -1)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", SCHEMES)
def test_float32_output_is_the_product_before_its_last_rounding(fp4, dequantized, name, tmp_path):
    """--dtype float32: the float32 product the library rounds to bfloat16. MXFP4's is exact (a code has two
    significant bits, its scale one), so both agree; NVFP4's quotient scale has 24 bits, so some values differ."""
    wide = load_all(_dequantize(fp4[name], tmp_path / "f32", dtype="float32"))
    narrow = load_all(dequantized[name])
    rounded_differs = 0
    for key in (k for k in narrow if k.endswith("proj.weight")):
        assert wide[key].dtype == torch.float32
        assert torch.equal(wide[key].to(torch.bfloat16).view(torch.int16), narrow[key].view(torch.int16)), key
        rounded_differs += int((wide[key] != narrow[key].float()).sum())
    assert (rounded_differs == 0) == (name == "mxfp4")


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("target", [layout.name for layout in layouts()])
def test_convert_checks_every_value_of_every_weight(fp4, dequantized, name, target, tmp_path):
    """Into each FP8 layout fp8q writes: each weight's `exact` in fp8q.json is what its values say (an exact weight's
    FP8 values times their scales are the decoded source, bit for bit), and the summary counts them."""
    layout = next(layout for layout in layouts() if layout.name == target)
    options = QuantizeOptions(
        device="cpu", load_check=False, scheme=layout.scheme, format=layout.format, scale_format=layout.scale_format
    )
    report = convert(fp4[name], tmp_path / "out", options)
    stats = json.loads((tmp_path / "out" / "fp8q.json").read_text())["tensors"]
    assert len(stats) == LINEARS
    out, source = load_all(tmp_path / "out"), load_all(dequantized[name])
    for key, figures in stats.items():
        q, scale = out[key], out[f"{key}_scale_inv" if layout.scale_suffix.endswith("inv") else f"{key}_scale"]
        back = layout.dequantize(q, scale, torch.float64)
        differs = int((back != source[key].double()).sum())
        assert figures["inexact_values"] == differs and figures["exact"] == (differs == 0), key
    exact = sum(figures["exact"] for figures in stats.values())
    line = next(f for f in report.findings if f.startswith("exact:"))
    assert line.startswith(f"exact: {exact} of {LINEARS} weights came through bit for bit")
    if name == "mxfp4" and target in ("fp8-block-ue8m0", "ct-mx"):
        assert exact == LINEARS  # power-of-two scales on whole groups: every MXFP4 code fits E4M3
    if name == "nvfp4":
        assert exact < LINEARS and "within 2^" in line
    # verify compares with the decoded source: an exact weight's error is 0, the others' what fp8q.json says.
    checked = verify(tmp_path / "out", source=fp4[name])
    assert checked.ok and len(checked.rows) == LINEARS, checked.problems
    for row in checked.rows:
        assert (row.rel_error == 0) == stats[row.name]["exact"], row


def test_a_nan_e8m0_scale_is_refused_naming_the_tensor(fp4, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in fp4["mxfp4"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    name = "model.layers.1.self_attn.o_proj.weight_scale"
    shard = broken / json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][3, 1] = 255
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {name} in {shard.name} has 1 NaN \(byte 255\)"):
        dequantize(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ── when MXFP4 goes into E4M3 tiles exactly ──


def _rule(spread: int, code: float) -> bool:
    """FORMATS.md section 8: whether a code of a group 2^spread below its tile's largest group scale is exact."""
    allowed = {15: {0, 1, 2, 3, 4, 6}, 16: {0, 2, 4, 6}, 17: {0, 4}}
    return spread <= 14 or abs(code) in allowed.get(spread, {0})


@pytest.mark.parametrize("spread", [14, 15, 16, 17, 18])
def test_the_exactness_check_agrees_with_the_rule_at_each_group_scale_spread(spread):
    """One 128x128 tile: its first group holds a 6 at scale 2^a (the tile's largest), every other group one code at
    2^(a - spread). The check (the one a conversion runs) against the rule, code by code."""
    mx, target = CtMxfp4(), find("block", "fp8", "ue8m0")
    a = 127 + 3
    for nibble in range(16):
        code = float(E2M1_VALUES[nibble])
        packed = torch.full((128, 64), nibble | nibble << 4, dtype=torch.uint8)
        packed[0, 0] = 0x07  # 6 (low nibble) beside a 0
        scale = torch.full((128, 4), a - spread, dtype=torch.uint8)
        scale[0, 0] = a
        w = mx.dequantize(packed, scale, torch.bfloat16)
        q, s = quantize_tensor(w, target)
        inexact = int(error_sums(w, q, s, target, whole=True)[5])
        assert (inexact == 0) == _rule(spread, code), (spread, code, inexact)


# ── ModelOpt ──


def _modelopt_reference(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """FORMATS.md section 8 (from vLLM's quantization/modelopt.py): w = code * weight_scale * weight_scale_2, the
    low nibble first, taken left to right in float32 and rounded once to bfloat16. Written out here on its own."""
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    lut = torch.tensor(table + [-v for v in table])
    packed = tensors[f"{module}.weight"]
    codes = lut[torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()]
    scale = tensors[f"{module}.weight_scale"].float().repeat_interleave(16, dim=1)
    return (codes * scale * tensors[f"{module}.weight_scale_2"].float()).to(torch.bfloat16)


@pytest.mark.parametrize("beside", [True, False], ids=["hf_quant_config", "config"])
def test_modelopt_nvfp4_dequantizes_to_a_plain_bf16_llama(fp4, tmp_path, beside):
    hf = pytest.importorskip("transformers")
    src = modelopt_nvfp4(fp4["nvfp4"], tmp_path / "modelopt", beside=beside)
    out = _dequantize(src, tmp_path / "bf16")
    assert not (out / "hf_quant_config.json").exists()  # engines would read the bf16 output as ModelOpt's
    assert "quantization_config" not in _config(out)
    source, ours = load_all(src), load_all(out)
    compared = [k for k in ours if k.endswith("proj.weight")]
    assert len(compared) == LINEARS
    for key in compared:
        expected = _modelopt_reference(source, key.removesuffix(".weight"))
        assert torch.equal(ours[key].view(torch.int16), expected.view(torch.int16)), key
    _, info = hf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_modelopt_nvfp4_converts_with_its_fp4_activation_scales_left_behind(fp4, tmp_path):
    """Its `input_scale`s are for FP4 activations, nothing an FP8 layer could use: converting drops them (where an
    FP8 checkpoint's calibrated ones are refused), and every weight is checked."""
    src = modelopt_nvfp4(fp4["nvfp4"], tmp_path / "modelopt", beside=True)
    report = convert(src, tmp_path / "out", QuantizeOptions(device="cpu", scheme="block", format="fp8"))
    assert not any(k.endswith("input_scale") for k in load_all(tmp_path / "out"))
    assert any(f.startswith(f"exact: 0 of {LINEARS} weights") for f in report.findings), report.findings
    assert verify(tmp_path / "out", source=src).ok


def _modelopt_fp8(bf16: Path, out: Path, algo: str) -> Path:
    """ModelOpt FP8 from the spec: `weight` F8_E4M3 with `weight_scale` F32 [] (FP8) or [out/128, in/128] (FP8_PB_WO,
    weights only), `input_scale` F32 [] for FP8 only."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in bf16.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
            continue
        tensors = {}
        for key, value in load_file(f).items():
            if not key.endswith("proj.weight"):
                tensors[key] = value
                continue
            layout = find("tensor", "fp8") if algo == "FP8" else find("block", "fp8")
            q, scale = quantize_tensor(value, layout)
            module = key.removesuffix(".weight")
            tensors.update({key: q, f"{module}.weight_scale": scale.reshape(() if algo == "FP8" else scale.shape)})
            if algo == "FP8":
                tensors[f"{module}.input_scale"] = torch.tensor(0.05)
        save_file(tensors, out / f.name, metadata={"format": "pt"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = {}
    for f in out.glob("*.safetensors"):
        weight_map.update(dict.fromkeys(_names(f), f.name))
    (out / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    config = _config(out)
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": algo, "exclude_modules": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def _names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("algo", ["FP8", "FP8_PB_WO"])
def test_modelopt_fp8_dequantizes_as_w_times_its_scale(fp4, tmp_path, algo):
    src = _modelopt_fp8(fp4["bf16"], tmp_path / "modelopt", algo)
    out = load_all(_dequantize(src, tmp_path / "bf16"))
    source = load_all(src)
    layout = find("tensor", "fp8") if algo == "FP8" else find("block", "fp8")
    for key in (k for k in out if k.endswith("proj.weight")):
        expected = layout.dequantize(source[key], source[key.replace("weight", "weight_scale")], torch.bfloat16)
        assert torch.equal(out[key].view(torch.int16), expected.view(torch.int16)), key
    if algo == "FP8":  # calibrated FP8 activation scales: converting would drop them, so it is refused
        with pytest.raises(CheckpointError, match="input_scale"):
            convert(src, tmp_path / "out", QuantizeOptions(device="cpu"))


def test_inspect_names_the_input_format_and_what_each_target_keeps(fp4):
    """Before any weight is read: the source's format and, per target layout, whether it can come through exactly
    (MXFP4 into MXFP8 always; into power-of-two 128x128 tiles within a group-scale spread of 2^14)."""
    from typer.testing import CliRunner

    from fp8q.cli import app

    def outlook(name: str, *options: str) -> dict:
        result = CliRunner().invoke(app, ["inspect", str(fp4[name]), *options, "--json", "-q"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["source_layouts"]

    mx = outlook("mxfp4", "--scheme", "mx")["compressed-tensors mxfp4-pack-quantized"]
    assert mx["weights"] == LINEARS and mx["exact"].startswith("exact: every MXFP4 group fits")
    tiles = outlook("mxfp4", "--scheme", "block", "--format", "fp8", "--scale-format", "ue8m0")
    assert "within 2^14" in tiles["compressed-tensors mxfp4-pack-quantized"]["exact"]
    nv = outlook("nvfp4", "--scheme", "block", "--format", "fp8")["compressed-tensors nvfp4-pack-quantized"]
    assert nv["exact"].startswith("not exact in general")


def test_a_layout_fp8q_does_not_read_is_named(fp4, tmp_path):
    """INT4 `pack-quantized` (Kimi-K2.5's experts, llm-compressor's W4A16): one line naming the group and its format,
    not "no FP8 tensors"."""
    llmcompressor = pytest.importorskip("llmcompressor")
    llmcompressor.model_free_ptq(str(fp4["bf16"]), str(tmp_path / "int4"), scheme="W4A16", ignore=KEPT)
    with pytest.raises(CheckpointError, match=r"group W4A16 \(pack-quantized, 4-bit int\) is a layout fp8q does not"):
        dequantize(tmp_path / "int4", tmp_path / "out")


# ── no special path: the Hub, --resume ──


def test_an_fp4_repo_streams_from_the_hub_and_a_stopped_run_resumes(fp4, tmp_path):
    """convert of an NVFP4 repo not in the cache: planned from headers, each shard downloaded, converted, deleted;
    a run stopped after its first shard (SIGTERM) resumes to the very bytes of a local conversion."""
    from tests.engine.test_resume import _hashes
    from tests.source.test_hub_stream import _fp8q
    from tests.support.hub_server import HubServer

    repos = tmp_path / "repos"
    (repos / "org").mkdir(parents=True)
    (repos / "org" / "nvfp4").symlink_to(fp4["nvfp4"], target_is_directory=True)
    convert(fp4["nvfp4"], tmp_path / "local", QuantizeOptions(device="cpu", scheme="block", format="fp8"))
    server = HubServer(repos)
    try:
        args = ("convert", "org/nvfp4", str(tmp_path / "out"), "--scheme", "block", "--format", "fp8")
        stopped = _fp8q(tmp_path, server, *args, "-q", stop_after="1:TERM")
        assert stopped.returncode == 143, stopped.stderr
        assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()
        resumed = _fp8q(tmp_path, server, *args, "--resume", "-q")
        assert resumed.returncode == 0, resumed.stderr
    finally:
        server.close()
    assert _hashes(tmp_path / "out") == _hashes(tmp_path / "local")
    stats = json.loads((tmp_path / "out" / "fp8q.json").read_text())["tensors"]
    assert len(stats) == LINEARS and all("exact" in s for s in stats.values())


def test_torchrun_converts_an_fp4_checkpoint_as_one_process_does(fp4, tmp_path):
    """Two CPU processes (gloo) share the shards of an MXFP4 conversion: the very files, and the very fp8q.json but
    its timings, exactness included, of one process's."""
    import os
    import subprocess
    import sys

    from tests.engine.test_distributed import ROOT, _free_port, _manifest_without_timings
    from tests.engine.test_resume import _hashes

    options = ("--scheme", "block", "--format", "fp8", "--scale-format", "ue8m0", "--device", "cpu")
    single, multi = tmp_path / "single" / "out", tmp_path / "multi" / "out"  # one name: the card names OUT
    convert(fp4["mxfp4"], single, QuantizeOptions(device="cpu", scheme="block", format="fp8", scale_format="ue8m0"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "fp8q", "convert", str(fp4["mxfp4"]), str(multi), *options,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _hashes(multi, card=True) == _hashes(single, card=True)
    assert _manifest_without_timings(multi) == _manifest_without_timings(single)
    ranks = {s["rank"] for s in json.loads((multi / "fp8q.json").read_text())["timings"]["shards"].values()}
    assert ranks == {0, 1}
