"""The output's README.md is a model card for what was made: front matter huggingface_hub parses, figures equal to
fp8q.json's, a command that makes the same bytes again, the source's card kept below; for quantize, convert and
dequantize alike. `--no-model-card` copies the source's card unchanged."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from fp8q import QuantizeOptions, quantize
from fp8q.cli import app
from fp8q.engine.api import convert, dequantize
from fp8q.output.model_card import error_summary
from tests.engine.test_resume import _big_source, killed_after
from tests.support.factories import as_bytes, load_all, tiny_llama
from tests.support.runs import _cli, _source

SOURCE_CARD = """---
license: other
license_name: tiny-license
license_link: LICENSE
library_name: transformers
language:
- en
- fr
pipeline_tag: text-generation
tags:
- chat
---
# Tiny chat

A tiny model for tests. It says hello.
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tiny_llama(tmp_path_factory.mktemp("card") / "tiny-chat")
    (src / "README.md").write_text(SOURCE_CARD)
    return src


def _card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def _table(text: str, key: str) -> str:
    """The value of a `| key | value |` row."""
    match = re.search(rf"^\| {re.escape(key)} \| (.*) \|$", text, re.MULTILINE)
    assert match, key
    return match.group(1)


def _made_with(text: str) -> list[str]:
    match = re.search(r"## Made with\n\n```sh\n(.*)\n```", text)
    assert match
    return shlex.split(match.group(1))


def test_quantize_card(source, tmp_path):
    out = tmp_path / "tiny-chat-FP8"
    report = quantize(source, out, QuantizeOptions(device="cpu", ignore=("down_proj",), base_model="org/tiny-chat"))
    card = _card(out)
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-chat" and data["base_model_relation"] == "quantized"
    assert not any("base_model" in note for note in report.findings)  # the user said it
    assert {"fp8", "compressed-tensors", "fp8-channel"} <= set(data["tags"])
    # What still holds for the weights comes along; the source's own tags describe the source.
    for key in ("license", "license_name", "license_link", "library_name", "language", "pipeline_tag"):
        assert data[key] == ModelCard(SOURCE_CARD).data.to_dict()[key], key
    assert "chat" not in data["tags"]

    manifest = json.loads((out / "fp8q.json").read_text())
    text = card.text
    assert int(_table(text, "weights quantized")) == report.tensors_quantized == len(manifest["tensors"])
    summary = error_summary(manifest["tensors"])
    rows = re.findall(r"^\| (\d+) \| (\S+) \| (\S+) \| (\S+) \| `(\S+)` \| (\S+) \|$", text, re.MULTILINE)
    assert rows == [
        (
            str(summary["weights"]),
            f"{summary['median_rel_error']:.4e}",
            f"{summary['mean_rel_error']:.4e}",
            f"{summary['worst_rel_error']:.4e}",
            summary["worst_tensor"],
            f"{summary['max_abs_error']:.4e}",
        )
    ]
    assert 0 < summary["median_rel_error"] < 0.1
    assert "`lm_head`" in _table(text, "modules kept in high precision")
    assert "down_proj" in _table(text, "modules kept in high precision")
    assert "vllm serve tiny-chat-FP8" in text and "compressed-tensors` package" in text

    # The source's card follows, once, without its front matter; the whole file has one front matter.
    readme = (out / "README.md").read_text()
    assert readme.count("license_name") == 1
    assert readme.rstrip().endswith("# Tiny chat\n\nA tiny model for tests. It says hello.")
    # fp8q.json hashes the card like every other file.
    assert manifest["files"]["README.md"] == hashlib.sha256(readme.encode()).hexdigest()


def test_command_in_card_makes_the_same_bytes(source, tmp_path):
    """The card's command, with its SRC and OUT names pointed at real folders, writes the same checkpoint."""
    out = tmp_path / "first"
    quantize(source, out, QuantizeOptions(device="cpu", scheme="block", load_check=False, ignore=(r"\.(q|k|v)_proj$",)))
    args = _made_with(_card(out).text)
    assert args[:4] == ["fp8q", "quantize", "tiny-chat", "first"]
    assert "--block-size" in args and "--ignore" in args
    again = tmp_path / "again"
    # --no-load-check is not an output option: the first run's choice to write unloadable layers anyway.
    result = CliRunner().invoke(app, [*args[1:2], str(source), str(again), *args[4:], "--no-load-check", "-q"])
    assert result.exit_code == 0, result.output
    first, second = load_all(out), load_all(again)
    assert first.keys() == second.keys()
    for name in first:
        assert as_bytes(first[name]).equal(as_bytes(second[name])), name
    assert (out / "config.json").read_bytes() == (again / "config.json").read_bytes()


