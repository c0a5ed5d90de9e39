"""The `fp8q` command, also run as `python -m fp8q`.

Imports: cli.
"""

import sys


def main() -> None:
    try:
        from fp8q.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while Python is still importing the command line
        reads_only = sys.argv[1:2] in (["inspect"], ["verify"])
        sys.stderr.write(f"interrupted: {'stopped before it began' if reads_only else 'nothing was written'}\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
