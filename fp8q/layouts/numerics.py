"""The generic steps every layout shares (a whole weight quantized, dequantized as its client computes it, checked,
sampled for the manifest's statistics), which call into the layout's own codec for what is its own (the `Codec`
protocol), and the arithmetic verify checks values with.

Imports: torch, layouts.kernels. Pure: tensors in, tensors out, on whatever device they live on. The kernels the
codecs compute with, and why their bits are the same on every device, are layouts/kernels.py's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import EllipsisType
from typing import Protocol

import torch

from fp8q.layouts.kernels import FP8, FP8_MAX

# Elements dequantized at a time: bounds the float64 temporaries of a band (8 MB) whatever the weight size.
BAND_ELEMENTS = 1 << 20
# Elements compared at a time when every value of a weight is checked (error_sums' `whole`).
CHECK_ELEMENTS = 1 << 17
# Rows per band that error_sums samples.
BAND_ROWS = 16


class Codec(Protocol):
    """What the generic steps below ask of a layout's codec (`fp8q.layouts.base.Layout` is one, and the only one):
    where its row ranges may start, which scale rows a range uses, its client's arithmetic, its kernel."""

    @property
    def row_step(self) -> int: ...

    @property
    def sample_step(self) -> int: ...

    def scale_rows(self, r0: int, r1: int) -> slice | EllipsisType: ...

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]: ...

    def scale_torch_dtype(self, weight_dtype: torch.dtype) -> torch.dtype: ...

    def padded(self, rows: int, cols: int) -> tuple[int, int]: ...

    def tensor_amax(self, w: torch.Tensor, r0: int, r1: int) -> torch.Tensor | None: ...

    def tensor_scale(self, amax: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None: ...

    def quantize_rows(
        self,
        w: torch.Tensor,
        q: torch.Tensor,
        s: torch.Tensor,
        r0: int,
        r1: int,
        tensor_scale: torch.Tensor | None = None,
    ) -> None: ...

    def decode_scale(self, scale: torch.Tensor) -> torch.Tensor: ...

    def broadcast(self, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor: ...

    def client_dtype(self, scale_dtype: torch.dtype) -> torch.dtype: ...


# ── kernels several layouts share ──


# ── the generic steps, each calling into the layout's codec ──


def empty_outputs(
    w: torch.Tensor, layout: Codec, pin: bool = False, q: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized weight (`q` if given) and a new scale for `w`, on w's device (or pinned host memory)."""
    rows, cols = w.shape
    device = torch.device("cpu") if pin else w.device
    if q is None:
        q = torch.empty((rows, cols), dtype=FP8, device=device, pin_memory=pin)
    s = torch.empty(
        layout.scale_shape(rows, cols), dtype=layout.scale_torch_dtype(w.dtype), device=device, pin_memory=pin
    )
    return q, s


def quantize(w: torch.Tensor, layout: Codec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a whole 2-D weight on its own device. Returns (q, scale).

    Raises:
        NonFiniteWeight: NaN or inf in the weight, on the CPU (see `check_finite`).
    """
    q, s = empty_outputs(w, layout)
    tensor_scale = layout.tensor_scale(layout.tensor_amax(w, 0, w.shape[0]), w.dtype)
    layout.quantize_rows(w, q, s, 0, w.shape[0], tensor_scale)
    return q, s


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, layout: Codec, dtype: torch.dtype = torch.bfloat16, *, strict: bool = False
) -> torch.Tensor:
    """w ~ q * scale, as the client of the layout computes it, cast to `dtype`. `q` may be a band of rows
    with the matching rows of the scale (whole tile rows for block).

    The product is first taken exactly (float64 holds any float8 x float32 product), then rounded once to
    the client's dtype (`layout.client_dtype`), which gives the client's bits. Where the client's dtype cannot
    hold it (float16 weights near 65504, say) the client gets inf; `strict` keeps that inf (what verify checks),
    otherwise the exact product is rounded to `dtype` instead, so no overflow of the client's makes a weight inf.
    """
    client_type = layout.client_dtype(scale.dtype)
    exact = q.double() * layout.broadcast(layout.decode_scale(scale).double(), q.shape)
    client = exact.to(client_type)
    if strict:
        return client.to(dtype)
    overflowed = torch.isinf(client) & torch.isfinite(exact)  # no test of it on the host: a GPU never waits
    return torch.where(overflowed, exact, client.double()).to(dtype)


def may_overflow(scale: torch.Tensor, layout: Codec) -> bool:
    """Whether the client's q * scale could overflow to inf anywhere, from the scales alone: |q| <= 448, and a product
    below the client dtype's largest value rounds to at most that value. Clears nearly every weight without reading
    q; where it does not, `client_overflows` (or `client_values`) looks at q."""
    if not scale.numel():
        return False
    values = layout.decode_scale(scale)
    return float(values.double().abs().max()) * FP8_MAX >= torch.finfo(layout.client_dtype(scale.dtype)).max


def client_overflows(q: torch.Tensor, scale: torch.Tensor, layout: Codec) -> bool:
    """Whether the client's q * scale overflows to inf anywhere (a float16 weight near 65504, say)."""
    if not q.numel() or not may_overflow(scale, layout):
        return False
    rows, cols = q.shape
    return not all(
        bool(torch.isfinite(dequantize(q[r0:r1], scale[scale_rows], layout, torch.float64, strict=True)).all())
        for r0, r1, scale_rows in row_bands(rows, cols, layout)
    )


def row_bands(
    rows: int, cols: int, layout: Codec, elements: int = BAND_ELEMENTS
) -> Iterator[tuple[int, int, slice | EllipsisType]]:
    """Row ranges [r0, r1) of about `elements` elements, whole block rows each, with the scale rows they use (all of
    a per-tensor scale)."""
    step = layout.row_step
    band = max(step, elements // max(cols, 1) // step * step)
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        yield r0, r1, layout.scale_rows(r0, r1)


def split_rows(rows: int, step: int, parts: int) -> list[tuple[int, int]]:
    """`rows` split into at most `parts` contiguous ranges of about equal size, on `step` boundaries (one per worker
    thread)."""
    units = max(1, math.ceil(rows / step))
    parts = max(1, min(parts, units))
    bounds = [min(rows, (units * i // parts) * step) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a] or [(0, rows)]


def kernel_bytes(layout: Codec, rows: int, cols: int, itemsize: int) -> int:
    """The most the kernel's temporaries take to quantize a band of rows x cols at once: its tiles padded out (block),
    a float32 copy and the product."""
    rows, cols = layout.padded(rows, cols)
    return rows * cols * (itemsize + 8)


def nan_codes(q: torch.Tensor) -> int:
    """How many float8_e4m3fn NaN codes (0x7f and 0xff; the format has no inf) a weight holds. Two byte-wide
    maximums say whether there is any (0x7f is the largest code as int8, 0xff as uint8), 100x faster on the CPU than
    the count, which only a weight that has one pays for."""
    if not q.numel() or (int(q.view(torch.int8).max()) < 0x7F and int(q.view(torch.uint8).max()) < 0xFF):
        return 0
    return int(((q.view(torch.uint8) & 0x7F) == 0x7F).sum())


# A float8_e4m3fn code's 7 low bits shifted into float32's exponent and mantissa make the float32 number 2^-120 times
# its magnitude (the 8 subnormal codes float32 subnormals), its sign bit shifted along lands in float32's (the mask
# clears what int8's sign extension put between them), and a multiply by 2^120 (exact) scales it back.
_CODE_SHIFT, _CODE_MASK, _CODE_SCALE = 20, -0x78000001, 2.0**120  # the mask: 0x87FFFFFF as an int32


def fp8_values(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes as float32: `q.float()`'s numbers (NaN codes aside: they come out as +-480, so check
    `nan_codes` first) in integer steps, 2-3x faster on the CPU than torch's own cast."""
    bits = q.view(torch.int8).to(torch.int32)
    bits.bitwise_left_shift_(_CODE_SHIFT).bitwise_and_(_CODE_MASK)
    return bits.view(torch.float32).mul_(_CODE_SCALE)


# The least scale value `client_in_float32` takes with a 16-bit client: its products with float8 codes stay float32
# normals or exact subnormals (2^-120 times the smallest code, 2^-9, with 11 significant bits: lowest bit 2^-139).
_LEAST_EXACT_SCALE = 2.0**-120


def client_in_float32(scale: torch.Tensor, layout: Codec) -> bool:
    """Whether float32 arithmetic gives the client's q * scale bit for bit (`client_values`, several times faster on
    the CPU than the float64 of `dequantize`). It does where the client multiplies in float32 (one correctly rounded
    product either way), and where every scale value has at most 11 significant bits and is at least 2^-120
    (bfloat16 and float16 scales, E8M0 powers of two): the product with a float8 code (4 significant bits) then has
    at most 15, exact in float32, and only the client's own rounding to its 16-bit dtype remains. An overflow of
    float32 is one of the client's too: past float32's largest value, bfloat16 and float16 round to inf as well."""
    client = layout.client_dtype(scale.dtype)
    if client == torch.float32:
        return True
    if client not in (torch.bfloat16, torch.float16):
        return False
    values = layout.decode_scale(scale).float()
    if not values.numel():
        return True
    beyond_11_bits = values.view(torch.int32) & 0x1FFF  # float32 keeps 23 mantissa bits; 11 significant keep 10
    return not bool(beyond_11_bits.any()) and float(values.abs().min()) >= _LEAST_EXACT_SCALE


def client_values(q: torch.Tensor, scale: torch.Tensor, layout: Codec) -> torch.Tensor:
    """Rows of q * scale as the client computes them, in float32 (which holds them exactly): `dequantize`'s numbers
    with `strict`, where `client_in_float32(scale, layout)`. `scale`: the rows' scale (`Layout.scale_rows`)."""
    values = fp8_values(q).mul_(layout.broadcast(layout.decode_scale(scale).float(), q.shape))
    client = layout.client_dtype(scale.dtype)
    return values if client == torch.float32 else values.to(client).float()


def error_sums(
    w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, layout: Codec, bands: int = 2, whole: bool = False
) -> torch.Tensor:
    """What the manifest's statistics are made of, as one float64 vector on the weight's device (so that a GPU
    computes them without stopping): squared error and squared weight summed over a few bands of rows spread
    over the tensor, the largest error there, the smallest and largest scale, and -1. `whole`: over every row
    instead, and the last the number of values the client does not get back bit for bit (a conversion's exactness
    check: its source values came from a quantized checkpoint, and may all come through). `error_stats` reads them."""
    rows, cols = w.shape
    if whole:
        # Small bands: the float64 temporaries of each stay a few MB, so the check adds nothing to the peak memory.
        ranges = [(a, b) for a, b, _ in row_bands(rows, cols, layout, CHECK_ELEMENTS)]
    else:
        # Bands of 16 rows, starting on a tile row for block scales (whose 128-row tiles would cost 8x as much).
        step = layout.sample_step
        starts = sorted({(rows * i // bands) // step * step for i in range(bands)})
        ranges = [(a, min(rows, a + BAND_ROWS)) for a in starts]
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    diff_sq, ref_sq, max_abs, inexact = zero, zero, zero, zero - (0 if whole else 1)
    for a, b in ranges:
        # In float64: the squares of float32 weights near their maximum would overflow in float32.
        diff = dequantize(q[a:b], s[layout.scale_rows(a, b)], layout, torch.float64) - w[a:b].double()
        diff_sq = diff_sq + diff.square().sum()
        ref_sq = ref_sq + w[a:b].double().square().sum()
        if whole:
            inexact = inexact + (diff != 0).sum()
        if diff.numel():
            max_abs = torch.maximum(max_abs, diff.abs().max())
    # Scales decode monotonically (MX exponents too): decode only the smallest and the largest.
    scale = (torch.stack([s.min(), s.max()]) if s.numel() else s).reshape(-1)
    scale = layout.decode_scale(scale).double()
    if not scale.numel():
        scale = zero.reshape(1)
    return torch.stack([diff_sq, ref_sq, max_abs, scale.min(), scale.max(), inexact])


def error_stats(sums: list[float]) -> dict[str, float | int | bool]:
    """Scale range and the dequantization error, from `error_sums` (read back to the host); where every value was
    compared, whether all came through (`exact`) and how many did not."""
    diff_sq, ref_sq, max_abs, scale_min, scale_max, inexact = sums
    stats: dict[str, float | int | bool] = {
        "scale_min": scale_min,
        "scale_max": scale_max,
        "rel_error": (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0,
        "max_abs_error": max_abs,
    }
    if inexact >= 0:
        stats.update(exact=inexact == 0, inexact_values=int(inexact))
    return stats


def scale_is_finite(scale: torch.Tensor) -> bool:
    """False when the weight held NaN or inf (its scale then does too; see `quantize`)."""
    return bool(torch.isfinite(scale).all())


def float_scale_problem(scale: torch.Tensor, extra: list[tuple[torch.Tensor, str]] | None = None) -> str | None:
    """What makes float scale values unusable, in words, or None: an integer dtype is no scale, and a NaN, inf,
    zero or negative scale ruins its whole row, tile or tensor; `extra`: (mask over the float32 values, what)
    that a layout adds."""
    if not scale.dtype.is_floating_point:
        return f"dtype {str(scale.dtype).removeprefix('torch.')}, not a float"
    values = scale.float()
    kinds = [
        (torch.isnan(values), "NaN"),
        (torch.isinf(values), "inf"),
        (values == 0, "zero"),
        (values < 0, "negative"),
        *(extra or []),
    ]
    found = [(int(mask.sum()), what) for mask, what in kinds if bool(mask.any())]
    if not found:
        return None
    return ", ".join(f"{n} {what}" for n, what in found) + f" of its {values.numel()} scale values"