def test_convert_and_dequantize_cards(source, tmp_path):
    fp8 = tmp_path / "tiny-chat-block"
    quantize(source, fp8, QuantizeOptions(device="cpu", scheme="block", format="fp8", load_check=False))
    converted = tmp_path / "tiny-chat-channel"
    convert(fp8, converted, QuantizeOptions(device="cpu", scheme="channel"))
    card = _card(converted)
    data = card.data.to_dict()
    # A local folder that names no Hub id: no base_model (never the folder's name).
    assert "base_model" not in data and "base_model_relation" not in data
    assert "fp8-channel" in data["tags"]
    assert _table(card.text, "source layout") == "fp8 block 128x128"
    manifest = json.loads((converted / "fp8q.json").read_text())
    assert int(_table(card.text, "weights quantized")) == len(manifest["tensors"])
    assert _made_with(card.text)[:4] == ["fp8q", "convert", "tiny-chat-block", "tiny-chat-channel"]
    # The FP8 source's card is the one kept below: it names the model it came from.
    assert "## The original model card (tiny-chat-block)" in card.text and "A tiny model for tests" in card.text

    plain = tmp_path / "tiny-chat-bf16"
    dequantize(fp8, plain, dtype="float32", base_model="org/tiny-chat-block")
    card = _card(plain)
    data = card.data.to_dict()
    # The Hub has no word for "dequantized from": no relation rather than a wrong one.
    assert data["base_model"] == "org/tiny-chat-block" and "base_model_relation" not in data
    assert "dequantized" in data["tags"] and "fp8" not in data["tags"]
    assert data["license"] == "other"
    quantized = len(json.loads((fp8 / "fp8q.json").read_text())["tensors"])
    assert _table(card.text, "weights dequantized") == f"{quantized}, to float32"
    assert _made_with(card.text) == ["fp8q", "dequantize", "tiny-chat-block", "tiny-chat-bf16", "--dtype", "float32"]
    own = card.text.partition("## The original model card")[0]  # the FP8 source's card follows, with its figures
    assert "Quantization error" not in own and "no quantization library" in own


