"""The layouts wing: one codec per FP8 layout, each a module of its own, registered by its scheme, format and scale
format. Everything about a layout is its codec's (base.py says what a codec is); the rest of fp8q asks the
registry for one (`find`) and then asks the codec.

    vocabulary.py          --scheme, --format, --scale-format words (no torch: the CLI reads them)
    base.py                the codec base class and the registry
    kernels.py             the kernels the codecs compute with (amax, amax / 448, powers of two, tiles)
    numerics.py            the generic steps that call into a codec; the arithmetic verify checks values with
    clients.py             what an engine does with a layout: the types of each codec's cells
    granularity.py         per-tensor and per-tile scales, shared (and vLLM's tensor-parallel rules for tiles)
    compressed_tensors.py  what the compressed-tensors layouts share (config, client arithmetic, scale rules)
    inputs.py              the layouts fp8q reads and never writes, and their registry; fp4.py: what the FP4 ones
                           share (E2M1 codes, E8M0 scales); ct_mxfp4.py, ct_nvfp4.py, modelopt_nvfp4.py,
                           gpt_oss_mxfp4.py, deepseek_v4.py: one input format each
    fp8.py                 what vLLM's fp8 layouts share
    ct_channel.py, ct_tensor.py, ct_block.py, ct_mx.py, fp8_tensor.py, fp8_block.py: one layout each
    detect.py              the layout of a checkpoint read back (fp8q's, llm-compressor's, DeepSeek's)

A new layout is a new module here, `@register`ed, and its tests: it is found by the registry, listed by `layouts()`,
and tested against transformers by tests/layouts/test_layouts_load.py from its own cells.

Imports: errors, layouts.vocabulary; layouts (base, inputs; with them the codecs and torch) only on the first lookup.
That keeps `import fp8q.cli` light.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from fp8q.errors import UsageError
from fp8q.layouts.vocabulary import Format, ScaleFormat, Scheme

if TYPE_CHECKING:
    from fp8q.layouts.base import Layout

# Modules of this package that are not one layout's codec.
_SHARED = {
    *("base", "clients", "compressed_tensors", "detect", "fp4", "fp8", "granularity", "inputs", "numerics"),
    "vocabulary",
}
DEFAULT_BLOCK = (128, 128)


def _registry() -> dict[tuple[Scheme, Format, ScaleFormat], type[Layout]]:
    """Every codec module of the package, imported once (each registers itself)."""
    from fp8q.layouts.base import REGISTRY

    if not REGISTRY:
        for module in pkgutil.iter_modules(__path__):
            if module.name not in _SHARED:
                importlib.import_module(f"{__name__}.{module.name}")
        # In the order of their modules' names, whichever module imported which first (an input codec may import a
        # layout's module to build on it): tables and `layouts()` list them so.
        ordered = sorted(REGISTRY.items(), key=lambda item: item[1].__module__)
        REGISTRY.clear()
        REGISTRY.update(ordered)
    return REGISTRY


def find(scheme: str, format: str, scale_format: str = "float", block: tuple[int, int] = DEFAULT_BLOCK) -> Layout:
    """The layout these options ask for.

    Raises:
        UsageError: no layout is registered for them (naming what would do), or a block side under 1.
    """
    try:
        words = (Scheme(scheme), Format(format), ScaleFormat(scale_format))
    except ValueError as e:
        raise UsageError(f"{e}; the layouts fp8q writes: {_choices()}") from None
    cls = _registry().get(words)
    if cls is None:
        raise UsageError(_no_such_layout(*words))
    if min(block) < 1:
        raise UsageError(f"--block-size {block[0]}x{block[1]}: both sides must be positive")
    return cls.make(tuple(block), words[2])  # type: ignore[arg-type]


def layouts() -> list[Layout]:
    """One of every registered layout (default block), in the order their modules registered."""
    return [cls.make(DEFAULT_BLOCK, words[2]) for words, cls in _registry().items()]


def default() -> Layout:
    """Per-channel compressed-tensors: what `fp8q quantize` writes unless told otherwise."""
    return find(Scheme.CHANNEL, Format.COMPRESSED_TENSORS)


def of_format(format: Format) -> list[type[Layout]]:
    """The registered layout classes of one format, in the order a scale's shape is tried against them."""
    classes = {cls for (_, fmt, _), cls in _registry().items() if fmt is format}
    return sorted(classes, key=lambda cls: cls.detect_order)


def readers(format: Format) -> list[type[Layout]]:
    """The layouts of one format a checkpoint is read in, in the order a config is tried against them: the ones fp8q
    only reads (inputs.py; each claims only its own bit width or algorithm), then the FP8 layouts it writes."""
    from fp8q.layouts.inputs import INPUTS

    of_format(format)  # the registry's import of every module
    return [*(cls for cls in INPUTS if cls.format is format), *of_format(format)]


def _choices() -> str:
    return ", ".join(layout.name for layout in layouts())


def _no_such_layout(scheme: Scheme, format: Format, scale_format: ScaleFormat) -> str:
    registry = _registry()
    if scale_format is not ScaleFormat.FLOAT:
        takers = [f"--scheme {s.value} --format {f.value}" for s, f, sf in registry if sf is scale_format]
        what = "DeepSeek-V3.1's power-of-two block scales"
        return f"--scale-format {scale_format.value} is for {' or '.join(takers)} ({what})"
    formats = sorted({f.value for s, f, _ in registry if s is scheme})
    schemes = sorted({s.value for s, f, _ in registry if f is format})
    family = next((cls for (s, f, _), cls in registry.items() if f is format), None)
    missing = getattr(family, "missing", {}).get(scheme.value)
    why = f"vLLM's {format.value} format has no {missing} weights" if missing else "no such layout"
    uses = [f"--format {' or '.join(formats)}"] if formats else []
    uses += [f"--scheme {'/'.join(schemes)}"] if schemes else []
    return f"--scheme {scheme.value} --format {format.value}: {why}; use {', or '.join(uses)}"


__all__ = ["DEFAULT_BLOCK", "Format", "ScaleFormat", "Scheme", "default", "find", "layouts", "of_format", "readers"]
