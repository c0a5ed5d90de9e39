"""fp8q: stream a Hugging Face safetensors checkpoint into an FP8 checkpoint that loads everywhere.

Imports: version, and engine.api, layouts.vocabulary, verification, errors, events (each on first use, so that `import
fp8q` stays light).

Example:
    >>> import fp8q
    >>> report = fp8q.quantize("model", "model-fp8")  # per-channel, compressed-tensors
    >>> fp8q.quantize("model", "model-fp8-block", fp8q.Options(scheme="block", format="fp8"))
    >>> fp8q.verify("model-fp8", source="model").ok
    >>> fp8q.dequantize("model-fp8", "model-bf16")
    >>> fp8q.convert("model-fp8", "model-fp8-block", fp8q.Options(scheme="block", format="fp8"))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fp8q.version import __version__

# The API is imported on first use (PEP 562), so that `import fp8q` alone does not import torch:
# the command (fp8q.__main__) decides how torch is imported.
_EXPORTS = {
    "dequantize": "fp8q.engine.api",
    "convert": "fp8q.engine.api",
    "Started": "fp8q.events",
    "Fp8qError": "fp8q.errors",
    "Format": "fp8q.layouts.vocabulary",
    "Scheme": "fp8q.layouts.vocabulary",
    "PlanReady": "fp8q.events",
    "Options": "fp8q.engine.api",
    "QuantizeOptions": "fp8q.engine.api",
    "Report": "fp8q.events",
    "TensorDone": "fp8q.events",
    "plan_conversion": "fp8q.engine.api",
    "quantize": "fp8q.engine.api",
    "VerifyReport": "fp8q.verification",
    "verify": "fp8q.verification",
}

if TYPE_CHECKING:
    from fp8q.engine.api import Options, QuantizeOptions, convert, dequantize, plan_conversion, quantize
    from fp8q.errors import Fp8qError
    from fp8q.events import PlanReady, Report, Started, TensorDone
    from fp8q.layouts.vocabulary import Format, Scheme
    from fp8q.verification import VerifyReport, verify


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fp8q' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Started",
    "VerifyReport",
    "convert",
    "dequantize",
    "verify",
    "Format",
    "Fp8qError",
    "PlanReady",
    "Options",
    "QuantizeOptions",
    "Report",
    "Scheme",
    "TensorDone",
    "__version__",
    "plan_conversion",
    "quantize",
]
