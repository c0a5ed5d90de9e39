"""`python tests/support/stopped_run.py K:SIGNAL ARGS...`: `fp8q ARGS...` as a user runs it, that sends itself SIGNAL
(KILL, INT, TERM, STOP) as soon as K shards are recorded, so that a test stops a run at a known point instead of racing
it with a poll. Records are made one at a time (a lock around each and the count after it): exactly K. fp8q itself has
no such hook: it is put in place from here.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fp8q.output import manifest  # noqa: E402


def _stop_after(count: int, sig: signal.Signals) -> None:
    record = manifest.Progress.record
    lock = threading.Lock()

    def recorded(self: manifest.Progress, *args: object, **kwargs: object) -> None:
        with lock:
            record(self, *args, **kwargs)  # type: ignore[arg-type]
            if len(list((self.partial / manifest.DONE_DIR).glob("*.json"))) == count:
                os.kill(os.getpid(), sig)

    manifest.Progress.record = recorded  # type: ignore[method-assign]


if __name__ == "__main__":
    count, _, name = sys.argv[1].partition(":")
    _stop_after(int(count), getattr(signal, f"SIG{name}"))
    sys.argv = ["fp8q", *sys.argv[2:]]
    from fp8q.__main__ import main

    main()
