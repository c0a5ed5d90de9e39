"""What a conversion is asked for: `Options` (the layout and tensors, the dtype, how the run goes, `Push` for
--push-to-hub), the `Mode` of a run, and how many worker threads run it. Typed: the layout's words are the
vocabulary's enums (a string is taken and turned into one, a wrong one refused in one line).

Imports: cores, dtypes, errors, layouts (the registry), layouts (base, vocabulary), source.files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fp8q.cores import usable_cores
from fp8q.dtypes import config_name
from fp8q.errors import UsageError
from fp8q.layouts import DEFAULT_BLOCK, find
from fp8q.layouts.base import Layout
from fp8q.layouts.vocabulary import Format, ScaleFormat, Scheme
from fp8q.source.files import is_model_id


class Mode(str, Enum):
    """What a run makes: the one engine's three conversions differ only in their plan."""

    QUANTIZE = "quantize"  # a bf16/fp16/fp32 checkpoint -> FP8
    DEQUANTIZE = "dequantize"  # an FP8 checkpoint -> high precision, no quantization_config
    CONVERT = "convert"  # an FP8 checkpoint -> another FP8 layout: dequantize, then quantize


@dataclass(frozen=True)
class Push:
    """`--push-to-hub`: publish the output to a Hub repo in the same pass, in one commit at the end."""

    repo_id: str
    revision: str | None = None  # the branch (created from main if missing); None: main
    create_pr: bool = False  # the commit opens a pull request instead
    private: bool = False  # a repo created now is private
    commit_message: str | None = None
    # With no OUT: the folder the shards wait in until uploaded (None: ~/.cache/fp8q/push, or $FP8Q_STAGING)
    staging: str | None = None

    def __post_init__(self) -> None:
        """Raises:
        UsageError: the repo id is not ORG/NAME, or the revision is a ref rather than a branch."""
        if not is_model_id(self.repo_id):
            raise UsageError(
                f"--push-to-hub {self.repo_id!r}: not a Hub repo id; give ORG/NAME (ASCII letters, digits, '-', '_', "
                "'.'; not ending in .git)"
            )
        if self.revision is not None and self.revision.startswith("refs/"):
            raise UsageError(
                f"--push-revision {self.revision}: takes a branch name; to propose the output as a pull request use "
                "--create-pr"
            )

    def staging_out(self) -> Path:
        """Where the output is made when there is no OUT: its OUT.partial/ holds the shards on their way up and
        the run's records (for --resume), and is deleted once the commit is made."""
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fp8q" / "push"
        root = Path(self.staging or os.environ.get("FP8Q_STAGING") or cache)
        return root / self.repo_id.replace("/", "--")


@dataclass(frozen=True)
class Options:
    """What to produce and how, for any conversion: the layout and the tensors to quantize (quantize, convert), the
    dtype FP8 weights are dequantized to (dequantize, convert), and how the run goes. `workers` 0 means one per CPU
    core."""

    scheme: Scheme = Scheme.CHANNEL  # --scheme, --format, --scale-format: the words fp8q.layouts.find takes
    format: Format = Format.COMPRESSED_TENSORS
    block_size: tuple[int, int] = DEFAULT_BLOCK
    scale_format: ScaleFormat = ScaleFormat.FLOAT
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    device: str = "auto"
    workers: int = 0
    overwrite: bool = False
    resume: bool = False
    revision: str | None = None  # for a Hub repo id
    tp: int | None = None  # check that block layouts load in vLLM at this tensor-parallel size (None: 1)
    load_check: bool = True  # False writes block layers vLLM could not load (the user's explicit choice)
    config: str | None = None  # a config.json to use when SRC has none
    # dequantize and convert: the dtype FP8 weights are dequantized to (None: the config's, else bfloat16)
    dtype: str | None = None
    model_card: bool = True  # False copies the source's README.md unchanged instead of writing a card
    keep_download: bool = False  # a streamed Hub repo: keep the shards downloaded in the cache
    # The model card's `base_model`, a Hub id `org/name` (None: SRC's repo id, else one the source names)
    base_model: str | None = None
    push: Push | None = None  # publish to a Hub repo as well (or instead of OUT, when OUT is None)

    def __post_init__(self) -> None:
        """The layout's words as the vocabulary's enums, from whatever string names them.

        Raises:
            UsageError: a word that names no scheme, format or scale format.
        """
        for name, kind in (("scheme", Scheme), ("format", Format), ("scale_format", ScaleFormat)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    words = ", ".join(member.value for member in kind)
                    raise UsageError(f"--{name.replace('_', '-')} {value!r}: choose from {words}") from None

    @property
    def layout(self) -> Layout:
        """The layout these options ask for.

        Raises:
            UsageError: there is no such layout.
        """
        rows, cols = self.block_size
        return find(self.scheme, self.format, self.scale_format, (rows, cols))

    def output_affecting(self, mode: Mode, dtype: str | None) -> dict[str, Any]:
        """The options that decide the output bytes (device and workers do not: same bits everywhere)."""
        decided: dict[str, Any] = {"command": mode.value}
        if mode is not Mode.DEQUANTIZE:
            layout = self.layout
            decided |= {
                "scheme": layout.scheme.value,
                "format": layout.format.value,
                "block_size": list(self.block_size),
                "scale_format": layout.scale_format.value,
                "ignore": list(self.ignore),
                "targets": list(self.targets),
            }
        if dtype is not None:
            decided["dtype"] = config_name(dtype)
        return decided


# Its first name, kept for the API fp8q 0.1 had.
QuantizeOptions = Options


def worker_count(asked: int, processes: int = 1) -> int:
    """CPU quantization threads: as asked (0: the cores shared among this node's processes), never more than the
    cores this process may run on: more threads than cores only wait on each other (10000 ran 9x slower)."""
    cores = usable_cores()
    return max(1, min(asked or cores // processes, cores))


__all__ = ["Mode", "Options", "Push", "QuantizeOptions", "worker_count"]
