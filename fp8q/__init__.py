"""fp8q: stream a Hugging Face safetensors checkpoint into an FP8 checkpoint that loads everywhere.

Example:
    >>> import fp8q
    >>> report = fp8q.quantize("model", "model-fp8")  # per-channel, compressed-tensors
    >>> fp8q.quantize("model", "model-fp8-block", fp8q.QuantizeOptions(scheme="block", format="fp8"))
    >>> fp8q.verify("model-fp8", source="model").ok
    >>> fp8q.dequantize("model-fp8", "model-bf16")
"""

__version__ = "0.1.0"

from fp8q.dequantize import DequantizeReport, dequantize  # noqa: E402, I001 - after pipeline, which it imports
from fp8q.errors import Fp8qError  # noqa: E402
from fp8q.formats import Format, Scheme  # noqa: E402
from fp8q.pipeline import PlanReady, QuantizeOptions, Report, TensorDone, plan_conversion, quantize  # noqa: E402
from fp8q.verify import VerifyReport, verify  # noqa: E402

__all__ = [
    "DequantizeReport",
    "VerifyReport",
    "dequantize",
    "verify",
    "Format",
    "Fp8qError",
    "PlanReady",
    "QuantizeOptions",
    "Report",
    "Scheme",
    "TensorDone",
    "__version__",
    "plan_conversion",
    "quantize",
]
