"""The chunked, threaded CPU kernel gives the bits of the whole-tensor math; edge cases are safe."""

from __future__ import annotations

import pytest
import torch

from fp8q.engine import devices as quantizer_module
from fp8q.engine.devices import CpuQuantizer
from fp8q.layouts import find, kernels, numerics
from fp8q.layouts.kernels import NonFiniteWeight
from fp8q.layouts.numerics import dequantize, quantize
from tests.support.factories import as_bytes

LAYOUTS = [
    find("channel", "compressed-tensors"),
    find("block", "compressed-tensors"),
    find("tensor", "compressed-tensors"),
    find("tensor", "fp8"),
    find("block", "fp8"),
    find("block", "fp8", block=(64, 32)),
]
IDS = [x.describe() for x in LAYOUTS]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("shape", [(300, 130), (1, 5), (513, 257)])
def test_chunked_threads_match_whole_tensor(layout, shape, monkeypatch):
    monkeypatch.setattr(quantizer_module, "CHUNK_BYTES", 1024)  # many chunks per tensor
    w = (torch.randn(shape) * 0.1).to(torch.bfloat16)
    q_ref, s_ref = quantize(w, layout)
    cpu = CpuQuantizer(layout, workers=2)
    q, s = cpu.result(cpu.submit(w))
    cpu.close()
    assert torch.equal(as_bytes(q), as_bytes(q_ref))
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_zero_weight_gets_finite_positive_scales(layout):
    q, s = quantize(torch.zeros(200, 140, dtype=torch.bfloat16), layout)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    assert bool((q.float() == 0).all())


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused(layout, bad):
    w = torch.randn(150, 140, dtype=torch.bfloat16)
    w[149, 3] = bad
    with pytest.raises(NonFiniteWeight):
        quantize(w, layout)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_round_trip_error_is_small_and_amax_maps_to_448(layout):
    w = torch.randn(256, 384) * 0.02
    q, s = quantize(w.to(torch.bfloat16), layout)
    assert q.float().abs().max() == 448.0
    err = (dequantize(q, s, layout, torch.float32) - w).norm() / w.norm()
    assert err < 0.05
    assert not torch.isnan(q.float()).any()


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_huge_values_saturate_to_448_with_the_exact_scale(layout):
    w = torch.full((4, 4), 3e38, dtype=torch.float32)
    w[0, 0] = 1e-30
    q, s = quantize(w, layout)
    expected = torch.full((4, 4), 448.0)
    expected[0, 0] = 0.0  # 1e-30 / (3e38 / 448) underflows to zero
    assert torch.equal(q.float(), expected)
    assert torch.equal(s.float().unique(), (torch.tensor([3e38]) / torch.tensor([448.0])))


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_values_just_under_a_rounding_edge_saturate(layout):
    # amax/scale rounds to at most 448 * (1 + 2^-7) < 464, which the cast takes to 448: no clamp is needed.
    w = torch.tensor([[1.0, -1.0, 0.5, 0.999]], dtype=torch.bfloat16).repeat(3, 1)
    q, _ = quantize(w, layout)
    assert q.float().abs().max() == 448.0 and not torch.isnan(q.float()).any()
    assert q.float()[0, 0] == 448.0 and q.float()[0, 1] == -448.0


class _ScalarDivisions(torch.overrides.TorchFunctionMode):
    """Records every division of a tensor by a Python number: PyTorch on CUDA turns that into a multiply by
    the reciprocal, whose bits differ from the CPU's division (measured on an H200)."""

    DIVISIONS = {torch.div, torch.true_divide, torch.Tensor.div, torch.Tensor.div_, torch.Tensor.__truediv__}
    DIVISIONS |= {torch.Tensor.__itruediv__, torch.Tensor.true_divide, torch.Tensor.true_divide_}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
        if func in self.DIVISIONS and isinstance(divisor, (int, float)):
            self.found.append(f"{getattr(func, '__name__', func)}(tensor, {divisor!r})")
        return func(*args, **kwargs)


def test_the_recorder_sees_a_division_by_a_python_number():
    with _ScalarDivisions() as mode:
        torch.ones(3) / 448.0
        torch.ones(3).div(2)
        torch.ones(3) / torch.tensor(448.0)  # a tensor divisor is fine
    assert mode.found == ["div(tensor, 448.0)", "div(tensor, 2)"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_no_division_by_a_python_number(layout, dtype):
    """The numerics use only operations whose bits are the same on the CPU and on CUDA."""
    w = (torch.randn(300, 130) * 0.1).to(dtype)
    w[:128, :128] = 0  # an all-zero tile and rows: the guarded branches run too
    with _ScalarDivisions() as mode:
        q, s = quantize(w, layout)
        cpu = CpuQuantizer(layout, workers=2)
        cpu.result(cpu.submit(w))
        cpu.close()
        dequantize(q, s, layout, torch.bfloat16)
    assert mode.found == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_abs_max_is_the_largest_magnitude_for_every_value(dtype):
    """abs_max reads 16-bit floats' magnitudes from their bits: every bit pattern (NaN, inf, -0 and
    subnormals included) must give what `abs().amax()` gives, over rows, tiles and the whole tensor."""
    if dtype == torch.float32:
        gen = torch.Generator().manual_seed(0)
        bits = torch.randint(-(2**31), 2**31, (1 << 16,), dtype=torch.int64, generator=gen).to(torch.int32)
        specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -3.4e38], dtype=dtype)
        x = torch.cat([bits.view(dtype), specials])
    else:
        x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)  # all 65536
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))]
    x = x[: x.numel() // 64 * 64].reshape(-1, 64)
    finite = x.clone()
    finite[~torch.isfinite(finite)] = 0
    for t in (x, finite, finite[:3], torch.zeros(4, 64, dtype=dtype)):
        for dim in (None, 1, (0, 1)):
            want = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
            got = kernels.abs_max(t, dim)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])
    tiles = finite[:4].reshape(2, 2, 4, 16)
    assert torch.equal(kernels.abs_max(tiles, (1, 3)), tiles.abs().amax(dim=(1, 3), keepdim=True))


