"""The CUDA path gives the CPU path's bits, whole checkpoints included. Runs where torch sees a GPU."""

from __future__ import annotations

import pytest
import torch

from fp8q import QuantizeOptions, quantize
from fp8q.quantizer import CpuQuantizer, CudaQuantizer
from tests.factories import as_bytes, load_all, tiny_qwen3_moe
from tests.test_numerics import LAYOUTS

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason=f"no CUDA device visible to torch {torch.__version__} on this machine"
)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x.scheme.value}-{x.format.value}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_bits_equal_cpu_bits(layout, dtype):
    w = (torch.randn(1000, 777) * 0.05).to(dtype).pin_memory()
    cpu = CpuQuantizer(layout, workers=1)
    cuda = CudaQuantizer(layout, torch.device("cuda"))
    q_cpu, s_cpu = cpu.result(cpu.submit(w))
    q_gpu, s_gpu = cuda.result(cuda.submit(w))
    cuda.close()
    assert torch.equal(as_bytes(q_cpu), as_bytes(q_gpu))
    assert torch.equal(s_cpu, s_gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,fmt", [("channel", "compressed-tensors"), ("block", "fp8")])
def test_cuda_checkpoint_equals_cpu_checkpoint(tmp_path, scheme, fmt):
    src = tiny_qwen3_moe(tmp_path / "src")
    quantize(src, tmp_path / "cpu", QuantizeOptions(scheme=scheme, format=fmt, device="cpu"))
    quantize(src, tmp_path / "gpu", QuantizeOptions(scheme=scheme, format=fmt, device="cuda"))
    cpu, gpu = load_all(tmp_path / "cpu"), load_all(tmp_path / "gpu")
    assert sorted(cpu) == sorted(gpu)
    for name in cpu:
        assert torch.equal(as_bytes(cpu[name]), as_bytes(gpu[name])), name
