"""Errors a user can cause. Each message names the file or tensor and says what to do.

Imports: nothing. The CLI prints `str(error)` as one line and exits with `exit_code`.
"""

from __future__ import annotations

import errno
from pathlib import Path


class Fp8qError(Exception):
    """Base class: a problem with the input, the options or the environment, not a bug."""

    exit_code = 1


class UsageError(Fp8qError):
    """Options that contradict each other or cannot apply (exit code 2)."""

    exit_code = 2


class CheckpointError(Fp8qError):
    """The source checkpoint is missing, malformed or inconsistent."""


class UnsupportedTensorError(Fp8qError):
    """A tensor that cannot be quantized as asked (dtype, shape, NaN or inf)."""


class OutputError(Fp8qError):
    """The output folder cannot be used or written."""


class Interrupted(Fp8qError):
    """The run was stopped by a signal; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(Exception):
    """No error a user sees: raised in a thread waiting on a pool, a queue or a download once the run is being
    stopped (by a signal, or another thread's failure), so that it ends without waiting longer."""


def read_error(path: Path, tensor: str, error: OSError) -> CheckpointError:
    """An OSError while reading a tensor's bytes, as the one line a user sees."""
    return CheckpointError(
        f"{path}: read error in tensor {tensor} ({error.strerror or error}); "
        "check the disk and the file, then run again"
    )


def open_error(path: Path, error: OSError) -> CheckpointError:
    """A source file that cannot be opened once the run has started: it was there when planned."""
    return CheckpointError(
        f"{path}: cannot be opened ({error.strerror or error}); it was moved, deleted or made unreadable while "
        "fp8q was running: restore it"
    )


def write_error(path: Path, error: OSError) -> OutputError:
    """An OSError while writing output, as the one line a user sees (a full disk said plainly)."""
    if error.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full; free some space and run again")
    return OutputError(f"{path}: write error ({error.strerror or error}); check the disk and run again")
