"""When a run stood still waiting on the network, apart from when it converted: the quantization loop's stalls
(waiting for input, for a free buffer, for the writer) counted only where the network was being waited on at the
same moment (a download not there yet, an upload holding the disk), and everything after the loop (the last
uploads, the commit). A stall while the disk or the device is the slower one is the conversion's own time.

Imports: nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

Interval = tuple[float, float]  # time.perf_counter() at its start and end


class Stalls:
    """The moments one thread stood waiting, each of at least a millisecond."""

    def __init__(self) -> None:
        self.intervals: list[Interval] = []

    @contextmanager
    def waiting(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            if end - start > 1e-3:
                self.intervals.append((start, end))

    def from_now_on(self) -> None:
        """The thread is done: all the time from now on is waiting (the last uploads, the commit)."""
        self.intervals.append((time.perf_counter(), math.inf))

    def on(self, network: Iterable[Interval]) -> float:
        """Seconds of these stalls spent while the network was waited on (`network`: the waits for it)."""
        return overlap(network, self.intervals)


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """The same moments as disjoint intervals, in order."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap(a: Iterable[Interval], b: Iterable[Interval]) -> float:
    """Seconds that lie in both sets of intervals."""
    a, b = union(a), union(b)
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


__all__ = ["Interval", "Stalls", "overlap", "union"]
