"""SRC opened, the one place that tells a path from a Hub repo: a checkpoint on disk (a folder, one .safetensors
file, a cache snapshot) becomes a LocalSource, a repo id one too once its snapshot is in the cache (downloaded there
if need be), or a HubStream whose shards are fetched as the run reads them.

Imports: source (base, local; hub, for a repo id, imported then: it brings huggingface_hub, which a local path never
needs).
"""

from __future__ import annotations

from pathlib import Path

from fp8q.source.base import Source
from fp8q.source.local import LocalSource


def open_source(src: str | Path | Source, revision: str | None = None, *, stream: bool = True) -> Source:
    """SRC as a Source: a local path as it is; a Hub repo id (at `revision`) from the cache or, when its weights are
    not all there (and `stream`), as a HubStream: the side files downloaded, the missing shards known from their
    headers alone (fp8q.source.streaming). A Source passes through.

    Raises:
        UsageError: a revision was given for a local path.
        CheckpointError: SRC is neither an existing path nor a usable repo id, or the repo cannot be fetched.
    """
    if not isinstance(src, (str, Path)):
        return src
    if revision is None and Path(src).exists():
        return LocalSource(Path(src))
    from fp8q.source.hub import resolve_source

    resolved = resolve_source(str(src), revision, stream=stream)
    return LocalSource(resolved, str(src), revision) if isinstance(resolved, Path) else resolved


def on_disk(path: str | Path | Source) -> Source:
    """A checkpoint on disk as a Source, no Hub asked (what `verify` takes a path as); a Source passes through."""
    return LocalSource(Path(path)) if isinstance(path, (str, Path)) else path


__all__ = ["on_disk", "open_source"]
