"""What each engine does with each layout fp8q writes, for a dense and for a MoE model: one table, which the plan's
notes and problems, the model card and the README's table all say, and which the tests hold to.

Imports: formats. Each cell says what the engine does (runs it, refuses it, or loads it and computes garbage) and
how that is known: measured by this repository's tests (transformers, CPU: tests/test_layouts_load.py, which
expects exactly what the table says), measured with vLLM's CPU build (`make engines`, outside CI), or read from
the engine's source where no test loads it here. "not checked" says so where neither was possible.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from fp8q.layouts.formats import Format, Layout, ScaleFormat, Scheme


class Outcome(str, Enum):
    RUNS = "runs"
    REFUSES = "refuses"  # fails to load, with an error
    GARBAGE = "garbage"  # loads without an error and computes garbage
    NOT_CHECKED = "not checked"


class Evidence(str, Enum):
    TEST = "tests/test_layouts_load.py"  # loaded and run by this repository's tests, in CI
    ENGINES = "make engines"  # loaded with the engine's CPU build by `make engines` (outside CI)
    SOURCE = "the engine's source"  # read, not loaded: its CPU build has no kernel for it
    NONE = "nothing"


@dataclass(frozen=True)
class Cell:
    outcome: Outcome
    evidence: Evidence
    why: str = ""  # what fails or what it takes, in a few words


# transformers and compressed-tensors releases the TEST cells were measured with.
TRANSFORMERS_MEASURED = "5.17"


def key(layout: Layout) -> str:
    """A layout's short name in the tables: ct-channel, ct-tensor, ct-block, ct-mx, fp8-tensor, fp8-block,
    fp8-block-ue8m0."""
    fmt = "ct" if layout.format is Format.COMPRESSED_TENSORS else "fp8"
    ue8m0 = "-ue8m0" if layout.scale_format is ScaleFormat.UE8M0 else ""
    return f"{fmt}-{layout.scheme.value}{ue8m0}"


_T, _E, _S, _N = Evidence.TEST, Evidence.ENGINES, Evidence.SOURCE, Evidence.NONE
_WHOLE_DIMS = "dims that are multiples of the block only"
_DECOMPRESS = "its expert decompression does not spread tile or group scales"

# Every layout fp8q writes, in the order the tables list them.
LAYOUTS = (
    Layout(Scheme.CHANNEL, Format.COMPRESSED_TENSORS),
    Layout(Scheme.TENSOR, Format.COMPRESSED_TENSORS),
    Layout(Scheme.BLOCK, Format.COMPRESSED_TENSORS),
    Layout(Scheme.MX, Format.COMPRESSED_TENSORS),
    Layout(Scheme.TENSOR, Format.FP8),
    Layout(Scheme.BLOCK, Format.FP8),
    Layout(Scheme.BLOCK, Format.FP8, scale_format=ScaleFormat.UE8M0),
)

# (layout key, MoE) -> what transformers (with compressed-tensors) does on the CPU.
TRANSFORMERS: dict[tuple[str, bool], Cell] = {
    ("ct-channel", False): Cell(Outcome.RUNS, _T),
    ("ct-channel", True): Cell(Outcome.RUNS, _T),
    ("ct-tensor", False): Cell(Outcome.RUNS, _T),
    ("ct-tensor", True): Cell(Outcome.RUNS, _T),
    ("ct-block", False): Cell(Outcome.RUNS, _T, _WHOLE_DIMS),
    ("ct-block", True): Cell(Outcome.REFUSES, _T, _DECOMPRESS),
    ("ct-mx", False): Cell(Outcome.RUNS, _T),
    ("ct-mx", True): Cell(Outcome.REFUSES, _T, _DECOMPRESS),
    ("fp8-tensor", False): Cell(Outcome.GARBAGE, _T, "ignores its per-tensor weight_scale"),
    ("fp8-tensor", True): Cell(Outcome.REFUSES, _T, "its MoE forward pass meets the float8 expert weights as they are"),
    ("fp8-block", False): Cell(Outcome.RUNS, _T, _WHOLE_DIMS),
    ("fp8-block", True): Cell(Outcome.RUNS, _T, _WHOLE_DIMS),
    ("fp8-block-ue8m0", False): Cell(Outcome.RUNS, _T, _WHOLE_DIMS),
    ("fp8-block-ue8m0", True): Cell(Outcome.RUNS, _T, _WHOLE_DIMS),
}

_WHOLE_TILES = "whole tiles only (--tp)"
# (layout key, MoE) -> what vLLM does (SGLang carries the same loaders). [s] cells: the CPU build has no kernel.
VLLM: dict[tuple[str, bool], Cell] = {
    ("ct-channel", False): Cell(Outcome.RUNS, _E),
    ("ct-channel", True): Cell(Outcome.RUNS, _S),
    ("ct-tensor", False): Cell(Outcome.RUNS, _S),
    ("ct-tensor", True): Cell(
        Outcome.REFUSES, _E, "its FP8 MoE method takes per-tensor weights only with static input scales"
    ),
    ("ct-block", False): Cell(Outcome.RUNS, _E, _WHOLE_TILES),
    ("ct-block", True): Cell(Outcome.RUNS, _E, _WHOLE_TILES),
    ("ct-mx", False): Cell(Outcome.NOT_CHECKED, _N, "no MXFP8 kernel in the CPU build"),
    ("ct-mx", True): Cell(Outcome.NOT_CHECKED, _N, "no MXFP8 kernel in the CPU build"),
    ("fp8-tensor", False): Cell(Outcome.RUNS, _S),
    ("fp8-tensor", True): Cell(Outcome.RUNS, _S),
    ("fp8-block", False): Cell(Outcome.RUNS, _E, _WHOLE_TILES),
    ("fp8-block", True): Cell(Outcome.RUNS, _E, _WHOLE_TILES),
    ("fp8-block-ue8m0", False): Cell(Outcome.RUNS, _E, _WHOLE_TILES),
    ("fp8-block-ue8m0", True): Cell(Outcome.RUNS, _E, _WHOLE_TILES),
}

# Architectures whose FP8 output no engine loads in any layout fp8q writes: model_type -> why.
UNSERVABLE = {
    "gpt_oss": (
        "no engine loads gpt-oss with FP8 experts as fp8q writes them: vLLM's gpt-oss loader takes its experts "
        "fused (bf16 or MXFP4, or AMD Quark's FP8) and has no scale for per-expert FP8 weights, and transformers "
        "loads its experts fused only"
    ),
}


def transformers(layout: Layout, moe: bool) -> Cell:
    return TRANSFORMERS[(key(layout), moe)]


def vllm(layout: Layout, moe: bool) -> Cell:
    return VLLM[(key(layout), moe)]


def is_moe(module_names: list[str]) -> bool:
    """Whether Linear modules of these names include MoE experts (per-expert weights, as fp8q writes them)."""
    return any(".experts." in name or ".block_sparse_moe." in name for name in module_names)


__all__ = [
    "LAYOUTS",
    "TRANSFORMERS",
    "UNSERVABLE",
    "VLLM",
    "Cell",
    "Evidence",
    "Outcome",
    "is_moe",
    "key",
    "transformers",
    "vllm",
]
