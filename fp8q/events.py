"""What a conversion tells its caller while it runs, and what it reports at the end; no command owns these.

Imports: plan (its Plan type, for type checking only). The engine (engine/run.py) sends `PlanReady` once, then its
writer thread (engine/writing.py) `TensorDone` per tensor; a streamed source adds `DownloadStarted` and `Downloaded`, a
push `UploadStarted`, `ShardUploaded` and a `Step` for the last uploads and the commit; `verify` sends `Started` instead
of a plan, then `TensorDone` per weight it checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the type alone: importing events imports no wing
    from fp8q.plan.planner import Plan


@dataclass(frozen=True)
class PlanReady:
    plan: Plan


@dataclass(frozen=True)
class DownloadStarted:
    """A streamed Hub repo: `nbytes` in `shards` shards will be downloaded as the run goes (after PlanReady)."""

    nbytes: int
    shards: int


@dataclass(frozen=True)
class Downloaded:
    """`nbytes` more of shard `shard` downloaded (from the download's thread)."""

    shard: str
    nbytes: int


@dataclass(frozen=True)
class UploadStarted:
    """--push-to-hub: `nbytes` of output in `shards` shards will be uploaded as each is finished (after PlanReady)."""

    nbytes: int
    shards: int


@dataclass(frozen=True)
class ShardUploaded:
    """Output shard `shard`, `nbytes` of it, is on the Hub (from the upload's thread)."""

    shard: str
    nbytes: int


@dataclass(frozen=True)
class Step:
    """A step at the run's end with no bytes of its own to count (the last uploads, the commit), as it starts."""

    words: str


@dataclass(frozen=True)
class Started:
    """Sent once by `verify` before any data is read: how many tensors and bytes it will go through."""

    tensors: int
    nbytes: int


@dataclass(frozen=True)
class TensorDone:
    name: str
    nbytes: int
    shard: str = ""  # the output shard it went into


Event = PlanReady | Started | TensorDone | DownloadStarted | Downloaded | UploadStarted | ShardUploaded | Step
EventCallback = Callable[[Event], None]


@dataclass(frozen=True)
class Report:
    """The outcome of a quantize, dequantize or convert run, for the CLI summary and `--json`."""

    out: str
    device: str
    version: str  # fp8q's
    command: str  # quantize, dequantize or convert
    # The layout written (scheme, format, scale_format, block_size: None but for a block layout); None for dequantize.
    layout: dict[str, Any] | None
    files: dict[str, str]  # every file of OUT but fp8q.json, by its path in OUT -> its sha256
    tensors_quantized: int
    tensors_kept: int
    bytes_in: int
    bytes_out: int
    seconds: float
    ignored_modules: list[str] = field(default_factory=list)
    resumed_shards: int = 0
    tensors_dequantized: int = 0  # FP8 weights of the source written in high precision (dequantize, convert)
    tensors_dropped: int = 0  # the source's scales and other quantization-only tensors left out
    dtype: str | None = None  # the high-precision dtype of dequantized weights
    # The source's FP8 layouts in words -> number of weights, e.g. {"fp8 block 128x128": 61}.
    layouts: dict[str, int] = field(default_factory=dict)
    # A streamed Hub repo: bytes downloaded by this run, and whether they were kept in the cache (else deleted).
    bytes_downloaded: int = 0
    downloads_kept: bool = False
    # --push-to-hub: repo_id, revision, commit, url and pr_url of the one commit; None without
    pushed: dict[str, Any] | None = None
    bytes_uploaded: int = 0
    notes: list[str] = field(default_factory=list)  # what the plan said to know (printed as the run starts)
    findings: list[str] = field(default_factory=list)  # what the quantized values said (fp8q.json's statistics)
    # Every target (OUT, the repo) held this very output already: nothing was read, written, uploaded or committed.
    up_to_date: bool = False
    # Of `seconds`, those spent waiting on the Hub: for a download not there yet, for uploads to free the disk, for
    # the last uploads and the commit. The rest is the conversion's own.
    seconds_waiting: float = 0.0

    @property
    def seconds_converting(self) -> float:
        return max(0.0, self.seconds - self.seconds_waiting)

    @property
    def gb_per_s(self) -> float:
        """The conversion's rate: the bytes read over its own time (not the time spent waiting on the Hub)."""
        converting = self.seconds_converting
        return self.bytes_in / converting / 1e9 if converting > 0 else 0.0


__all__ = [
    "Downloaded",
    "DownloadStarted",
    "Event",
    "EventCallback",
    "PlanReady",
    "Report",
    "ShardUploaded",
    "Started",
    "Step",
    "TensorDone",
    "UploadStarted",
]
