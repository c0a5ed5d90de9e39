"""FP8 quantization math, bit-identical to each layout's reference tool.

Imports: torch, formats. Pure: tensors in, tensors out, on whatever device they live on.

- compressed-tensors (llm-compressor `model_free_ptq`): amax, scale = amax / 448 and q = x / scale,
  all in the weight's own dtype; zero scales become that dtype's eps; edge tiles zero-padded.
- fp8 per-tensor (vLLM `scaled_fp8_quant`): float32 amax, scale = amax / 448, q = x * (1 / scale).
- fp8 block (vLLM's copy of DeepGEMM `per_block_cast_to_fp8`): float32 tile amax clamped at 1e-4,
  scale = amax / 448, q = x * (1 / scale); with ue8m0 scales (`use_ue8m0=True`) the scale is first
  rounded up to a power of two, 2^ceil(log2(scale)) with vLLM's float32 log2.
- MXFP8 (compressed-tensors `calculate_qparams` with an E8M0 uint8 scale): per group of 32 along the
  input dim, in the weight's dtype: amax rounded to a power of two (up when its mantissa is at least
  0.75), exponent - 8 (the e4m3 largest power of two), biased by 127 and clamped to [0, 255]; the
  scale 2^(exponent - 127) in the weight's dtype (1 where that underflows), q = x / scale.

No clamp before the cast, and none is needed: with |x| <= amax, x / (amax / 448) rounds to at most
448 * (1 + 2^-7) < 464, which float8_e4m3fn's round-to-nearest-even takes to 448 (464 is the midpoint
to the next, non-existent, 480), whatever the rounding of the scale; NaN and inf are refused before.
So every reference's clamp is a no-op here, and skipping it saves a pass over the data. The cast
happens in `copy_` straight into the output, without an intermediate float8 tensor.

Kernels work on row ranges so a CPU caller can walk a tensor in cache-sized chunks, on several
threads, and get exactly the bits of the whole-tensor computation: every step is elementwise or
reduces within a row (channel) or within a band of block rows (block); per-tensor schemes reduce
the amax first and then quantize with the one scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import EllipsisType

import torch

from fp8q.layouts.formats import MX_GROUP, Format, Layout, ScaleFormat, Scheme

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0

# Same bits on every device: only operations whose result IEEE fixes (one correctly rounded step) are used.
# PyTorch on CUDA computes `tensor / python_scalar` as `tensor * (1 / scalar)`, which is not correctly
# rounded (1/448 is no binary fraction), while the CPU divides; so scales divide by a 448 *tensor* on the
# weight's own device (a CPU tensor would take the same shortcut), and `1 / scale` is `torch.reciprocal`,
# a correctly rounded division on both. tests/test_numerics.py records every division by a Python number.
# DeepGEMM's amax floor for block scales.
DEEPGEMM_AMAX_FLOOR = 1e-4


class NonFiniteWeight(ValueError):
    """The weight holds NaN or inf: no scale can represent it."""


def scale_dtype(layout: Layout, weight_dtype: torch.dtype) -> torch.dtype:
    if layout.scheme is Scheme.MX:
        return torch.uint8
    return weight_dtype if layout.format is Format.COMPRESSED_TENSORS else torch.float32


def empty_outputs(
    w: torch.Tensor, layout: Layout, pin: bool = False, q: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized weight (`q` if given) and a new scale for `w`, on w's device (or pinned host memory)."""
    rows, cols = w.shape
    device = torch.device("cpu") if pin else w.device
    if q is None:
        q = torch.empty((rows, cols), dtype=FP8, device=device, pin_memory=pin)
    s = torch.empty(layout.scale_shape(rows, cols), dtype=scale_dtype(layout, w.dtype), device=device, pin_memory=pin)
    return q, s


