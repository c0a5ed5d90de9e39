"""The index: shard names are plain file names of the folder, a tensor is in one shard, and a shard it does not
list is said."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fp8q.cli import app
from tests.support.factories import write_shards
from tests.support.runs import CONFIG, _cli, _refused, _source, _tree


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    w = torch.randn(32, 16, dtype=torch.bfloat16)
    src = write_shards(
        tmp_path / "src",
        {"a.safetensors": {"x.up_proj.weight": w}, "b.safetensors": {"x.up_proj.weight": w}},
        index=False,
        config=CONFIG,
    )
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x.up_proj.weight": "a.safetensors", "y": "b.safetensors"}})
    )
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, lines
    assert "b.safetensors: tensor x.up_proj.weight is also in a.safetensors" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "rename,expect",
    [
        ({"model-00002-of-00002.safetensors": "sub/model-00002-of-00002.safetensors"}, "is a path, not a file name"),
        ({"model-00001-of-00002.safetensors": "./model-00001-of-00002.safetensors"}, "is a path, not a file name"),
        (
            {
                "model-00001-of-00002.safetensors": "a/x.safetensors",
                "model-00002-of-00002.safetensors": "b/x.safetensors",
            },
            "is a path, not a file name",
        ),
        ({"model-00001-of-00002.safetensors": "m" * 300 + ".safetensors"}, "is longer than a file name can be"),
    ],
    ids=["subfolder", "dot slash", "one basename in two folders", "300 characters"],
)
def test_shard_names_that_are_paths_are_refused(tmp_path, rename, expect):
    src = _source(tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for old, new in rename.items():
        if "/" in new and len(new) < 255:
            (src / new).parent.mkdir(exist_ok=True)
            (src / old).rename(src / new)
        index["weight_map"] = {t: new if shard == old else shard for t, shard in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    before = _tree(tmp_path)
    for command in (["quantize", src, tmp_path / "out", "--device", "cpu"], ["inspect", src]):
        _refused(_cli(*command), f"model.safetensors.index.json: shard name '{next(iter(rename.values()))}'")
        _refused(_cli(*command), expect)
    assert _tree(tmp_path) == before
    # verify of such a folder reports it as a problem (no internal error), exit 1.
    code, lines = _cli("verify", src, "-q")
    assert code == 1 and len(lines) == 1 and expect in lines[0], lines


def test_unlisted_shard_is_said(tmp_path):
    src = _source(tmp_path / "src")
    save_file({"stray.weight": torch.ones(4)}, src / "model-extra.safetensors")
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu")
    assert code == 0
    assert any(
        line.startswith("note: ") and "model-extra.safetensors: not listed in model.safetensors.index.json" in line
        for line in lines
    ), lines
