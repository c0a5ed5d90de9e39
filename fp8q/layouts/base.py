"""What every layout's codec is: the base class each layout module subclasses, and the registry they join.

Imports: torch, dtypes, layouts (vocabulary, clients, numerics), source.checkpoint (types, for type checking). A codec
owns everything about its layout: the scale's name, shape and dtype; the `quantization_config` it writes and how a
checkpoint in it is recognised when read back; its quantize and dequantize numerics (kernels several layouts share live
in numerics.py); what each client does with it, for a dense and a MoE model; and the words the plan, the model card and
the CLI say of it. A layout module defines one subclass and registers it (`@register`); nothing else names it.

The family bases (compressed_tensors.py, fp8.py) hold what a format's layouts share: the config they write, the
dtype the client multiplies in, the rules for scale names and dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import EllipsisType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from fp8q.dtypes import NAME_OF, TORCH_DTYPE
from fp8q.layouts.clients import Cell
from fp8q.layouts.numerics import BAND_ROWS, float_scale_problem
from fp8q.layouts.numerics import dequantize as client_product
from fp8q.layouts.vocabulary import Format, ScaleFormat, Scheme

if TYPE_CHECKING:
    from fp8q.source.checkpoint import TensorMeta


@dataclass(frozen=True)
class Band:
    """Rows [r0, r1) of a weight as a codec quantizes them, in one value: the source rows, the FP8 codes they become
    (a view of the weight's), the scale rows they use (`Layout.scale_rows`, a view of the weight's scale tensor),
    where they start, and a per-tensor layout's one scale (None for the others)."""

    rows: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    r0: int
    tensor_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class Layout:
    """One FP8 layout, as a codec. Instances are values: two equal layouts write the same bytes."""

    key: ClassVar[str]  # its name in tables and the registry: ct-channel, fp8-block, ...
    scheme: ClassVar[Scheme]
    format: ClassVar[Format]
    scale_suffix: ClassVar[str] = "weight_scale"
    # What transformers and vLLM do with it, for a dense (False) and a MoE (True) model.
    transformers: ClassVar[dict[bool, Cell]]
    vllm: ClassVar[dict[bool, Cell]]
    # When a checkpoint is read back, the order layouts of one format are tried in against a scale's shape.
    detect_order: ClassVar[int] = 50

    @classmethod
    def make(cls, block: tuple[int, int], scale_format: ScaleFormat) -> Layout:
        """The layout for these options (most take neither a block nor a scale format)."""
        return cls()

    @property
    def name(self) -> str:
        """Its name in tables: the key, and a scale format other than float (fp8-block-ue8m0)."""
        return self.key + (f"-{self.scale_format.value}" if self.scale_format is not ScaleFormat.FLOAT else "")

    @property
    def block(self) -> tuple[int, int] | None:
        """The tile of a block layout; None for every other."""
        return None

    @property
    def scale_format(self) -> ScaleFormat:
        return ScaleFormat.FLOAT

    # ── what it writes ──

    def scale_dtype(self, weight_dtype: str) -> str:
        """The scale's safetensors dtype for a weight of this one."""
        raise NotImplementedError

    def scale_torch_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return TORCH_DTYPE[self.scale_dtype(NAME_OF[weight_dtype])]

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        raise NotImplementedError

    def quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        """config.json's `quantization_config` for an output in this layout, `ignore` its modules kept."""
        raise NotImplementedError

    # ── numerics ──

    @property
    def row_step(self) -> int:
        """Row ranges handed to `quantize_rows` must start at a multiple of this."""
        return 1

    @property
    def sample_step(self) -> int:
        """Where error_sums' sampled bands may start: a multiple of this."""
        return BAND_ROWS

    def scale_rows(self, r0: int, r1: int) -> slice | EllipsisType:
        """The scale rows that rows [r0, r1) of the weight use (... for all of a per-tensor scale)."""
        return slice(r0, r1)

    def tensor_amax(self, w: torch.Tensor, r0: int, r1: int) -> torch.Tensor | None:
        """Per-tensor layouts: the amax of rows [r0, r1) (ranges combine with max). Others: None."""
        return None

    def tensor_scale(self, amax: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Per-tensor layouts: the one scale, from the whole tensor's amax. Others: None."""
        return None

    def quantize_rows(
        self,
        w: torch.Tensor,
        q: torch.Tensor,
        s: torch.Tensor,
        r0: int,
        r1: int,
        tensor_scale: torch.Tensor | None = None,
    ) -> None:
        """Quantize rows [r0, r1) of w into q, and their scales into s.

        Raises:
            NonFiniteWeight: NaN or inf in these rows (on the CPU).
        """
        band = Band(w[r0:r1], q[r0:r1], s[self.scale_rows(r0, r1)], r0, tensor_scale)
        if band.rows.numel() == 0:
            self._empty_rows(band)
        else:
            self._quantize_band(band)

    def _empty_rows(self, band: Band) -> None:
        band.scales.fill_(1)

    def _quantize_band(self, band: Band) -> None:
        """The codec's own kernel: `band.rows` into `band.codes`, their scales into `band.scales`."""
        raise NotImplementedError

    def decode_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale values as the client multiplies by them (MX: E8M0 exponents decoded)."""
        return scale

    def dequantize(
        self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, second: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows of a weight as its client computes them from their stored form and scale, in `dtype`; `second`: a
        per-tensor scale beside the group scale, for the input layouts that have one (FP4's global scale)."""
        return client_product(q, scale, self, dtype)

    def broadcast(self, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The scale spread over the weight's shape: one per tensor, row, group or tile."""
        raise NotImplementedError

    def client_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        """The dtype the client multiplies q by its scale in."""
        raise NotImplementedError

    def padded(self, rows: int, cols: int) -> tuple[int, int]:
        """The shape the kernel works on for a band of rows x cols (block tiles pad it out)."""
        return rows, cols

    def scale_problem(self, scale: torch.Tensor) -> str | None:
        """What makes these scale values unusable, in words (NaN, inf, zero, negative, a dtype no client takes)."""
        return float_scale_problem(scale)

    # ── planning ──

    def shape_problem(self, module: str, rows: int, cols: int) -> str | None:
        """Why a weight of this shape cannot be written in this layout, or None."""
        return None

    def size_problems(self, shapes: list[tuple[int, int]]) -> list[str]:
        """Why this layout's parameters do not fit the weights (shapes) it would quantize."""
        return []

    def tp_problems(self, pieces: list[tuple[str, int, int]], tp: int) -> list[str]:
        """The layers (module, rows, cols) vLLM could not load in this layout at tensor-parallel size `tp`."""
        return []

    def dims_note(self, pieces: list[tuple[str, tuple[int, int]]], vllm_refuses: bool = False) -> str | None:
        """Something about these weights (name, shape) in this layout that a user should know, or None;
        `vllm_refuses`: the run writes some that vLLM refuses (--no-load-check), said in notes of their own."""
        return None

    # ── reading a checkpoint back ──

    @classmethod
    def shape_candidates(cls, expected: Layout | None) -> list[Layout]:
        """The layouts of this class a scale's shape is tried against, `expected` being the config's."""
        return [cls()]

    @classmethod
    def claims(cls, scale_dtype: str) -> bool:
        """Whether a scale of this dtype is this layout's whatever its shape first suggested (MX's uint8)."""
        return False

    def output_name(self, name: str) -> str:
        """The name of a stored weight once decoded (FP4 codecs rename `weight_packed`); FP8 keeps it."""
        return name

    def decoded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a stored weight once decoded (FP4 packs two values a byte); FP8 keeps it."""
        return shape

    def fits_scale(self, shape: tuple[int, ...], rows: int, cols: int) -> bool:
        """Whether a scale of this shape is this layout's for a rows x cols weight."""
        return shape == self.scale_shape(rows, cols)

    def rule_problem(self, weight: TensorMeta, scale: TensorMeta) -> str | None:
        """The name and dtype rules engines hold a scale of this layout to: one line naming what breaks them."""
        raise NotImplementedError

    # ── words ──

    def describe(self) -> str:
        """The layout in words, e.g. `compressed-tensors block 128x128`, `fp8 block 128x128 ue8m0`."""
        text = f"{self.format.value} {self.scheme.value}"
        if self.block is not None:
            text += f" {self.block[0]}x{self.block[1]}"
        return text + (f" {self.scale_format.value}" if self.scale_format is not ScaleFormat.FLOAT else "")

    def option_words(self) -> str:
        """The options that choose it (not its block size), as a user writes them."""
        words = f"--scheme {self.scheme.value} --format {self.format.value}"
        return words + (
            f" --scale-format {self.scale_format.value}" if self.scale_format is not ScaleFormat.FLOAT else ""
        )

    def cli_args(self) -> list[str]:
        """The options that ask for it, all of them."""
        args = ["--scheme", self.scheme.value, "--format", self.format.value]
        if self.block is not None:
            args += ["--block-size", f"{self.block[0]}x{self.block[1]}"]
        return args + (
            ["--scale-format", self.scale_format.value] if self.scale_format is not ScaleFormat.FLOAT else []
        )

    def tags(self) -> list[str]:
        """The model card's tags."""
        tags = ["fp8", "float8_e4m3fn", self.format.value, f"fp8-{self.scheme.value}", "fp8q"]
        return tags + ([self.scale_format.value] if self.scale_format is not ScaleFormat.FLOAT else [])

    def granularity(self) -> str:
        """Where its scales are, in the card's words: "one per output row"."""
        raise NotImplementedError

    def scales_text(self) -> str:
        """The model card's row on the weight scales."""
        raise NotImplementedError

    def activations_text(self, quantization_config: dict[str, Any] | None) -> str:
        """The model card's row on the activations."""
        raise NotImplementedError

    def transformers_lead(self) -> str:
        """How transformers loads it, where it runs it: the line above the card's snippet."""
        raise NotImplementedError


L = TypeVar("L", bound=type[Layout])
# (scheme, format, scale format) -> the layout's class, in the order the modules registered.
REGISTRY: dict[tuple[Scheme, Format, ScaleFormat], type[Layout]] = {}


def register(*scale_formats: ScaleFormat) -> Callable[[L], L]:
    """Class decorator: the layout joins the registry, under each scale format it takes (float by default)."""

    def add(cls: L) -> L:
        for scale_format in scale_formats or (ScaleFormat.FLOAT,):
            REGISTRY[(cls.scheme, cls.format, scale_format)] = cls
        return cls

    return add


__all__ = ["REGISTRY", "Layout", "register"]
