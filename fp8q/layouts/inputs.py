"""The layouts fp8q reads and never writes, and what a config says to read (ConfigReading): FP4 codes (fp4.py and the
codecs built on it) and DeepSeek-V4's FP8 with E8M0 scales. Each is a codec of its own module that knows its tensors
by name, dtype and shape (`is_packed`), where its scales are, the name and shape a weight has once decoded, and how
to decode it as its own library does; `detect` finds them from the config (`from_args` for compressed-tensors groups,
`from_config` for the others) without naming any. A new input format is a new module here, `@register_input`ed, its
test and the README's row.

Imports: torch, layouts.base, source.checkpoint (types).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fp8q.layouts.base import Layout

if TYPE_CHECKING:
    from fp8q.source.checkpoint import TensorMeta


@dataclass(frozen=True)
class ConfigReading:
    """A checkpoint's quantization_config as its format's family reads it (`read_config` of CompressedTensorsLayout
    and Fp8Layout), once: the layout it promises a weight (`expected`), the input codecs whose weights tell
    themselves apart by name and dtype (`claimed`), what it leaves unquantized, what it targets, and its groups that
    no codec reads, in words."""

    expected: Callable[[TensorMeta], Layout | None]
    claimed: tuple[InputLayout, ...] = ()
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    unread: tuple[str, ...] = ()


class InputLayout(Layout):
    """A layout a checkpoint is read in: a stored weight, its scale, perhaps a second (per-tensor) scale."""

    weight_suffix: ClassVar[str] = "weight"  # the stored weight's last name part
    packed_dtypes: ClassVar[tuple[str, ...]] = ("U8",)
    scale_dtypes: ClassVar[tuple[str, ...]]
    second_suffix: ClassVar[str | None] = None  # a per-tensor scale beside the group scale (NVFP4's global scale)
    # Why `convert` refuses it, where no engine loads what it would make (gpt-oss); None: it converts.
    convert_refusal: ClassVar[str | None] = None
    words: ClassVar[str]  # the layout in words: `compressed-tensors mxfp4-pack-quantized`
    # The `quant_method` of the configs it is read from, where its family's own (the format's name) is not it.
    quant_method: ClassVar[str | None] = None

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> InputLayout | None:
        """The layout a `quantization_config` of a format other than compressed-tensors says, where it is this."""
        return None

    # ── its tensors, by name and shape ──

    def is_packed(self, meta: TensorMeta, tensors: Mapping[str, TensorMeta]) -> bool:
        """Whether a tensor is one of its stored weights: `X.<weight_suffix>`, 2-D, of its dtype."""
        suffix = meta.name.rpartition(".")[2]
        return suffix == self.weight_suffix and meta.dtype in self.packed_dtypes and len(meta.shape) == 2

    def scale_name(self, name: str) -> str:
        """The scale's name, for a stored weight's."""
        return name.rpartition(".")[0] + ".weight_scale"

    def second_name(self, name: str) -> str | None:
        """The second scale's name, where the layout has one."""
        return f"{name.rpartition('.')[0]}.{self.second_suffix}" if self.second_suffix else None

    def output_name(self, name: str) -> str:
        """The decoded weight's name: `X.weight`."""
        return name.removesuffix(self.weight_suffix) + "weight"

    def expected_scale(self, packed: tuple[int, ...]) -> tuple[int, ...] | None:
        """The scale's shape for a stored weight of this shape; None where no scale fits it."""
        raise NotImplementedError

    def output_config(self, config: dict[str, Any], converted: bool) -> dict[str, Any]:
        """config.json of the output, its `quantization_config` gone, with what the format adds beside it set
        right: for bf16 (`converted` False) or for an FP8 layout fp8q writes."""
        return config

    def same_as(self, target: Layout) -> bool:
        """Whether its stored weights and scales are what `target` writes, byte for byte (then copied)."""
        return False

    def outlook(self, target: Layout) -> str:
        """What a conversion into `target` can keep, in words, before any value is read (every value is then
        compared with its source, and the count said)."""
        return "not exact in general: each weight's error is measured"

    def describe(self) -> str:
        return self.words

    def client_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16  # what the libraries decode these to


INPUTS: list[type[InputLayout]] = []  # every input codec, in the order their modules registered


def register_input(cls: type[InputLayout]) -> type[InputLayout]:
    """Class decorator: an input codec joins the list `detect` tries."""
    INPUTS.append(cls)
    return cls


__all__ = ["INPUTS", "InputLayout", "register_input"]
