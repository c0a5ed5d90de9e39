"""`python bench/ceiling.py quantize SRC OUT ...`: `fp8q` with its quantization replaced by a stand-in that costs
nothing, for `make bench`'s `fp8q-ceiling`: what everything but the kernel costs (reading, writing, hashing,
statistics), the most any device's kernel can reach. Outputs of the right dtypes and shapes, unit scales, and the
weight bytes left as the buffer holds them (whatever that is: a bench output is never used; writing them is a
kernel's cost). The stand-in is put in place of the engine's quantizer from here: fp8q itself has no bench mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8q.engine.stages as stages  # noqa: E402
from fp8q.engine.devices import CpuQuantizer, Quantized, Quantizer, Submitted  # noqa: E402
from fp8q.layouts import numerics  # noqa: E402
from fp8q.layouts.base import Layout  # noqa: E402
from fp8q.models.experts import Part  # noqa: E402


class CeilingQuantizer(CpuQuantizer):
    """The CPU quantizer with its work taken out."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout, workers=1)

    def start(
        self, handle: Submitted, q: torch.Tensor | None = None, part: Part | None = None, whole: bool = False
    ) -> Quantized:
        w = handle.host if part is None else part.take(handle.host)
        q, s = numerics.empty_outputs(w, self.layout, q=q)
        s.fill_(1)
        return Quantized(q, s, numerics.error_sums(w, q, s, self.layout))


def _ceiling(layout: Layout, device: torch.device, workers: int) -> Quantizer:
    return CeilingQuantizer(layout)


if __name__ == "__main__":
    stages.make_quantizer = _ceiling
    sys.argv = ["fp8q", *sys.argv[1:]]
    from fp8q.__main__ import main

    main()