# ── verify's arithmetic: float32 where it gives the client's bits ──

ALL_CODES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
MX = find("mx", "compressed-tensors")


def test_fp8_values_are_torch_s_own_decoding_for_every_code():
    got, want = numerics.fp8_values(ALL_CODES), ALL_CODES.float()
    numbers = [c for c in range(256) if c not in (0x7F, 0xFF)]
    assert torch.equal(got[numbers].view(torch.int32), want[numbers].view(torch.int32))  # -0.0 and subnormals too
    assert got[0x7F].item() == 480.0 and got[0xFF].item() == -480.0  # NaN codes: nan_codes finds those first


def test_nan_codes_counts_both_signs_and_only_them():
    q = ALL_CODES[torch.randint(0, 256, (300, 200))]
    q.view(torch.uint8)[q.view(torch.uint8) & 0x7F == 0x7F] = 0x7E
    assert numerics.nan_codes(q) == 0
    assert numerics.nan_codes(ALL_CODES[:127]) == 0 and numerics.nan_codes(ALL_CODES[128:255]) == 0
    for positions in ([(0, 0)], [(5, 7), (299, 199)]):
        bad = q.clone()
        for i, (r, c) in enumerate(positions):
            bad.view(torch.uint8)[r, c] = (0x7F, 0xFF)[i % 2]
        assert numerics.nan_codes(bad) == len(positions)


def _random_codes(rows: int, cols: int) -> torch.Tensor:
    q = ALL_CODES[torch.randint(0, 256, (rows, cols))]
    q.view(torch.uint8)[q.view(torch.uint8) & 0x7F == 0x7F] = 0x7E  # 448 in place of a NaN code
    return q


def _scales(layout, rows: int, cols: int, dtype: torch.dtype, exponents: tuple[int, int]) -> torch.Tensor:
    """Random scales of `layout` for a rows x cols weight: random mantissas, exponents in `exponents`."""
    shape = layout.scale_shape(rows, cols)
    if layout.scale_torch_dtype(dtype) == torch.uint8:  # MX: E8M0 exponents
        return torch.randint(127 + exponents[0], 127 + exponents[1], shape, dtype=torch.uint8)
    mantissa = 1 + torch.rand(shape, dtype=torch.float64)
    return torch.ldexp(mantissa, torch.randint(*exponents, shape)).to(dtype)


@pytest.mark.parametrize("layout", [*LAYOUTS, MX], ids=[*IDS, MX.describe()])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("size", ["usual", "tiny", "overflowing"])
def test_client_values_in_float32_are_the_float64_dequantization_bit_for_bit(layout, dtype, size):
    rows, cols = 256, 160
    wide = layout.scale_torch_dtype(dtype) != torch.float16  # float16 scales lie in 2^-24..2^15
    exponents = {"usual": (-20, 2), "tiny": (-120, -110) if wide else (-24, -14), "overflowing": (118, 127)}[size]
    if size == "overflowing" and not wide:
        exponents = (6, 9)  # 448 x 2^8 is past float16's 65504
    scale = _scales(layout, rows, cols, dtype, exponents)
    if scale.dtype != torch.uint8:
        scale = scale.to(layout.scale_torch_dtype(dtype))
    q = _random_codes(rows, cols)
    assert numerics.client_in_float32(scale, layout)
    overflowed = False
    for r0, r1, scale_rows in numerics.row_bands(rows, cols, layout, 1 << 12):
        want = dequantize(q[r0:r1], scale[scale_rows], layout, torch.float32, strict=True)
        got = numerics.client_values(q[r0:r1], scale[scale_rows], layout)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # inf where the client overflows too
        overflowed = overflowed or not bool(torch.isfinite(want).all())
    assert overflowed == (size == "overflowing")


def test_float32_is_refused_where_it_would_round_twice():
    """A 16-bit client whose scales carry more than 11 significant bits (or lie below 2^-120) gets float64: the
    float32 product would be rounded once there and again to the client's dtype."""

    class Bf16Client(type(LAYOUTS[0])):  # compressed-tensors channel, computing in bfloat16 whatever its scale
        def client_dtype(self, scale_dtype):
            return torch.bfloat16

    layout = Bf16Client()
    assert numerics.client_in_float32(torch.tensor([[0.5], [0.75]]), layout)
    assert not numerics.client_in_float32(torch.tensor([[1 + 2**-12]]), layout)
    assert not numerics.client_in_float32(torch.tensor([[2.0**-121]]), layout)
    assert numerics.client_in_float32(torch.tensor([[1 + 2**-12]]), LAYOUTS[0])  # float32 scale: float32 client


def test_may_overflow_clears_usual_scales_and_not_those_near_the_dtype_s_top():
    layout = LAYOUTS[0]
    assert not numerics.may_overflow(torch.full((4, 1), 0.01, dtype=torch.bfloat16), layout)
    assert numerics.may_overflow(torch.full((4, 1), 150.0, dtype=torch.float16), layout)  # 448 x 150 > 65504
