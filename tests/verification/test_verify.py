"""`fp8q.verification` on real files: it passes every layout fp8q writes, llm-compressor's output and a DeepSeek-style
release, and names the tensor when a scale is corrupt or missing, a targeted weight stayed bf16, or (with the
source) a weight's values are wrong."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8q import QuantizeOptions, quantize
from fp8q.errors import CheckpointError
from fp8q.verification import TensorCheck, verify
from fp8q.verification.values import _flag_outliers
from tests.support.factories import load_all, tiny_llama, write_shards
from tests.support.references import vllm_per_block

pytest.importorskip("transformers")

# id -> (scheme, format, what verify calls the layout)
LAYOUTS = {
    "ct-channel": ("channel", "compressed-tensors", "compressed-tensors channel"),
    "ct-block": ("block", "compressed-tensors", "compressed-tensors block 128x128"),
    "ct-tensor": ("tensor", "compressed-tensors", "compressed-tensors tensor"),
    "fp8-tensor": ("tensor", "fp8", "fp8 tensor"),
    "fp8-block": ("block", "fp8", "fp8 block 128x128"),
}
N_LINEAR = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head is kept
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    found = {"src": tiny_llama(root / "src")}
    for key, (scheme, fmt, _) in LAYOUTS.items():
        found[key] = root / key
        quantize(found["src"], found[key], QuantizeOptions(scheme=scheme, format=fmt, device="cpu", load_check=False))
    return found


def deepseek_style(folder: Path) -> tuple[Path, Path]:
    """A bf16 source and its FP8 release the way DeepSeek-V3 ships one: `weight_scale_inv` F32 128x128 tiles
    (dims not multiples of 128, so edge tiles), `quant_method: fp8` with no ignored_layers, and the embedding,
    norms, MoE router and lm_head left bf16 with no scale. One expert's scale sits in the other shard."""
    torch.manual_seed(1)
    hidden, inter, vocab = 80, 200, 320

    def w(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols) * 0.05).to(torch.bfloat16)

    layer = "model.layers.0"
    linear = {
        f"{layer}.self_attn.q_a_proj.weight": w(48, hidden),
        f"{layer}.self_attn.kv_a_proj_with_mqa.weight": w(40, hidden),
        f"{layer}.self_attn.o_proj.weight": w(hidden, 160),
        f"{layer}.mlp.shared_experts.down_proj.weight": w(hidden, inter),
        **{f"{layer}.mlp.experts.{e}.up_proj.weight": w(inter, hidden) for e in range(2)},
    }
    plain = {
        "model.embed_tokens.weight": w(vocab, hidden),
        f"{layer}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{layer}.mlp.gate.weight": w(2, hidden),
        f"{layer}.mlp.gate.e_score_correction_bias": torch.zeros(2),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": w(vocab, hidden),
    }
    names = sorted([*linear, *plain])
    first = set(names[: len(names) // 2])
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16"}
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    source = {shard: {} for shard in shards}
    fp8 = {shard: {} for shard in shards}
    for name in names:
        shard = shards[0] if name in first else shards[1]
        tensor = linear.get(name, plain.get(name))
        source[shard][name] = tensor
        if name in linear:
            q, s = vllm_per_block(tensor)
            fp8[shard][name] = q
            moved = name.endswith("experts.0.up_proj.weight")
            fp8[shards[1 - shards.index(shard)] if moved else shard][f"{name}_scale_inv"] = s.contiguous()
        else:
            fp8[shard][name] = tensor
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    src = write_shards(folder / "src", source, config=config)
    out = write_shards(folder / "fp8", fp8, config={**config, "quantization_config": quant})
    return src, out


def edit(folder: Path, name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the shard holding `name` after `change` edits its tensors in place, and update the index."""
    index = json.loads((folder / INDEX).read_text())
    shard = index["weight_map"][name]
    with safe_open(folder / shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    weight_map = {k: v for k, v in index["weight_map"].items() if v != shard}
    weight_map.update(dict.fromkeys(tensors, shard))
    (folder / INDEX).write_text(json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))
    relist(folder)


def relist(folder: Path) -> None:
    """fp8q.json lists every file with its sha256 as it is now: the output as a tool that wrote these very bytes
    would list it, so that what verify finds is the values' problem alone (the files' own check: below)."""
    manifest = json.loads((folder / "fp8q.json").read_text())
    manifest["files"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (folder / "fp8q.json").write_text(json.dumps(manifest))


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def scale_name(layout: str, module: str) -> str:
    return f"{module}.weight_scale_inv" if layout == "fp8-block" else f"{module}.weight_scale"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8q_outputs_pass(outputs, layout):
    report = verify(outputs[layout])
    assert report.ok, report.problems
    assert report.layouts == {LAYOUTS[layout][2]: N_LINEAR}
    assert report.format == LAYOUTS[layout][1] and report.tensors_checked == N_LINEAR
    assert all(0 < r.scale_min <= r.scale_max for r in report.rows)

    report = verify(outputs[layout], outputs["src"])
    assert report.ok, report.problems
    errors = [r.rel_error for r in report.rows]
    assert errors == sorted(errors, reverse=True), "rows are sorted worst first"
    assert all(0 < e < 0.05 for e in errors)
    assert all(r.snr_db > 25 and r.max_abs_error > 0 and r.flagged is None for r in report.rows)


def test_llm_compressor_output_passes(outputs, tmp_path):
    llmcompressor = pytest.importorskip("llmcompressor")
    out = tmp_path / "llmc"
    llmcompressor.model_free_ptq(
        str(outputs["src"]), str(out), scheme="FP8_DYNAMIC", ignore=["lm_head", "model.embed_tokens"], device="cpu"
    )
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        assert not f.metadata()  # llm-compressor writes shards without metadata
    report = verify(out, outputs["src"])
    assert report.ok, report.problems
    assert report.layouts == {"compressed-tensors channel": N_LINEAR}


def test_deepseek_style_release_passes(tmp_path):
    src, out = deepseek_style(tmp_path)
    report = verify(out, src)
    assert report.ok, report.problems
    assert report.layouts == {"fp8 block 128x128": 6} and report.format == "fp8"
    assert all(r.rel_error < 0.05 for r in report.rows)


@pytest.mark.parametrize(
    ("layout", "value", "word"),
    [("ct-channel", math.nan, "NaN"), ("fp8-block", 0.0, "zero"), ("fp8-tensor", -1.0, "negative")],
)
def test_corrupt_scale_is_named(outputs, tmp_path, layout, value, word):
    out = copy(outputs[layout], tmp_path)
    name = scale_name(layout, "model.layers.1.self_attn.v_proj")

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    edit(out, name, corrupt)
    for report in (verify(out), verify(out, outputs["src"])):
        assert len(report.problems) == 1, report.problems
        assert name in report.problems[0] and word in report.problems[0]


@pytest.mark.parametrize("layout", ["ct-block", "fp8-block", "fp8-tensor"])
def test_missing_scale_is_named(outputs, tmp_path, layout):
    out = copy(outputs[layout], tmp_path)
    module = "model.layers.1.mlp.down_proj"
    edit(out, scale_name(layout, module), lambda tensors: tensors.pop(scale_name(layout, module)))
    report = verify(out)
    assert len(report.problems) == 1, report.problems
    assert f"{module}.weight " in report.problems[0] and "no scale" in report.problems[0]
    assert report.tensors_checked == N_LINEAR - 1


@pytest.mark.parametrize("layout", ["ct-channel", "fp8-tensor"])
def test_weight_left_in_bf16_is_named(outputs, tmp_path, layout):
    out = copy(outputs[layout], tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    original = load_all(outputs["src"])[name]

    def unquantize(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = original
        del tensors[scale_name(layout, name.removesuffix(".weight"))]

    edit(out, name, unquantize)
    report = verify(out, outputs["src"])
    assert len(report.problems) == 2, report.problems
    assert name in report.problems[0] and "targets" in report.problems[0]
    # ...and q/k/v, which vLLM loads as one layer, are now half quantized.
    assert report.problems[1] == (
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}: k_proj, v_proj FP8 but q_proj not; vLLM loads them as "
        "one layer and refuses it half quantized"
    )


def test_altered_weight_is_flagged_against_source(outputs, tmp_path):
    out = copy(outputs["ct-channel"], tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"

    def scramble(tensors: dict[str, torch.Tensor]) -> None:
        raw = tensors[name].view(torch.uint8).clone()
        raw[: raw.shape[0] // 2] ^= 0x80  # flip the sign of the first half of the rows
        tensors[name] = raw.view(torch.float8_e4m3fn)

    edit(out, name, scramble)
    assert verify(out).ok  # nothing wrong in the files themselves
    report = verify(out, outputs["src"])
    assert len(report.problems) == 1, report.problems
    assert name in report.problems[0] and "far from the source" in report.problems[0]
    assert report.rows[0].name == name and report.rows[0].rel_error > 1


def test_outlier_far_above_the_median_is_flagged():
    rows = [TensorCheck(f"t{i}", "fp8 tensor", (8, 8), 1.0, 1.0, 0.02, 0.1, 34.0) for i in range(5)]
    rows.append(TensorCheck("odd", "fp8 tensor", (8, 8), 1.0, 1.0, 0.08, 0.5, 22.0))
    flagged = {r.name: r.flagged for r in _flag_outliers(rows)}
    assert flagged.pop("odd") and not any(flagged.values())


def test_not_an_fp8_checkpoint(outputs, tmp_path):
    report = verify(outputs["src"])
    assert report.problems == [f"{outputs['src']}: no FP8 weights; this is not an FP8 checkpoint"]
    with pytest.raises(CheckpointError, match="no such file"):
        verify(tmp_path / "nowhere")


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("layout", "change", "expect"),
    [
        ("fp8-tensor", lambda qc: qc.pop("activation_scheme"), "activation_scheme is None; vLLM needs"),
        ("fp8-block", lambda qc: qc.update(weight_block_size=[128]), "weight_block_size [128] must be two positive"),
        ("fp8-block", lambda qc: qc.update(activation_scheme="static"), "needs activation_scheme 'dynamic' with"),
        (
            "ct-channel",
            lambda qc: qc["config_groups"]["group_0"]["weights"].update(bogus=1),
            "compressed-tensors refuses",
        ),
    ],
)
def test_config_problems_are_named(outputs, tmp_path, layout, change, expect):
    out = copy(outputs[layout], tmp_path)
    _edit_config(out, change)
    report = verify(out)
    assert any(str(out / "config.json") in p and expect in p for p in report.problems), report.problems


def test_config_missing_or_without_quantization_config(outputs, tmp_path):
    out = copy(outputs["ct-channel"], tmp_path)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    assert any("no quantization_config" in p for p in verify(out).problems)
    (out / "config.json").unlink()
    assert any("config.json: missing" in p for p in verify(out).problems)


def test_source_mismatches_are_named(outputs, tmp_path):
    out = copy(outputs["ct-channel"], tmp_path)
    src = copy(outputs["src"], tmp_path / "source")
    # In the output: a kept tensor changes dtype, a tensor the source lacks appears, one goes missing.
    edit(out, "model.norm.weight", lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()}))
    edit(out, "model.norm.weight", lambda t: t.update({"model.extra.bias": torch.zeros(3)}))
    edit(out, "model.layers.0.input_layernorm.weight", lambda t: t.pop("model.layers.0.input_layernorm.weight"))
    problems = verify(out, src).problems
    assert any("tensor model.norm.weight in" in p and "is F32, the source BF16" in p for p in problems), problems
    assert any("tensor model.extra.bias in" in p and "is not in the source" in p for p in problems), problems
    assert any("tensor model.layers.0.input_layernorm.weight of the source" in p and "missing" in p for p in problems)
    assert len(problems) == 3, problems


def _flip_one_fp8_value(folder: Path, tensor: str) -> str:
    """One bit of one FP8 value of `tensor` flipped in place (192 = 0x74 becomes 0.75 = 0x34, else the first value's
    bit 6), header and size unchanged; returns the shard's name."""
    index = json.loads((folder / INDEX).read_text())
    shard = index["weight_map"][tensor]
    with open(folder / shard, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    start = 8 + header_len + header[tensor]["data_offsets"][0]
    data = bytearray((folder / shard).read_bytes())
    end = 8 + header_len + header[tensor]["data_offsets"][1]
    at = data.find(0x74, start, end)
    at = start if at < 0 else at
    data[at] ^= 0x40
    (folder / shard).write_bytes(bytes(data))
    return shard


def test_one_flipped_bit_in_an_fp8_value_is_named_with_and_without_the_source(outputs, tmp_path):
    """The value is still a valid FP8 number with a valid scale: only fp8q.json's sha256 tells. The shard is named."""
    out = copy(outputs["ct-channel"], tmp_path)
    shard = _flip_one_fp8_value(out, "model.layers.1.mlp.down_proj.weight")
    for report in (verify(out), verify(out, outputs["src"])):
        assert not report.ok
        assert report.problems[0].startswith(f"{shard}: its sha256 is "), report.problems
        assert "changed after fp8q wrote it" in report.problems[0]


def test_a_file_the_output_lacks_is_a_problem_and_an_extra_one_a_note(outputs, tmp_path):
    out = copy(outputs["ct-channel"], tmp_path)
    listed = json.loads((out / "fp8q.json").read_text())["files"]
    report = verify(out)
    assert report.ok and report.files_checked == len(listed) and report.notes == [], report.problems
    (out / "tokenizer.json").unlink()
    (out / "evals.json").write_text("{}")
    report = verify(out)
    assert report.problems == [
        "tokenizer.json: listed in fp8q.json but not in the output; it is incomplete: restore the file, or make the "
        "output again"
    ]
    assert report.notes == ["evals.json: not listed in fp8q.json (added after fp8q wrote the output)"]


def test_a_changed_config_is_named_by_its_hash(outputs, tmp_path):
    out = copy(outputs["fp8-block"], tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 1  # any edit: verify's config rules would let this one pass
    (out / "config.json").write_text(json.dumps(config))
    assert [p.split(":")[0] for p in verify(out).problems] == ["config.json"]


def test_the_cli_names_the_changed_file(outputs, tmp_path):
    import subprocess
    import sys

    out = copy(outputs["ct-channel"], tmp_path)
    shard = _flip_one_fp8_value(out, "model.layers.0.self_attn.q_proj.weight")
    result = subprocess.run([sys.executable, "-m", "fp8q", "verify", str(out)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{shard}: its sha256 is" in result.stderr.strip().splitlines()[-1], result.stderr


def test_a_wrong_source_is_summarized_not_listed_line_by_line(outputs, tmp_path):
    import subprocess
    import sys

    other = tiny_llama(tmp_path / "other", hidden=96, intermediate=160)  # another model: every shape differs
    problems = verify(outputs["ct-channel"], other).problems
    assert len(problems) > 10
    cmd = [sys.executable, "-m", "fp8q", "verify", str(outputs["ct-channel"]), "--source", str(other), "--top", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    listed = [line for line in result.stderr.splitlines() if line.startswith("problem: ")]
    assert listed[:10] == [f"problem: {p}" for p in problems[:10]], result.stderr
    rest = f"problem: ... and {len(problems) - 10} more ({len(problems)} in all; --json lists every one)"
    assert listed[10:] == [rest]
    assert result.returncode == 1


def _float64_errors(out: Path, src: Path) -> dict[str, tuple[float, float]]:
    """Each weight's relative error and SNR, computed here in float64 from the written bytes (compressed-tensors
    channel: the client multiplies in the scale's dtype, bfloat16)."""
    got, want = load_all(out), load_all(src)
    errors = {}
    for name, q in got.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        scale = got[name.removesuffix("weight") + "weight_scale"]
        deq = (q.double() * scale.double()).to(scale.dtype).double()
        diff_sq = float((deq - want[name].double()).square().sum())
        ref_sq = float(want[name].double().square().sum())
        errors[name] = math.sqrt(diff_sq / ref_sq), 10 * math.log10(ref_sq / diff_sq)
    return errors


@pytest.mark.parametrize("power", [0, -70, 60], ids=["usual", "tiny", "huge"])
def test_value_figures_are_float64_s_with_any_number_of_workers(tmp_path, power):
    """verify computes in float32 where that gives the client's values exactly, and sums bands in float32; a weight
    whose squares float32 cannot sum well (below 2^-60 or above 2^100 a band: weights scaled by 2^-70 or 2^60) is
    summed in float64. Every figure agrees with float64's to 1e-5, and is the same with 1 or 3 workers."""
    src = tiny_llama(tmp_path / "base", hidden=256, intermediate=512)
    tensors = {k: (v * 2.0**power if v.dim() == 2 else v) for k, v in load_all(src).items()}
    scaled = write_shards(
        tmp_path / "src", {"model.safetensors": tensors}, config=json.loads((src / "config.json").read_text())
    )
    out = tmp_path / "out"
    quantize(scaled, out, QuantizeOptions(device="cpu", load_check=False))
    one, three = verify(out, scaled, workers=1), verify(out, scaled, workers=3)
    assert one.ok and one.rows == three.rows and len(one.rows) == N_LINEAR
    expected = _float64_errors(out, scaled)
    for row in one.rows:
        rel, snr = expected[row.name]
        assert row.rel_error == pytest.approx(rel, rel=1e-5) and row.snr_db == pytest.approx(snr, rel=1e-5)
        assert 0.01 < rel < 0.05  # the same quantization error at every magnitude (scales scale by powers of two)
