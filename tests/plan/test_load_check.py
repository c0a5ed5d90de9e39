"""The load check: an output its engines would refuse, misload or compute far from its source is refused before
anything is kept, or written with --no-load-check and a note, and the model card says what loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8q.cli import app
from fp8q.verification import verify
from tests.support.factories import write_shards
from tests.support.runs import CONFIG, _cli, _refused, _source


def _moe(tmp_path: Path) -> Path:
    from tests.support.factories import tiny_qwen3_moe

    return tiny_qwen3_moe(tmp_path / "moe", hidden=128, intermediate=128)


def test_layout_a_client_misloads_gets_a_note(tmp_path):
    src = _source(tmp_path / "src")
    code, lines = _cli(
        "quantize",
        src,
        tmp_path / "out",
        "--device",
        "cpu",
        "--scheme",
        "tensor",
        "--format",
        "fp8",
        "--base-model",
        "org/m",
    )
    assert code == 0
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and "transformers ignores its per-tensor weight_scale" in notes[0]


def test_per_tensor_compressed_tensors_on_a_moe_model_is_refused(tmp_path):
    src = _moe(tmp_path)
    args = ("--device", "cpu", "--scheme", "tensor")
    _refused(
        _cli("quantize", src, tmp_path / "out", *args),
        "--scheme tensor --format compressed-tensors on a MoE model: vLLM refuses it (its FP8 MoE method takes "
        "per-tensor weights only with static input scales",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    code, lines = _cli("quantize", src, tmp_path / "out", *args, "--no-load-check")
    assert code == 0 and any(
        line.startswith("note: written anyway (--no-load-check): --scheme tensor") for line in lines
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "vLLM and SGLang refuse this layout for this model" in card and "vllm serve" not in card
    # --format fp8 per-tensor is vLLM's own MoE layout: no problem.
    assert _cli("inspect", src, "--scheme", "tensor", "--format", "fp8")[0] == 0


def test_gpt_oss_is_refused_before_writing_and_its_card_says_why(tmp_path):
    E, H, I = 2, 64, 64  # noqa: E741 - square, as gpt-oss-20b's experts are
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": (torch.randn(E, H, 2 * I) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": (torch.randn(E, I, H) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.router.weight": torch.randn(E, H).to(torch.bfloat16),
    }
    config = {"model_type": "gpt_oss", "hidden_size": H}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=config)
    for scheme, fmt in (("channel", "compressed-tensors"), ("block", "fp8")):
        _refused(
            _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--scheme", scheme, "--format", fmt),
            "gpt_oss: no engine loads gpt-oss with FP8 experts as fp8q writes them",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--no-load-check")
    assert code == 0 and any("written anyway (--no-load-check): gpt_oss: no engine" in line for line in lines)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No engine loads this output: gpt_oss: no engine loads gpt-oss" in card and "vllm serve" not in card


@pytest.mark.parametrize("scheme,fmt", [("block", "compressed-tensors"), ("mx", "compressed-tensors")])
def test_a_moe_layout_transformers_cannot_load_is_said_in_the_note_and_the_card(tmp_path, scheme, fmt):
    src = _moe(tmp_path)
    args = ("--device", "cpu", "--scheme", scheme, "--format", fmt, "--no-load-check")  # tiny heads: no whole tiles
    code, lines = _cli("quantize", src, tmp_path / "out", *args)
    assert code == 0, lines
    notes = [line for line in lines if line.startswith("note: ")]
    assert any(f"--scheme {scheme} --format {fmt} on a MoE model: transformers 5.17 cannot load it" in n for n in notes)
    # What the run writes that vLLM refuses (block tiles it cannot split) is said, from the check that refuses it
    # without --no-load-check; no note says vLLM loads it.
    refused = _cli("inspect", src, "--scheme", scheme, "--format", fmt)[1]
    problems = [line.removeprefix("problem: ") for line in refused if line.startswith("problem: ")]
    written = [n.removeprefix("note: written anyway (--no-load-check): ") for n in notes if "written anyway" in n]
    assert [p.removesuffix(" (--no-load-check writes it anyway)") for p in problems] == written, (problems, notes)
    if written:
        assert not any("vLLM and SGLang load it" in n or "vLLM and SGLang can" in n for n in notes), notes
    card = (tmp_path / "out" / "README.md").read_text()
    assert "transformers cannot run this layout for a MoE model" in card and "from_pretrained" not in card


def test_weights_that_all_quantize_to_zero_are_refused_or_noted(tmp_path):
    """float32 weights too small for FP8 (1e-44: all become 0, relative error 1.0): what `verify --source` flags
    stops the run naming the tensor, as a client overflow does; --no-load-check writes it, with a note."""
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.full((64, 128), 1e-44, dtype=torch.float32),
        "model.layers.0.mlp.down_proj.weight": torch.randn(128, 64) * 0.05,
    }
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=CONFIG)
    _refused(
        _cli("quantize", src, tmp_path / "out", "--device", "cpu"),
        "tensor model.layers.0.mlp.up_proj.weight in model.safetensors: its FP8 form is far from it (relative error "
        "1.0000",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    result = CliRunner().invoke(
        app,
        ["quantize", str(src), str(tmp_path / "out"), "--device", "cpu", "--json", "--base-model", "org/m"]
        + ["--no-load-check"],
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "1 quantized weight(s) far from their source" in notes[0], notes
    assert "worst: model.layers.0.mlp.up_proj.weight (1.0000)" in notes[0]
    assert json.loads(result.stdout)["findings"] == [notes[0].removeprefix("note: ")]
    flagged = [p for p in verify(tmp_path / "out", source=src).problems if "far from the source" in p]
    assert len(flagged) == 1 and "model.layers.0.mlp.up_proj.weight" in flagged[0]


def test_a_weight_whose_client_overflows_is_refused_or_noted(tmp_path):
    w = torch.full((64, 128), 65500.0, dtype=torch.float16)  # scale 65500/448 rounds up: 448 x scale > 65504
    tensors = {"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.down_proj.weight": w.t().contiguous()}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=CONFIG)
    _refused(
        _cli("quantize", src, tmp_path / "out", "--device", "cpu"),
        "tensor model.layers.0.mlp.down_proj.weight in model.safetensors: its FP8 form overflows to inf in the float16",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # --format fp8: its clients compute in float32, no overflow.
    assert (
        _cli("quantize", src, tmp_path / "fp8", "--device", "cpu", "--scheme", "tensor", "--format", "fp8", "-q")[0]
        == 0
    )
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--no-load-check")
    assert code == 0, lines
    assert any(line.startswith("note: 2 quantized weight(s) overflow to inf") for line in lines), lines
    assert sum("overflow to inf" in p for p in verify(tmp_path / "out").problems) == 2
