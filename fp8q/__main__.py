"""The `fp8q` command, also run as `python -m fp8q`.

Imports: cli.
"""

import atexit
import os
import sys
from typing import NoReturn


def main() -> None:
    if "RANK" in os.environ:  # under torchrun: the launcher, known before the imports (seconds) in case it dies then
        os.environ["FP8Q_LAUNCHER_PID"] = str(os.getppid())
    try:
        from fp8q.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while Python is still importing the command line
        reads_only = sys.argv[1:2] in (["inspect"], ["verify"])
        sys.stderr.write(f"interrupted: {'stopped before it began' if reads_only else 'nothing was written'}\n")
        _exit_interrupted()
    try:
        cli_main()
    except SystemExit as e:
        if e.code == 130:
            _exit_interrupted()
        raise


def _exit_interrupted() -> NoReturn:
    """Exit 130 after a Ctrl-C, as said. Not by SystemExit: CPython 3.11 marks a KeyboardInterrupt that leaves code
    run by exec() of a string (dataclasses makes its methods so while a module imports) as unhandled even once it is
    caught, and then ends the process by SIGINT (-2 to its parent) instead of with the code given. The exit functions
    run here as they would at a normal exit."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    main()
