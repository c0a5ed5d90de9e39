"""The CUDA path gives the CPU path's bits, whole checkpoints included; its asynchronous pipeline still
names a NaN weight. Runs where torch sees a GPU (the bits rule is also checked on the CPU, in
tests/layouts/test_numerics.py, by recording every division by a Python number)."""

from __future__ import annotations

import json

import pytest
import torch

from fp8q import QuantizeOptions, quantize
from fp8q.engine.devices import CpuQuantizer, CudaQuantizer
from fp8q.errors import UnsupportedTensorError
from fp8q.output.manifest import Progress
from tests.layouts.test_numerics import LAYOUTS
from tests.support.factories import as_bytes, load_all, tiny_qwen3_moe, write_shards

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason=f"no CUDA device visible to torch {torch.__version__} on this machine"
)
CHECKPOINT_LAYOUTS = [
    ("channel", "compressed-tensors"),
    ("block", "compressed-tensors"),
    ("tensor", "compressed-tensors"),
    ("tensor", "fp8"),
    ("block", "fp8"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1000, 777), (1024, 512)], ids=["odd", "aligned"])
def test_cuda_bits_equal_cpu_bits(layout, dtype, shape):
    w = (torch.randn(shape) * 0.05).to(dtype)
    w[:128, :128] = 0  # an all-zero tile
    w = w.pin_memory()
    cpu = CpuQuantizer(layout, workers=1)
    cuda = CudaQuantizer(layout, torch.device("cuda"))
    q_cpu, s_cpu = cpu.result(cpu.submit(w))
    q_gpu, s_gpu = cuda.result(cuda.submit(w))
    cuda.close()
    assert torch.equal(as_bytes(q_cpu), as_bytes(q_gpu))
    assert torch.equal(as_bytes(s_cpu), as_bytes(s_gpu))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,fmt", CHECKPOINT_LAYOUTS)
def test_cuda_checkpoint_equals_cpu_checkpoint(tmp_path, scheme, fmt):
    src = tiny_qwen3_moe(tmp_path / "src")
    options = {"scheme": scheme, "format": fmt, "load_check": False}
    quantize(src, tmp_path / "cpu", QuantizeOptions(device="cpu", **options))
    quantize(src, tmp_path / "gpu", QuantizeOptions(device="cuda", **options))
    cpu, gpu = load_all(tmp_path / "cpu"), load_all(tmp_path / "gpu")
    assert sorted(cpu) == sorted(gpu)
    for name in cpu:
        assert torch.equal(as_bytes(cpu[name]), as_bytes(gpu[name])), name
    files = [json.loads((tmp_path / d / "fp8q.json").read_text())["files"] for d in ("cpu", "gpu")]
    assert files[0] == files[1]


@pytest.mark.gpu
def test_cuda_fused_experts_equal_cpu(tmp_path):
    E, H, I = 4, 256, 192  # noqa: E741
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": (torch.randn(E, H, 2 * I) * 0.05).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": (torch.randn(E, I, H) * 0.05).to(torch.bfloat16),
    }
    config = {"model_type": "gpt_oss", "hidden_size": H}
    src = write_shards(tmp_path / "src", {"model.safetensors": tensors}, index=False, config=config)
    for device in ("cpu", "cuda"):  # no engine loads gpt-oss FP8 experts (refused by default): the bytes matter here
        quantize(src, tmp_path / device, QuantizeOptions(device=device, load_check=False))
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (
        tmp_path / "cuda" / "model.safetensors"
    ).read_bytes()


@pytest.mark.gpu
def test_nan_weight_on_cuda_is_named(tmp_path):
    shards = {}
    for i in range(3):
        w = (torch.randn(256, 128) * 0.05).to(torch.bfloat16)
        if i == 2:
            w[7, 7] = float("nan")
        shards[f"model-{i + 1:05d}-of-00003.safetensors"] = {f"model.layers.{i}.mlp.up_proj.weight": w}
    src = write_shards(tmp_path / "src", shards, config={"model_type": "llama"})
    with pytest.raises(UnsupportedTensorError, match="tensor model.layers.2.mlp.up_proj.weight .* holds NaN or inf"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cuda"))
    assert not (tmp_path / "out").exists()
    # The two shards finished before the failing one are kept for --resume (written in order: both are recorded).
    done = set(Progress(tmp_path / "out.partial", {}).done())
    assert done == {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"}