def quantize(w: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a whole 2-D weight on its own device. Returns (q, scale).

    Raises:
        NonFiniteWeight: NaN or inf in the weight, on the CPU. On a GPU the check would stop the host for
            every tensor, so there the scale comes out NaN or inf instead, for the caller to check once it
            is on the host anyway (`scale_is_finite`).
    """
    q, s = empty_outputs(w, layout)
    tensor_scale = amax_to_tensor_scale(tensor_amax(w, 0, w.shape[0], layout), w.dtype, layout)
    quantize_rows(w, q, s, 0, w.shape[0], layout, tensor_scale)
    return q, s


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent in float32, exactly (an integer tensor in; subnormal or inf at the ends)."""
    return torch.ldexp(torch.ones(exponent.shape, dtype=torch.float32, device=exponent.device), exponent)


def _log2_of_pow2(x: torch.Tensor) -> torch.Tensor:
    """log2 of powers of two, exactly, as int32 (-inf for 0 and +inf for inf are the caller's to mind)."""
    _, exponent = torch.frexp(x.float())  # x = 0.5 * 2^exponent
    return exponent.to(torch.int32) - 1


def row_step(layout: Layout) -> int:
    """Row ranges handed to `quantize_rows` must start at a multiple of this."""
    return layout.block[0] if layout.scheme is Scheme.BLOCK else 1


def tensor_amax(w: torch.Tensor, r0: int, r1: int, layout: Layout) -> torch.Tensor | None:
    """Per-tensor schemes: the amax of rows [r0, r1) (combine ranges with max). Others: None."""
    if layout.scheme is not Scheme.TENSOR:
        return None
    x = w[r0:r1]
    if x.numel() == 0:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    amax = abs_max(x)
    _check_finite(amax)
    return amax


def amax_to_tensor_scale(amax: torch.Tensor | None, dtype: torch.dtype, layout: Layout) -> torch.Tensor | None:
    """The one scale of a per-tensor scheme, from the whole tensor's amax."""
    if amax is None:
        return None
    if layout.format is Format.COMPRESSED_TENSORS:
        return _ct_scale(amax.to(dtype))
    scale = _over_fp8_max(amax.float())
    # vLLM has no guard here (an all-zero weight would give NaN); any positive scale gives q = 0.
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_rows(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    r0: int,
    r1: int,
    layout: Layout,
    tensor_scale: torch.Tensor | None = None,
) -> None:
    """Quantize rows [r0, r1) of w into q, and their scales into s.

    Raises:
        NonFiniteWeight: NaN or inf in these rows.
    """
    x = w[r0:r1]
    if x.numel() == 0:
        if layout.scheme is not Scheme.TENSOR and s.numel():
            s[_scale_rows(layout, r0, r1)] = 1
        elif layout.scheme is Scheme.TENSOR and tensor_scale is not None:
            s.copy_(tensor_scale.reshape(s.shape))
        return
    if layout.scheme is Scheme.CHANNEL:
        amax = abs_max(x, dim=1)
        _check_finite(amax)
        scale = _ct_scale(amax)
        q[r0:r1].copy_(x / scale)
        s[r0:r1] = scale
    elif layout.scheme is Scheme.TENSOR:
        assert tensor_scale is not None
        if layout.format is Format.COMPRESSED_TENSORS:
            q[r0:r1].copy_(x / tensor_scale)
        else:
            q[r0:r1].copy_(x.float() * torch.reciprocal(tensor_scale))
        if r0 == 0:
            s.copy_(tensor_scale.reshape(s.shape))
    elif layout.scheme is Scheme.MX:
        _quantize_mx_rows(x, q[r0:r1], s[r0:r1])
    else:
        _quantize_block_band(x, q[r0:r1], s[_scale_rows(layout, r0, r1)], layout)


def _quantize_mx_rows(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    groups = x.unflatten(-1, (-1, MX_GROUP))
    amax = abs_max(groups, dim=-1, keepdim=False)
    _check_finite(amax)
    scale = _pow2(mx_exponent(amax) - 127).to(x.dtype)
    # compressed-tensors' zero guard for uint8 scales is 1: only a float16 scale that underflowed meets it.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    # Dividing by a power of two is exact; the clamp only bites where a guarded scale of 1 left big values.
    q.copy_((groups / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).flatten(-2))
    s.copy_((127 + _log2_of_pow2(scale)).to(torch.uint8))


# The mantissa and exponent widths of the dtypes MX amaxes come in; compressed-tensors rounds with their bits.
_BITS = {torch.bfloat16: (7, 8, torch.int16), torch.float16: (10, 5, torch.int16), torch.float32: (23, 8, torch.int32)}


def mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The biased E8M0 exponent of each group's scale, from its amax in the weight's dtype (int32 in [0, 255])."""
    mantissa, exponent_bits, int_dtype = _BITS[amax.dtype]
    bits = amax.view(int_dtype).to(torch.int64) & ((1 << (8 * amax.element_size())) - 1)
    # Round to a power of two: up when the mantissa's top two bits are set (its fraction is 0.75 or more).
    rounded = (bits + (1 << (mantissa - 2))) & (((1 << (exponent_bits + 1)) - 1) << mantissa)
    width = 8 * amax.element_size()
    signed = torch.where(rounded >= 1 << (width - 1), rounded - (1 << width), rounded).to(int_dtype)
    p2 = signed.view(amax.dtype).float()
    exponent = 127 + _log2_of_pow2(p2) - 8  # 8: log2 of e4m3's largest power of two, 256 (448 = 1.75 x 256)
    exponent = torch.where(p2 == 0, torch.zeros_like(exponent), exponent)
    exponent = torch.where(torch.isinf(p2), torch.full_like(exponent, 255), exponent)
    return exponent.clamp(0, 255)


def mx_scale_values(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 uint8 exponents as the scales they stand for, in bfloat16 as compressed-tensors decodes them."""
    return _pow2(scale.to(torch.int32) - 127).to(torch.bfloat16)


def _ceil_pow2_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """vLLM's `_ceil_to_ue8m0`: 2^ceil(log2(scale)) with log2 in float32. float32's log2 is taken as the
    correctly rounded one, from a float64 log2 (exact to far below float32's rounding), so that every device
    gives the same bits; at most a couple of float32 ulps above a power of two it rounds down to it, as
    vLLM's does."""
    exponent = torch.ceil(torch.log2(scale.double()).float()).to(torch.int32)
    return _pow2(exponent)


def _scale_rows(layout: Layout, r0: int, r1: int) -> slice:
    if layout.scheme is Scheme.BLOCK:
        return slice(r0 // layout.block[0], math.ceil(r1 / layout.block[0]))
    return slice(r0, r1)


def tile(layout: Layout, rows: int, cols: int) -> tuple[int, int]:
    """The block tile as it covers a band of `rows` x `cols` (starting on a tile row): a side longer than the band
    covers all of it, the very same scales without padding it out to the block (a 99999999x1 block would be
    gigabytes of zeros)."""
    return max(1, min(layout.block[0], rows)), max(1, min(layout.block[1], cols))


def kernel_bytes(layout: Layout, rows: int, cols: int, itemsize: int) -> int:
    """The most the kernel's temporaries take to quantize a band of rows x cols at once: its tiles padded out (block),
    a float32 copy and the product."""
    if layout.scheme is Scheme.BLOCK:
        bh, bw = tile(layout, rows, cols)
        rows, cols = math.ceil(rows / bh) * bh, math.ceil(cols / bw) * bw
    return rows * cols * (itemsize + 8)


def _quantize_block_band(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, layout: Layout) -> None:
    rows, cols = x.shape
    bh, bw = tile(layout, rows, cols)
    nbr, nbc = math.ceil(rows / bh), math.ceil(cols / bw)
    # Zero padding leaves every edge tile's amax to its real elements, as both references do.
    padded = torch.nn.functional.pad(x, (0, nbc * bw - cols, 0, nbr * bh - rows))
    tiles = padded.view(nbr, bh, nbc, bw)
    if layout.format is Format.COMPRESSED_TENSORS:
        amax = abs_max(tiles, dim=(1, 3))
        _check_finite(amax)
        scale = _ct_scale(amax)
        qt = tiles / scale
    else:
        amax = abs_max(tiles, dim=(1, 3)).float()  # exact: the max of the float32 values is the same number
        _check_finite(amax)
        scale = _over_fp8_max(amax.clamp(min=DEEPGEMM_AMAX_FLOOR))
        if layout.scale_format is ScaleFormat.UE8M0:
            scale = _ceil_pow2_ue8m0(scale)
        qt = tiles.float() * torch.reciprocal(scale)
    q.copy_(qt.view(nbr * bh, nbc * bw)[:rows, :cols])
    s.copy_(scale.view(nbr, nbc))


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


def _ct_scale(amax: torch.Tensor) -> torch.Tensor:
    # Computed in the weight's dtype, like compressed-tensors' calculate_qparams: bf16 scales for bf16.
    scale = _over_fp8_max(amax)
    eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def _over_fp8_max(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, correctly rounded in amax's dtype on any device (see the note at FP8_MAX)."""
    return amax / torch.full((), FP8_MAX, dtype=amax.dtype, device=amax.device)


def _check_finite(amax: torch.Tensor) -> None:
    if amax.device.type != "cpu":
        return  # see `quantize`: NaN or inf amax gives a NaN or inf scale, checked by the caller
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteWeight("holds NaN or inf values")


# Elements dequantized at a time: bounds the float64 temporaries of a band (8 MB) whatever the weight size.
BAND_ELEMENTS = 1 << 20


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, layout: Layout, dtype: torch.dtype = torch.bfloat16, *, strict: bool = False
) -> torch.Tensor:
    """w ~ q * scale, as the client of the layout computes it, cast to `dtype`. `q` may be a band of rows
    with the matching rows of the scale (whole tile rows for block).

    - compressed-tensors (its `dequantize` in quantization/lifecycle/forward.py, which transformers'
      `CompressedTensorsConfig(dequantize=True)` runs): `q.to(scale.dtype) * scale`: the product is
      rounded to the scale's dtype (bf16 for llm-compressor output).
    - fp8 (transformers `Fp8Dequantize`, DeepSeek-V3 `weight_dequant`): `q.float() * scale.float()`.

    The product is first taken exactly (float64 holds any float8 x float32 product), then rounded once to
    the client's dtype, which gives the client's bits. Where the client's dtype cannot hold it (float16
    weights near 65504, say) the client gets inf; `strict` keeps that inf (what verify checks), otherwise
    the exact product is rounded to `dtype` instead, so no overflow of the client's makes a weight inf.
    """
    client_type = client_dtype(layout, scale.dtype)
    if layout.scheme is Scheme.MX:
        scale = mx_scale_values(scale)  # compressed-tensors decodes E8M0 to bfloat16, and multiplies in it
    exact = q.double() * _broadcast(scale.double(), layout, q.shape)
    client = exact.to(client_type)
    if strict:
        return client.to(dtype)
    overflowed = torch.isinf(client) & torch.isfinite(exact)  # no test of it on the host: a GPU never waits
    return torch.where(overflowed, exact, client.double()).to(dtype)


def client_dtype(layout: Layout, scale_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layout's client multiplies q by its scale in: the scale's own for compressed-tensors (bfloat16
    for MX's decoded exponents), float32 for fp8."""
    if layout.format is Format.FP8:
        return torch.float32
    return torch.bfloat16 if layout.scheme is Scheme.MX else scale_dtype


def client_overflows(q: torch.Tensor, scale: torch.Tensor, layout: Layout) -> bool:
    """Whether the client's q * scale overflows to inf anywhere (a float16 weight near 65504, say). A bound from the
    scales alone clears nearly every weight without reading q: |q| <= 448, and a product below the dtype's largest
    value rounds to at most that value."""
    if not scale.numel() or not q.numel():
        return False
    values = mx_scale_values(scale) if layout.scheme is Scheme.MX else scale
    if float(values.double().abs().max()) * FP8_MAX < torch.finfo(client_dtype(layout, scale.dtype)).max:
        return False
    rows, cols = q.shape
    return not all(
        bool(torch.isfinite(dequantize(q[r0:r1], scale[scale_rows], layout, torch.float64, strict=True)).all())
        for r0, r1, scale_rows in row_bands(rows, cols, layout)
    )


def _broadcast(scale: torch.Tensor, layout: Layout, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The scale spread over the weight's shape: one per tensor, row or tile."""
    rows, cols = shape
    if layout.scheme is Scheme.TENSOR:
        return scale.reshape(())
    if layout.scheme is Scheme.CHANNEL:
        return scale.reshape(-1, 1)
    if layout.scheme is Scheme.MX:
        return scale.repeat_interleave(MX_GROUP, 1)
    bh, bw = tile(layout, rows, cols)
    return scale.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]


def row_bands(rows: int, cols: int, layout: Layout) -> Iterator[tuple[int, int, slice | EllipsisType]]:
    """Row ranges [r0, r1) of about `BAND_ELEMENTS` elements, whole block rows each, with the scale rows they
    use (all of a per-tensor scale)."""
    step = row_step(layout)
    band = max(step, BAND_ELEMENTS // max(cols, 1) // step * step)
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        yield r0, r1, (... if layout.scheme is Scheme.TENSOR else _scale_rows(layout, r0, r1))


def scale_problem(scale: torch.Tensor, layout: Layout) -> str | None:
    """What makes these scale values unusable, in words, or None: an integer dtype is no scale (but an MX
    scale's E8M0 exponent, where 255 is NaN), and a NaN, inf, zero or negative scale ruins its whole row,
    tile or tensor."""
    if layout.scheme is Scheme.MX:
        if scale.dtype != torch.uint8:
            return f"dtype {str(scale.dtype).removeprefix('torch.')}, not uint8 E8M0 exponents"
        nans = int((scale == 255).sum())
        return f"{nans} NaN (E8M0 255) of its {scale.numel()} scale values" if nans else None
    if not scale.dtype.is_floating_point:
        return f"dtype {str(scale.dtype).removeprefix('torch.')}, not a float"
    values = scale.float()
    kinds = [
        (torch.isnan(values), "NaN"),
        (torch.isinf(values), "inf"),
        (values == 0, "zero"),
        (values < 0, "negative"),
    ]
    if layout.scale_format is ScaleFormat.UE8M0:
        mantissa, _ = torch.frexp(values)
        kinds.append((torch.isfinite(values) & (values > 0) & (mantissa != 0.5), "not-a-power-of-two (ue8m0)"))
    found = [(int(mask.sum()), what) for mask, what in kinds if bool(mask.any())]
    if not found:
        return None
    return ", ".join(f"{n} {what}" for n, what in found) + f" of its {values.numel()} scale values"


def nan_codes(q: torch.Tensor) -> int:
    """How many float8_e4m3fn NaN codes (0x7f and 0xff; the format has no inf) a weight holds."""
    return int(((q.view(torch.uint8) & 0x7F) == 0x7F).sum())


# Rows per band that error_sums samples.
BAND_ROWS = 16


def error_sums(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, layout: Layout, bands: int = 2) -> torch.Tensor:
    """What the manifest's statistics are made of, as one float64 vector on the weight's device (so that a GPU
    computes them without stopping): squared error and squared weight summed over a few bands of rows spread
    over the tensor, the largest error there, and the smallest and largest scale. `error_stats` reads them."""
    rows = w.shape[0]
    # Bands of 16 rows, starting on a tile row for block scales (whose 128-row tiles would cost 8x as much).
    step = row_step(layout) if layout.scheme is Scheme.BLOCK else BAND_ROWS
    starts = sorted({(rows * i // bands) // step * step for i in range(bands)})
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    diff_sq, ref_sq, max_abs = zero, zero, zero
    for a in starts:
        b = min(rows, a + BAND_ROWS)
        band_scale = s if layout.scheme is Scheme.TENSOR else s[_scale_rows(layout, a, b)]
        # In float64: the squares of float32 weights near their maximum would overflow in float32.
        diff = dequantize(q[a:b], band_scale, layout, torch.float64) - w[a:b].double()
        diff_sq = diff_sq + diff.square().sum()
        ref_sq = ref_sq + w[a:b].double().square().sum()
        if diff.numel():
            max_abs = torch.maximum(max_abs, diff.abs().max())
    # MX exponents map to scales monotonically: decode only the smallest and the largest.
    scale = (torch.stack([s.min(), s.max()]) if s.numel() else s).reshape(-1)
    scale = (mx_scale_values(scale) if layout.scheme is Scheme.MX else scale).double()
    if not scale.numel():
        scale = zero.reshape(1)
    return torch.stack([diff_sq, ref_sq, max_abs, scale.min(), scale.max()])


def error_stats(sums: list[float]) -> dict[str, float]:
    """Scale range and the dequantization error, from `error_sums` (read back to the host)."""
    diff_sq, ref_sq, max_abs, scale_min, scale_max = sums
    return {
        "scale_min": scale_min,
        "scale_max": scale_max,
        "rel_error": (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0,
        "max_abs_error": max_abs,
    }


def scale_is_finite(scale: torch.Tensor) -> bool:
    """False when the weight held NaN or inf (its scale then does too; see `quantize`)."""
    return bool(torch.isfinite(scale).all())
