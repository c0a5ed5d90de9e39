"""The chunked, threaded CPU kernel gives the bits of the whole-tensor math; edge cases are safe."""

from __future__ import annotations

import pytest
import torch

from fp8q.engine import devices as quantizer_module
from fp8q.engine.devices import CpuQuantizer
from fp8q.layouts import find, numerics
from fp8q.layouts.numerics import NonFiniteWeight, dequantize, quantize
from tests.factories import as_bytes

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
            got = numerics.abs_max(t, dim)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])
    tiles = finite[:4].reshape(2, 2, 4, 16)
    assert torch.equal(numerics.abs_max(tiles, (1, 3)), tiles.abs().amax(dim=(1, 3), keepdim=True))
