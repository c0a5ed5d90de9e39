"""Several processes converting one checkpoint together, launched by `torchrun`.

Imports: torch (torch.distributed), errors. torch.distributed is used only to agree (on the plan's
outcome, on which shards are reused) and to wait for each other; during the run each process
works alone on its share of the shards, and the rendezvous store carries two small things: a byte
counter for rank 0's progress bar, and a flag that stops every process when one fails. Without
torchrun, `Cluster.single()` makes all of this a no-op.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fp8q import errors
from fp8q.errors import Stopped

T = TypeVar("T")

_FAILED = "fp8q/failed"
_BYTES = "fp8q/bytes"
# A worker whose launcher (torchrun) is gone is stopped as SIGTERM stops a run; one stuck waiting on the others (in the
# rendezvous, in a collective: torch's own timeout is days) cannot hear it, and ends this long after all the same.
LAUNCHER_GRACE_S = 20.0
LAUNCHER_ENV = "FP8Q_LAUNCHER_PID"  # set by `python -m fp8q` first thing, before its imports take seconds


def _end_with_launcher() -> None:
    """No worker outlives its launcher: a thread watches the parent process (torchrun's agent, which started this
    one) and, once it is gone (this process re-parented), stops the run (SIGTERM: finished shards are kept for
    --resume), then ends the process within LAUNCHER_GRACE_S if it could not stop (waiting on the others)."""
    launcher = int(os.environ.get(LAUNCHER_ENV) or os.getppid())

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(LAUNCHER_GRACE_S)
        rank = os.environ.get("RANK", "?")
        os.write(2, f"fp8q: rank {rank}: its launcher (torchrun) is gone; ending\n".encode())
        os._exit(143)

    threading.Thread(target=watch, name="fp8q-launcher", daemon=True).start()


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    store: Any = field(default=None, repr=False)

    @classmethod
    def single(cls) -> Cluster:
        return cls()

    @classmethod
    def from_env(cls, cuda: bool) -> Cluster:
        """The torchrun process group when this process was launched by torchrun, else `single()`."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ:
            return cls.single()
        import torch.distributed as dist

        _end_with_launcher()  # before the rendezvous, which waits on the launcher's store
        if not dist.is_initialized():
            # Long runs: the final agreement waits for the slowest process, however long it takes.
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(days=2))
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):
            store = None  # no live progress or early stop, the rest still works
        return cls(
            rank=dist.get_rank(),
            world=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            store=store,
        )

    @property
    def is_single(self) -> bool:
        return self.world == 1

    def device(self, device: torch.device) -> torch.device:
        """Each process of a node takes its own GPU."""
        if device.type == "cuda" and not self.is_single:
            return torch.device("cuda", self.local_rank)
        return device

    def gather(self, item: Any) -> list[Any]:
        """Every process's `item`, in rank order, on every process."""
        if self.is_single:
            return [item]
        import torch.distributed as dist

        items: list[Any] = [None] * self.world
        dist.all_gather_object(items, item)
        return items

    def broadcast(self, item: T) -> T:
        """Rank 0's `item` on every process."""
        first: T = self.gather(item)[0]
        return first

    def agree(self, error: BaseException | None) -> None:
        """Raise, on every process, the error of the first process that failed (if any did).

        Raises:
            Fp8qError: this process's own error, or a copy of another process's.
        """
        outcomes = self.gather(error_record(error) if error is not None else None)
        # A process that only stopped because another failed reports that other's error instead.
        failed = [r for r, o in enumerate(outcomes) if o is not None and not o["stopped"]]
        failed = failed or [r for r, o in enumerate(outcomes) if o is not None]
        if not failed:
            return
        rank = failed[0]
        if rank == self.rank and error is not None:
            raise error
        raise rebuild(outcomes[rank], rank)

    def mark_failed(self) -> None:
        if self.store is not None:
            self.store.set(_FAILED, "1")

    def any_failed(self) -> bool:
        return self.store is not None and self.store.check([_FAILED])

    def add_bytes(self, nbytes: int) -> int:
        return int(self.store.add(_BYTES, nbytes)) if self.store is not None else 0

    def close(self) -> None:
        if not self.is_single:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def assign(shard_sizes: dict[str, int], world: int) -> list[set[str]]:
    """Shards to processes, balanced by bytes: largest first, each to the least loaded process."""
    loads = [0] * world
    shares: list[set[str]] = [set() for _ in range(world)]
    for name, size in sorted(shard_sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += size
        shares[rank].add(name)
    return shares


def error_record(error: BaseException) -> dict[str, Any]:
    """An error as plain data, to send to the other processes."""
    return {
        "stopped": isinstance(error, Stopped),
        "type": type(error).__name__ if isinstance(error, errors.Fp8qError) else None,
        "message": str(error) or type(error).__name__,
        "exit_code": getattr(error, "exit_code", 1),
    }


def rebuild(outcome: dict[str, Any], rank: int) -> errors.Fp8qError:
    """Another process's error, as the same Fp8qError class where it was one."""
    cls = getattr(errors, outcome["type"] or "", None)
    message = outcome["message"] if outcome["type"] else f"internal error: {outcome['message']}"
    if cls is errors.Interrupted:
        return errors.Interrupted(f"rank {rank}: {message}", outcome["exit_code"])
    if not (isinstance(cls, type) and issubclass(cls, errors.Fp8qError)):
        cls = errors.Fp8qError
    return cls(f"rank {rank}: {message}")


class Watcher:
    """While a process runs its share: feed rank 0's progress bar and stop when another process fails."""

    def __init__(self, cluster: Cluster, stop: threading.Event, on_progress: Callable[[int], None] | None) -> None:
        self.cluster = cluster
        self.stop = stop
        self.on_progress = on_progress
        self._done = threading.Event()
        self._seen = 0
        self._thread = threading.Thread(target=self._run, name="fp8q-watch", daemon=True)

    def __enter__(self) -> Watcher:
        if not self.cluster.is_single and self.cluster.store is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        self._report()

    def _run(self) -> None:
        while not self._done.wait(0.25):
            if self.cluster.any_failed():
                self.stop.set()
            self._report()

    def _report(self) -> None:
        if self.on_progress is None or self.cluster.store is None or self.cluster.is_single:
            return
        total = self.cluster.add_bytes(0)
        if total > self._seen:
            self.on_progress(total - self._seen)
            self._seen = total
