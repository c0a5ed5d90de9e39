"""What an engine does with a layout, in the words every layout's codec uses for it: each codec declares a cell for
transformers and for vLLM, for a dense and for a MoE model, and the plan's notes and problems, the model card and
the README's table all say what the cells say.

Imports: nothing. Each cell says what the engine does (runs it, refuses it, or loads it and computes garbage) and
how that is known: measured by this repository's tests (transformers, CPU: tests/layouts/test_layouts_load.py, which
expects exactly what the cells say), measured with vLLM's CPU build (`make engines`, outside CI), or read from
the engine's source where its CPU build has no kernel to load it with. "not checked" says so where neither was
possible.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    RUNS = "runs"
    REFUSES = "refuses"  # fails to load or run, with an error
    GARBAGE = "garbage"  # loads without an error and computes garbage
    NOT_CHECKED = "not checked"


class Evidence(str, Enum):
    TEST = "tests/layouts/test_layouts_load.py"  # loaded and run by this repository's tests, in CI
    ENGINES = "make engines"  # loaded with the engine's CPU build by `make engines` (outside CI)
    SOURCE = "the engine's source"  # read, not loaded: the engine's CPU build has no kernel for it
    NONE = "nothing"


@dataclass(frozen=True)
class Cell:
    outcome: Outcome
    evidence: Evidence
    why: str = ""  # what fails or what it takes, in a few words


# The transformers release the TEST cells were measured with.
TRANSFORMERS_MEASURED = "5.17"

# Architectures whose FP8 output no engine loads in any layout fp8q writes: model_type -> why.
UNSERVABLE = {
    "gpt_oss": (
        "no engine loads gpt-oss with FP8 experts as fp8q writes them: vLLM's gpt-oss loader takes its experts "
        "fused (bf16 or MXFP4, or AMD Quark's FP8) and has no scale for per-expert FP8 weights, and transformers "
        "loads its experts fused only"
    ),
}


def is_moe(module_names: list[str]) -> bool:
    """Whether Linear modules of these names include MoE experts (per-expert weights, as fp8q writes them)."""
    return any(".experts." in name or ".block_sparse_moe." in name for name in module_names)


__all__ = ["TRANSFORMERS_MEASURED", "UNSERVABLE", "Cell", "Evidence", "Outcome", "is_moe"]
