"""The kernels the codecs compute with: FP8's constants, max |x| from a 16-bit float's bits, amax / 448 correctly
rounded, powers of two exactly, a band cut into block tiles; and the refusal of a weight with NaN or inf.

Imports: torch. Pure: tensors in, tensors out, on whatever device they live on.

No clamp before the cast, and none is needed: with |x| <= amax, x / (amax / 448) rounds to at most
448 * (1 + 2^-7) < 464, which float8_e4m3fn's round-to-nearest-even takes to 448 (464 is the midpoint
to the next, non-existent, 480), whatever the rounding of the scale; NaN and inf are refused before.
So every reference's clamp is a no-op here, and skipping it saves a pass over the data. The cast
happens in `copy_` straight into the output, without an intermediate float8 tensor.

Kernels work on row ranges so a CPU caller can walk a tensor in cache-sized chunks, on several
threads, and get exactly the bits of the whole-tensor computation: every step is elementwise or
reduces within a row (channel) or within a band of block rows (block); per-tensor schemes reduce
the amax first and then quantize with the one scale.

Same bits on every device: only operations whose result IEEE fixes (one correctly rounded step) are used.
PyTorch on CUDA computes `tensor / python_scalar` as `tensor * (1 / scalar)`, which is not correctly
rounded (1/448 is no binary fraction), while the CPU divides; so scales divide by a 448 *tensor* on the
weight's own device (a CPU tensor would take the same shortcut), and `1 / scale` is `torch.reciprocal`,
a correctly rounded division on both. tests/layouts/test_numerics.py records every division by a Python number.
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0


class NonFiniteWeight(ValueError):
    """The weight holds NaN or inf: no scale can represent it."""


# 16-bit floats as integers with the sign bit cleared (see `abs_max`).
_MAGNITUDE_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF)}


def abs_max(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = True) -> torch.Tensor:
    """max |x| over `dim` (over everything when None), in x's dtype: the same number as `x.abs().amax(dim)`.

    16-bit floats take it from their bits, about twice as fast on the CPU (measured on bf16 and fp16 rows,
    tiles and MX groups; float32 gains nothing, so it keeps abs().amax()): with the sign bit cleared,
    non-negative floats order as their bits do as integers, so the largest integer is the bits of the
    largest magnitude. NaN's bits lie above inf's, so a NaN still comes out NaN, and an inf inf.
    """
    as_int = _MAGNITUDE_BITS.get(x.dtype)
    mags = x.abs() if as_int is None else x.view(as_int[0]) & as_int[1]
    amax = mags.amax() if dim is None else mags.amax(dim=dim, keepdim=keepdim)
    return amax if as_int is None else amax.view(x.dtype)


def over_fp8_max(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, correctly rounded in amax's dtype on any device (see the module's note)."""
    return amax / torch.full((), FP8_MAX, dtype=amax.dtype, device=amax.device)


def check_finite(amax: torch.Tensor) -> None:
    """Raise NonFiniteWeight for NaN or inf, on the CPU. On a GPU the check would stop the host for every tensor,
    so there the scale comes out NaN or inf instead, for the caller to check once it is on the host anyway
    (`scale_is_finite`)."""
    if amax.device.type != "cpu":
        return
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteWeight("holds NaN or inf values")


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent in float32, exactly (an integer tensor in; subnormal or inf at the ends)."""
    return torch.ldexp(torch.ones(exponent.shape, dtype=torch.float32, device=exponent.device), exponent)


def log2_of_pow2(x: torch.Tensor) -> torch.Tensor:
    """log2 of powers of two, exactly, as int32 (-inf for 0 and +inf for inf are the caller's to mind)."""
    _, exponent = torch.frexp(x.float())  # x = 0.5 * 2^exponent
    return exponent.to(torch.int32) - 1


def tiles(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """A band of rows (starting on a tile row) as [tile rows, bh, tile cols, bw] tiles, zero-padded at its
    edges, and the tile it was cut with. Zero padding leaves every edge tile's amax to its real elements, as the
    references compute it; a side longer than the band covers all of it (`tile`)."""
    rows, cols = x.shape
    bh, bw = tile(block, rows, cols)
    nbr, nbc = math.ceil(rows / bh), math.ceil(cols / bw)
    padded = torch.nn.functional.pad(x, (0, nbc * bw - cols, 0, nbr * bh - rows))
    return padded.view(nbr, bh, nbc, bw), (bh, bw)


def tile(block: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """The block tile as it covers a band of `rows` x `cols` (starting on a tile row): a side longer than the band
    covers all of it, the very same scales without padding it out to the block (a 99999999x1 block would be
    gigabytes of zeros)."""
    return max(1, min(block[0], rows)), max(1, min(block[1], cols))


__all__ = [
    "FP8",
    "FP8_MAX",
    "NonFiniteWeight",
    "abs_max",
    "check_finite",
    "log2_of_pow2",
    "over_fp8_max",
    "pow2",
    "tile",
    "tiles",
]
