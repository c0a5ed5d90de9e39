"""gpt-oss's MXFP4 experts (`quant_method: mxfp4`, as OpenAI released gpt-oss-20b and -120b): per layer
`mlp.experts.gate_up_proj_blocks` U8 [E, 2I, H/32, 16] and `_scales` U8 [E, 2I, H/32] E8M0 exponents, `down_proj_*`
likewise [E, H, I/32, 16]; their biases, attention (with its sinks), router, embeddings and lm_head in bf16. Read
only.

Imports: torch, layouts (fp4, fp8, inputs), source.checkpoint (types). Decoded as transformers'
`convert_moe_packed_tensors` decodes them for its bf16 GptOss model: code * 2^(byte - 127), exact in bfloat16 short of
under- and overflow, each expert transposed to [in, out] (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]) under the
name without `_blocks`; gate and up stay interleaved (gate even, up odd), as that model's forward reads them.
`convert` refuses it: no engine loads gpt-oss with FP8 experts (vLLM's gpt-oss loader takes bf16, MXFP4 or Quark
ones), so its output would serve nowhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fp8q.layouts.fp4 import Fp4Input, e8m0_problem, e8m0_values, unpack_codes
from fp8q.layouts.fp8 import Fp8Layout
from fp8q.layouts.inputs import register_input

if TYPE_CHECKING:
    from fp8q.source.checkpoint import TensorMeta


@register_input
class GptOssMxfp4(Fp4Input, Fp8Layout):
    key = "gpt-oss-mxfp4"
    quant_method = "mxfp4"
    words = "gpt-oss mxfp4 experts"
    group = 32
    weight_suffix = "_blocks"
    scale_dtypes = ("U8",)
    convert_refusal = (
        "no engine loads gpt-oss with FP8 experts (vLLM's gpt-oss loader takes bf16, MXFP4 or Quark ones), so "
        "the output would serve nowhere; `fp8q dequantize` makes the bf16 model"
    )

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> GptOssMxfp4 | None:
        return cls() if quantization_config.get("quant_method") == "mxfp4" else None

    def is_packed(self, meta: TensorMeta, tensors: Mapping[str, TensorMeta]) -> bool:
        return meta.name.endswith(self.weight_suffix) and meta.dtype in self.packed_dtypes and len(meta.shape) == 4

    def scale_name(self, name: str) -> str:
        return name.removesuffix(self.weight_suffix) + "_scales"

    def output_name(self, name: str) -> str:
        return name.removesuffix(self.weight_suffix)

    def decoded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        experts, rows, groups, _ = shape
        return experts, groups * self.group, rows  # [E, in, out]

    def expected_scale(self, packed: tuple[int, ...]) -> tuple[int, ...] | None:
        experts, rows, groups, half = packed
        return (experts, rows, groups) if half * 2 == self.group else None

    def group_values(self, scale: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        return e8m0_values(scale)

    def dequantize(
        self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, second: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Experts' blocks ([E, out, G, 16], or one expert's [out, G, 16]) as [.., in, out]."""
        codes = unpack_codes(q.reshape(-1, q.shape[-1]))  # one group of 32 a row
        values = (codes * e8m0_values(scale).reshape(-1, 1)).reshape(*q.shape[:-2], q.shape[-2] * self.group)
        return values.transpose(-1, -2).to(dtype)

    def scale_problem(self, scale: torch.Tensor) -> str | None:
        return e8m0_problem(scale)
