"""The words a layout is asked for by: `--scheme`, `--format`, `--scale-format`.

Imports: nothing (the CLI reads these without importing torch). Which combinations exist is the registry's to say
(fp8q.layouts.find): a word here is a choice on the command line, not a layout.
"""

from __future__ import annotations

from enum import Enum


class Scheme(str, Enum):
    CHANNEL = "channel"
    BLOCK = "block"
    TENSOR = "tensor"
    MX = "mx"  # MXFP8: groups of 32 along the input dim, E8M0 (power-of-two) scales stored as uint8


class Format(str, Enum):
    COMPRESSED_TENSORS = "compressed-tensors"
    FP8 = "fp8"


class ScaleFormat(str, Enum):
    FLOAT = "float"
    UE8M0 = "ue8m0"  # block scales rounded up to a power of two (DeepGEMM on Blackwell, DeepSeek-V3.1)


__all__ = ["Format", "ScaleFormat", "Scheme"]
