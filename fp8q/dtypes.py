"""The one table of safetensors dtype names, their torch dtypes and sizes.

Imports: torch. `ORDER` is the rank safetensors' own writer sorts tensors by (highest first, then by
name), read off `safetensors.torch.save_file` output; the planner (plan/planner.py) must use the same order to
produce byte-identical files.
"""

from __future__ import annotations

import torch

# name -> (torch dtype, bytes per element); listed in safetensors' ascending sort order.
_TABLE: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),  # power-of-two scales (DeepSeek-V4's)
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "C64": (torch.complex64, 8),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
}

ORDER: dict[str, int] = {name: rank for rank, name in enumerate(_TABLE)}
TORCH_DTYPE: dict[str, torch.dtype] = {name: dt for name, (dt, _) in _TABLE.items()}
ITEMSIZE: dict[str, int] = {name: size for name, (_, size) in _TABLE.items()}
NAME_OF: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPE.items()}

# Source dtypes whose Linear weights can be quantized.
QUANTIZABLE = ("BF16", "F16", "F32")
# Any of these in the input means it is already quantized.
FP8_NAMES = ("F8_E4M3", "F8_E5M2")


def config_name(name: str) -> str:
    """A safetensors dtype name as configs name the dtype (BF16 -> bfloat16)."""
    return str(TORCH_DTYPE[name]).removeprefix("torch.")
