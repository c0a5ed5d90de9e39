"""How many CPU cores this process may run on (its affinity, where the system has one): the most worker threads
that help. Imports: nothing."""

import os


def usable_cores() -> int:
    """The cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
