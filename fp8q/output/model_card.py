"""The output's README.md: a model card for the converted model, in place of the source's.

Imports: dtypes, units, layouts (base, clients, detect), plan.checks, PyYAML (the YAML front matter, both ways).
The card says what the output is (layout, scales, what was quantized and kept), the exact command that makes it
again, the quantization error summarised from the same per-tensor figures `fp8q.json` records, and how
to serve it. The source's card follows below a rule, its own front matter removed: it still describes the
model (its training, its intended use, its licence terms), and a second README beside the first would not
be shown by the Hub. License, library and language are carried into the new front matter.
"""

from __future__ import annotations

import re
import shlex
import statistics
from dataclasses import dataclass
from typing import Any

from fp8q.dtypes import config_name
from fp8q.layouts.base import Layout
from fp8q.layouts.clients import Outcome
from fp8q.layouts.detect import layout_words
from fp8q.plan.checks import exactness
from fp8q.units import size_text

CARD_FILE = "README.md"
# Carried from the source card's front matter: what still holds for the converted weights.
CARRIED_KEYS = ("license", "license_name", "license_link", "library_name", "pipeline_tag", "language")
_MAX_LISTED = 20  # ignored modules named in the card; the rest counted
# A card's YAML front matter, as huggingface_hub finds it: between two `---` lines at the very top.
_FRONT_MATTER = re.compile(r"\A\s*---\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)
# The fields of huggingface_hub's ModelCardData that fp8q writes, in the order it writes them (others follow).
_CARD_FIELDS = (
    "base_model",
    "language",
    "library_name",
    "license",
    "license_name",
    "license_link",
    "pipeline_tag",
    "tags",
)


@dataclass(frozen=True)
class CardInput:
    """What the card says: gathered by the engine once every shard is written."""

    command: str  # "quantize", "dequantize" or "convert"
    base: str  # the Hub repo id, or the source folder's name: how the card names its source
    is_repo: bool
    base_model: str | None  # the front matter's base_model: a Hub id, or None (never a folder name)
    base_model_note: str | None  # where base_model came from, or why there is none, when the user did not say
    revision: str | None
    out_name: str  # how the output is named: its repo id when pushed (--push-to-hub), else OUT's folder name
    layout: Layout | None  # None for dequantize
    source_layouts: list[str]  # an FP8 source's layouts in words (dequantize, convert)
    dtype: str | None  # the dtype dequantized weights were written in
    ignore: tuple[str, ...]
    targets: tuple[str, ...]
    ignored_modules: tuple[str, ...]
    quantization_config: dict[str, Any] | None
    tensors_quantized: int
    tensors_kept: int
    tensors_dequantized: int
    weights_copied: int  # quantized source weights already in the layout, copied (convert)
    bytes_in: int
    bytes_out: int
    stats: dict[str, dict[str, Any]]  # per quantized weight, as fp8q.json's "tensors"
    version: str
    source_card: str | None  # the source README.md's text
    moe: bool = False  # whether it holds MoE experts: engines treat those apart (each layout's cells)
    unservable: str | None = None  # why no engine loads it, when it was written anyway (--no-load-check)
    tokenizer: bool = True  # whether it ships a tokenizer (the snippet loads one only then)
    pushed: bool = False  # published to the Hub as out_name (the command says --push-to-hub)


def error_summary(stats: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The per-tensor relative errors in four figures (as fp8q.json holds them; None when nothing was quantized)."""
    rel = {name: float(s["rel_error"]) for name, s in stats.items() if "rel_error" in s}
    if not rel:
        return None
    worst = max(rel, key=lambda name: (rel[name], name))
    return {
        "weights": len(rel),
        "median_rel_error": statistics.median(rel.values()),
        "mean_rel_error": statistics.fmean(rel.values()),
        "worst_rel_error": rel[worst],
        "worst_tensor": worst,
        "max_abs_error": max(float(s.get("max_abs_error", 0.0)) for s in stats.values()),
    }


def render(card: CardInput) -> str:
    """The whole README.md: front matter, the new card, then the source's card."""
    source_meta: dict[str, Any] = {}
    source_body = None
    if card.source_card is not None:
        source_body = _FRONT_MATTER.sub("", card.source_card, count=1).strip()
        source_meta = front_matter(card.source_card)
    meta = {key: source_meta[key] for key in CARRIED_KEYS if source_meta.get(key) is not None}
    if card.base_model is not None:
        meta["base_model"] = card.base_model
    if card.base_model is not None and card.command != "dequantize":
        # The Hub's word for a model derived from another by quantization; a dequantized model has no such word.
        meta["base_model_relation"] = "quantized"
    meta["tags"] = _tags(card)
    parts = [f"---\n{_to_yaml(meta)}\n---\n", _body(card)]
    if source_body:
        parts.append(f"---\n\n## The original model card ({card.base})\n\n{source_body}\n")
    return "\n".join(parts)


def front_matter(text: str) -> dict[str, Any]:
    """A card's front matter as huggingface_hub reads it (`yaml.safe_load` of the block at the top); {} where
    there is none or it is not a YAML mapping: the card's body still tells the model's story."""
    import yaml  # a dependency of huggingface_hub

    found = _FRONT_MATTER.match(text)
    if not found:
        return {}
    try:
        data = yaml.safe_load(found.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _to_yaml(meta: dict[str, Any]) -> str:
    """Front matter as huggingface_hub's `ModelCardData(**meta).to_yaml()` writes it (its fields in its order,
    then the rest; no None values; tags once each; unicode kept), without importing its card classes: they
    bring the Hub client along, 0.3 to 0.5 s at the end of every run."""
    import yaml

    fields = {key: meta[key] for key in _CARD_FIELDS if meta.get(key) is not None}
    if "tags" in fields:
        fields["tags"] = list(dict.fromkeys(fields["tags"]))
    rest = {key: value for key, value in meta.items() if key not in _CARD_FIELDS and value is not None}
    return yaml.dump({**fields, **rest}, sort_keys=False, allow_unicode=True).strip()


def _tags(card: CardInput) -> list[str]:
    if card.layout is None:
        return ["fp8q", "dequantized", config_name(card.dtype or "BF16")]
    return card.layout.tags()


def _body(card: CardInput) -> str:
    link = f"[{card.base}](https://huggingface.co/{card.base})" if card.is_repo else f"`{card.base}`"
    at = f" at revision `{card.revision}`" if card.revision else ""
    made = f"made with [fp8q](https://pypi.org/project/fp8q/) {card.version}"
    if card.command == "dequantize":
        intro = f"{config_name(card.dtype or 'BF16')} weights of the quantized model {link}{at}, dequantized: {made}."
    elif card.command == "convert":
        intro = f"FP8 (`float8_e4m3fn`) weights of the quantized model {link}{at} in another layout, {made}."
    else:
        intro = f"FP8 (`float8_e4m3fn`) weights of {link}{at}, {made}."
    lines = [f"# {card.out_name}", "", intro, "", "## What was converted", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _facts(card)]
    summary = error_summary(card.stats)
    if summary is not None:
        lines += [
            "",
            "## Quantization error",
            "",
            "Per quantized weight W, the relative error of its dequantized FP8 form W': ‖W − W'‖ / ‖W‖ "
            "(the same figures as `fp8q.json`, which lists every weight).",
            "",
            "| weights | median | mean | worst | worst weight | largest absolute error |",
            "|---|---|---|---|---|---|",
            f"| {summary['weights']} | {summary['median_rel_error']:.4e} | {summary['mean_rel_error']:.4e} "
            f"| {summary['worst_rel_error']:.4e} | `{summary['worst_tensor']}` | {summary['max_abs_error']:.4e} |",
        ]
    lines += ["", "## Made with", "", "```sh", command_line(card), "```", "", *_serving(card)]
    return "\n".join(lines) + "\n"


def _facts(card: CardInput) -> list[tuple[str, str]]:
    size = f"{size_text(card.bytes_in)} in, {size_text(card.bytes_out)} out"
    if card.layout is None:
        return [
            ("source layout", ", ".join(card.source_layouts) or "unknown"),
            ("weights dequantized", f"{card.tensors_dequantized}, to {config_name(card.dtype or 'BF16')}"),
            ("tensors kept as they were", str(card.tensors_kept)),
            ("size", size),
        ]
    layout = card.layout
    facts = [("layout", f"{layout_words(layout)} (`quantization_config` in config.json)")]
    if card.source_layouts:
        facts.append(("source layout", ", ".join(card.source_layouts)))
    if (compared := exactness(card.stats, card.weights_copied)) is not None:
        facts.append(("compared with the source", compared.removeprefix("exact: ")))
    facts += [
        ("weight scales", layout.scales_text()),
        ("activations", layout.activations_text(card.quantization_config)),
        ("weights quantized", str(card.tensors_quantized)),
        ("tensors kept as they were", str(card.tensors_kept)),
        ("modules kept in high precision", _listed(card.ignored_modules)),
        ("size", size),
    ]
    return facts


def _listed(names: tuple[str, ...]) -> str:
    if not names:
        return "none"
    shown = ", ".join(f"`{n}`" for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more (all in config.json's `ignore`)" if more > 0 else "")


def command_line(card: CardInput) -> str:
    """The command that makes this output again: the options in full, SRC as its repo id or folder name (a local
    path on the machine that made it means nothing to a reader, and may say more than its owner meant)."""
    args = ["fp8q", card.command, card.base, *(["--push-to-hub"] if card.pushed else []), card.out_name]
    if card.revision:
        args += ["--revision", card.revision]
    layout = card.layout
    if layout is not None:
        args += layout.cli_args()
        for pattern in card.ignore:
            args += ["--ignore", pattern]
        for pattern in card.targets:
            args += ["--targets", pattern]
    if card.dtype is not None and card.command != "quantize":
        args += ["--dtype", config_name(card.dtype)]
    return shlex.join(args)


def _serving(card: CardInput) -> list[str]:
    """How to serve it, from what each engine is known to do with this layout and model (each layout's cells)."""
    name = card.out_name
    lines = ["## Use it", ""]
    if card.unservable:
        return [*lines, f"No engine loads this output: {card.unservable}. It was written with `--no-load-check`."]
    layout = card.layout
    vllm = layout.vllm[card.moe] if layout is not None else None
    if vllm is not None and vllm.outcome is Outcome.REFUSES:
        lines += [f"vLLM and SGLang refuse this layout for this model: {vllm.why}.", ""]
    else:
        lead = "[vLLM](https://docs.vllm.ai) and [SGLang](https://docs.sglang.ai) read the layout from config.json"
        if vllm is not None and vllm.outcome is Outcome.NOT_CHECKED:
            lead += f" (not checked with this layout: {vllm.why})"
        lines += [f"{lead}:", "", "```sh", f"vllm serve {name}", f"python -m sglang.launch_server --model-path {name}"]
        lines += ["```", ""]
    cell = layout.transformers[card.moe] if layout is not None else None
    if cell is not None and cell.outcome is not Outcome.RUNS:
        done = "computes garbage without an error" if cell.outcome is Outcome.GARBAGE else "fails"
        kind = "MoE" if card.moe else "dense"
        return [*lines, f"transformers cannot run this layout for a {kind} model: it {cell.why} ({done})."]
    lines += [_transformers_lead(layout), "", "```python"]
    if card.tokenizer:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{name}", device_map="auto")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{name}")']
    else:
        lines += ["from transformers import AutoModelForCausalLM", ""]
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{name}", device_map="auto")']
    return [*lines, "```"]


def _transformers_lead(layout: Layout | None) -> str:
    """How transformers loads it, where it runs it (its layout says, measured by tests/layouts/test_layouts_load.py)."""
    if layout is None:
        return "[transformers](https://huggingface.co/docs/transformers) loads it with no quantization library:"
    return layout.transformers_lead()
