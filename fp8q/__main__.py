"""The `fp8q` command, also run as `python -m fp8q`.

Imports: cli.
"""

import os
import sys


def main() -> None:
    if "RANK" in os.environ:  # under torchrun: the launcher, known before the imports (seconds) in case it dies then
        os.environ["FP8Q_LAUNCHER_PID"] = str(os.getppid())
    try:
        from fp8q.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while Python is still importing the command line
        reads_only = sys.argv[1:2] in (["inspect"], ["verify"])
        sys.stderr.write(f"interrupted: {'stopped before it began' if reads_only else 'nothing was written'}\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
