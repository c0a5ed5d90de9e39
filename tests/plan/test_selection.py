"""What the plan quantizes: nothing to quantize is refused, an FP8 input is pointed at the commands that read it,
an architecture fp8q does not know gets generic rules and a note, and the plan names lm_head once."""

from __future__ import annotations

import json

import pytest
import torch

from fp8q import QuantizeOptions, quantize
from tests.support.factories import write_shards
from tests.support.runs import CONFIG, _cli, _refused, _source


@pytest.mark.parametrize(
    "args",
    [["--targets", "nomatch"], ["--ignore", ".*"]],
    ids=["targets match nothing", "ignore everything"],
)
def test_nothing_to_quantize_is_refused(tmp_path, args):
    src = _source(tmp_path / "src")
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu", *args), "nothing to quantize")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_only_non_2d_linear_names_is_refused(tmp_path):
    tensors = {
        "a.q_proj.weight": torch.ones(16, dtype=torch.bfloat16),
        "a.k_proj.weight": torch.ones((), dtype=torch.bfloat16),
        "a.conv.weight": torch.ones(2, 2, 2, 2, dtype=torch.bfloat16),
    }
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=CONFIG)
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "nothing to quantize: none of its 0")
    assert not (tmp_path / "out").exists()


def test_an_fp8_input_points_at_verify_convert_and_dequantize(tmp_path):
    src = _source(tmp_path / "src")
    quantize(src, tmp_path / "fp8", QuantizeOptions(device="cpu"))
    for command in (["inspect", tmp_path / "fp8"], ["quantize", tmp_path / "fp8", tmp_path / "out"]):
        _refused(_cli(*command), "the input is already quantized; `fp8q verify` checks it, `fp8q convert` writes it")


def test_an_unknown_architecture_gets_a_note(tmp_path):
    from fp8q import plan_conversion

    src = _source(tmp_path / "src")
    (src / "config.json").write_text(json.dumps({**CONFIG, "model_type": "brand_new"}))
    notes = plan_conversion(src, QuantizeOptions()).notes
    assert any("model_type 'brand_new' is not in fp8q's architecture table: generic rules apply" in n for n in notes)


def test_the_plan_names_lm_head_once(tmp_path):
    from tests.support.factories import tiny_llama

    src = tiny_llama(tmp_path / "src")
    code, lines = _cli("inspect", src)
    assert code == 0 and sum("lm_head" in line for line in lines if line.startswith("│")) == 1, lines