def test_no_model_card_copies_the_source_card(source, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["quantize", str(source), str(out), "--device", "cpu", "--no-model-card", "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "README.md").read_bytes() == (source / "README.md").read_bytes()


def test_card_without_a_source_card(tmp_path):
    src = tiny_llama(tmp_path / "bare")
    (src / "README.md").unlink()
    out = tmp_path / "bare-fp8"
    quantize(src, out, QuantizeOptions(device="cpu", scheme="tensor", format="fp8"))
    data = _card(out).data.to_dict()
    assert "base_model" not in data and "license" not in data
    text = _card(out).text
    assert "original model card" not in text
    # transformers computes garbage with this layout: the card says so instead of showing how to load it.
    assert "transformers cannot run this layout" in text and "from_pretrained" not in text


def test_source_card_with_broken_front_matter(tmp_path):
    """A card whose YAML does not parse is still kept below; nothing is carried from it."""
    src = tiny_llama(tmp_path / "odd")
    (src / "README.md").write_text("---\nlicense: [unclosed\n---\n# Odd\n\nbody text\n")
    out = tmp_path / "odd-fp8"
    quantize(src, out, QuantizeOptions(device="cpu"))
    data = _card(out).data.to_dict()
    assert "base_model" not in data and "license" not in data
    assert "body text" in (out / "README.md").read_text()


def test_card_is_the_same_after_resume(tmp_path):
    """A resumed run's card has the figures of the shards it kept (recorded by the killed run) and is the same."""
    src = _big_source(tmp_path / "src", shards=3)
    fresh, resumed = tmp_path / "fresh" / "out", tmp_path / "resumed" / "out"
    quantize(src, fresh, QuantizeOptions(device="cpu"))
    killed_after(src, resumed, 2)
    result = CliRunner().invoke(app, ["quantize", str(src), str(resumed), "--device", "cpu", "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert (resumed / "README.md").read_bytes() == (fresh / "README.md").read_bytes()
    assert "| weights quantized | 0 |" not in (fresh / "README.md").read_text()


FRONT_MATTERS = [
    SOURCE_CARD,
    "---\nlicense: apache-2.0\nlanguage: zh\nlicense_link: https://x.example/a:b\n---\nbody",  # a colon
    "---\nlicense_name: 许可证 ✓\nlibrary_name: null\npipeline_tag: text-generation\n---\n",  # unicode, null
    "---\r\nlicense: mit\r\n---\r\nwindows line ends",
    "---\n- a\n- list\n---\nnot a mapping",
    "---\nlicense: [unclosed\n---\nnot YAML",
    "# no front matter at all\n",
    "",
]


@pytest.mark.parametrize("text", FRONT_MATTERS)
def test_front_matter_read_and_written_as_huggingface_hub_does(text):
    """fp8q reads and writes card front matter with PyYAML itself (huggingface_hub's card classes cost 0.3 s of
    import at every run's end): what it carries must be what ModelCard reads, and what it writes byte for byte
    what ModelCardData writes, for every kind of front matter."""
    import yaml
    from huggingface_hub import ModelCardData

    from fp8q.output import model_card

    try:
        theirs = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, yaml.YAMLError):  # not a mapping, or not YAML: fp8q carries nothing from it
        theirs = {}
    ours = model_card.front_matter(text)
    assert {k: ours.get(k) for k in model_card.CARRIED_KEYS} == {k: theirs.get(k) for k in model_card.CARRIED_KEYS}
    meta = {key: ours[key] for key in model_card.CARRIED_KEYS if ours.get(key) is not None}
    meta |= {"base_model": "org/Model-7B", "base_model_relation": "quantized", "tags": ["fp8", "fp8", "mxfp8"]}
    assert model_card._to_yaml(meta) == ModelCardData(**meta).to_yaml()


def _named(tmp_path: Path, name: str, card: str | None = None, name_or_path: str | None = None) -> Path:
    src = tiny_llama(tmp_path / name)
    if card is None:
        (src / "README.md").unlink(missing_ok=True)
    else:
        (src / "README.md").write_text(card)
    if name_or_path is not None:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
    return src


@pytest.mark.parametrize(
    "card,name_or_path,expect,said",
    [
        (None, None, None, "no base_model"),  # a bare folder: nothing, and a note saying how to name it
        ("---\nbase_model: org/from-card\n---\n# x\n", None, "org/from-card", "as the source's own card says"),
        ("---\nbase_model:\n- org/one\n---\n# x\n", None, "org/one", "as the source's own card says"),
        (None, "org/saved-from", "org/saved-from", "_name_or_path"),
        ("---\nbase_model: org/from-card\n---\n", "org/saved-from", "org/saved-from", "_name_or_path"),
        (None, "/data/models/my-model", None, "no base_model"),  # a path is no Hub id
        ("---\nbase_model: ./my-model\n---\n", "my-model", None, "no base_model"),
    ],
)
def test_base_model_is_a_hub_id_or_absent(tmp_path, card, name_or_path, expect, said):
    src = _named(tmp_path, "my-model", card, name_or_path)
    out = tmp_path / "my-model-FP8"
    report = quantize(src, out, QuantizeOptions(device="cpu"))
    data = _card(out).data.to_dict()
    assert data.get("base_model") == expect
    assert ("base_model_relation" in data) == (expect is not None)
    notes = [note for note in report.findings if "base_model" in note]
    assert len(notes) == 1 and said in notes[0] and "--base-model ORG/NAME" in notes[0], notes


def test_base_model_option(tmp_path):
    src = _named(tmp_path, "my-model", "---\nbase_model: org/from-card\n---\n", "org/saved-from")
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(src), str(out), "--base-model", "me/mine", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert _card(out).data.to_dict()["base_model"] == "me/mine"
    for bad in ("my-model", "org/a/b", "org/..", "./org/x", "org--x/y", f"org/{'x' * 100}"):
        result = runner.invoke(app, ["quantize", str(src), str(tmp_path / "o2"), "--base-model", bad, "-q"])
        assert result.exit_code == 2, (bad, result.output)
        assert "--base-model" in result.stderr and "ORG/NAME" in result.stderr
        assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.partial").exists()


def test_a_dense_model_without_a_tokenizer_gets_no_tokenizer_snippet(tmp_path):
    src = _source(tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    assert _cli("quantize", src, tmp_path / "out", "--device", "cpu", "-q")[0] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card and "AutoTokenizer" not in card
