"""Where a run's output goes: the Destination protocol, and OUT on local disk (OutFolder); a Hub repo is the other kind
(--push-to-hub: output.publish.Publisher). A run makes its output in a work folder of its own (OUT.partial/, or a
staging folder when only the Hub takes it) and holds a list of destinations, OUT and the repo together if both are
given; it asks each, in this order:

    check     before any tensor is read: refuse, in one line, what would fail later; change nothing; say whether it
              holds this very output already (a run again: nothing to do)
    accept    the run makes the output (one of them lacks it, or --resume): refuse, changing nothing, if it cannot
              take it as it stands (an OUT that holds an output, this one even, and no --overwrite)
    resume    (--resume) the shards an earlier run delivered that it still holds (the run need not make them again)
    open      every local check has passed: make it ready (a repo that does not exist is created now)
    room      before a shard is opened: hold the writer while too many wait on local disk to be sent
    put       a finished shard, as soon as it is recorded: sent on (uploaded), or nothing to do (OUT)
    drain     once converted: wait for everything put to arrive
    commit    the output made whole there in one step (one commit of every file; the work folder renamed to OUT)
    close     at the end, whatever happened

Imports: output (manifest, writer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fp8q.output.manifest import Progress, holds_output
from fp8q.output.writer import check_output, finalize, remove_tree

T = TypeVar("T")
Say = Callable[[str], None]  # a step in words, as it starts (the last uploads, the commit)
Delivered = Callable[[str, dict[str, Any]], None]  # a shard has arrived: its record, for --resume


class Broadcast(Protocol):
    """Under torchrun, rank 0's value, on every process (engine.distributed.Cluster.broadcast)."""

    def __call__(self, value: T, /) -> T: ...


@dataclass(frozen=True)
class Published:
    """The commit that holds an output on the Hub."""

    repo_id: str
    revision: str
    commit: str
    url: str
    pr_url: str | None


class Destination(Protocol):
    """Where a run's output goes; see the module's docstring for the order a run asks these in."""

    @property
    def where(self) -> str:
        """It in words: a folder, or `org/name (branch)`."""

    @property
    def sends(self) -> bool:
        """Whether it takes each finished shard away while the run goes (an upload, with a progress bar of its own)."""

    @property
    def bytes_sent(self) -> int:
        """What was handed to it over the network (0 for OUT: renamed into place, not copied)."""

    @property
    def waits(self) -> list[tuple[float, float]]:
        """When the run waited on it (perf_counter intervals): the run's time waiting on the Hub."""

    @property
    def notes(self) -> list[str]:
        """What its commit left alone or replaced that a person may have made there."""

    @property
    def published(self) -> Published | None:
        """The commit that holds the output there (once committed, or when `check` found it held already)."""

    def check(self, names: set[str]) -> bool:
        """Refuse what would fail later, changing nothing (a --dry-run asks this too); True when it holds this very
        output already: the files `names`, and an fp8q.json that says so."""

    def accept(self) -> None:
        """The run makes the output after all (after `check`): refuse, changing nothing, what would fail then."""

    def outlook(self, names: set[str]) -> str | None:
        """What a run would do there, in a line (--dry-run, after `check`); None when there is nothing to say."""

    def settle(self, broadcast: Broadcast) -> None:
        """Under torchrun: take what rank 0's `check` found (every process calls this, rank 0 included)."""

    def resume(self, progress: Progress) -> set[str]:
        """The shards an earlier run (its records in `progress`) delivered that it still holds."""

    def open(self) -> None:
        """Every local check has passed and the run goes on: make it ready to take the output."""

    def room(self, stop: threading.Event) -> None:
        """Hold the caller while too many finished shards wait on local disk for it."""

    def lost(self) -> None:
        """A shard given room could not be finished: its room is free again."""

    def put(self, name: str, path: Path, sha256: str, delivered: Delivered) -> None:
        """A finished shard (`sha256` as written): sent on, `delivered` told once it has arrived."""

    def drain(self, stop: threading.Event, say: Say) -> None:
        """Wait for every shard put to arrive; raise the first failure, or Stopped once `stop` is set."""

    def commit(
        self, folder: Path, names: list[str], progress: Progress, message: str, stop: threading.Event, say: Say
    ) -> None:
        """Make the output whole there in one step, from the work folder `folder` holding the files `names`."""

    def close(self) -> None:
        """At the run's end, whatever happened: nothing more is sent."""


@dataclass
class OutFolder:
    """OUT, on local disk: the work folder becomes it, renamed in one step once everything is written; nothing is
    sent anywhere meanwhile. `source`: where SRC is (OUT may be neither it, nor in it, nor around it)."""

    out: Path
    source: Path
    fingerprint: dict[str, Any]
    overwrite: bool
    waits: list[tuple[float, float]] = field(default_factory=list)  # none: nothing is waited on
    notes: list[str] = field(default_factory=list)
    published: Published | None = None

    @property
    def where(self) -> str:
        return str(self.out)

    @property
    def sends(self) -> bool:
        return False

    @property
    def bytes_sent(self) -> int:
        return 0

    def check(self, names: set[str]) -> bool:
        return holds_output(self.out, self.fingerprint, names)

    def accept(self) -> None:
        check_output(self.source, self.out, self.overwrite)  # empty, or an fp8q output --overwrite may replace

    def outlook(self, names: set[str]) -> str | None:
        return None

    def settle(self, broadcast: Broadcast) -> None:
        pass

    def resume(self, progress: Progress) -> set[str]:
        return set()  # OUT is made at the end: an earlier run delivered nothing to it

    def open(self) -> None:
        pass  # made by the rename, at the end

    def room(self, stop: threading.Event) -> None:
        pass

    def lost(self) -> None:
        pass

    def put(self, name: str, path: Path, sha256: str, delivered: Delivered) -> None:
        pass

    def drain(self, stop: threading.Event, say: Say) -> None:
        pass

    def commit(
        self, folder: Path, names: list[str], progress: Progress, message: str, stop: threading.Event, say: Say
    ) -> None:
        # The run's records leave the work folder just before it becomes OUT, and come back if that fails.
        aside = progress.set_aside()
        try:
            finalize(folder, self.out, self.overwrite)
        except BaseException:
            progress.put_back(aside)
            raise
        remove_tree(aside)

    def close(self) -> None:
        pass


__all__ = ["Broadcast", "Delivered", "Destination", "OutFolder", "Published", "Say"]
